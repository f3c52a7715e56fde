"""pipeline/cli.py: how entry points end (one error line, exit codes, --debug)."""

from __future__ import annotations

import errno

import pytest

from pipeline.cli import DEBUG_ENV, run_main


class _Mine(ValueError):
    pass


def _raiser(exc: BaseException):
    def main(argv):
        raise exc

    return main


def test_a_user_error_is_one_error_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    rc = run_main(_raiser(_Mine("key 'parallel.tp': got 0\nexpected >= 1")), [], (_Mine,))
    err = capsys.readouterr().err
    assert rc == 2
    assert err == "error: key 'parallel.tp': got 0 | expected >= 1\n"


def test_an_os_error_names_the_file_and_the_reason(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    exc = OSError(errno.ENOSPC, "No space left on device", "/ckpt/step-000002/ds/x.pt")
    assert run_main(_raiser(exc), []) == 2
    assert capsys.readouterr().err == "error: /ckpt/step-000002/ds/x.pt: No space left on device\n"


def test_a_bug_is_an_internal_error_line_with_exit_1_and_no_traceback(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert run_main(_raiser(KeyError("boom")), []) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: internal error: KeyError: 'boom'")
    assert "Traceback" not in err and "--debug" in err


def test_debug_flag_is_removed_from_argv_and_reraises(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "0")  # recorded, so the "1" that --debug sets is undone afterwards
    seen = []

    def main(argv):
        seen.append(argv)
        raise _Mine("bad")

    with pytest.raises(_Mine):
        run_main(main, ["--debug", "steps=3"], (_Mine,))
    assert seen == [["steps=3"]]


def test_return_value_is_the_exit_status():
    assert run_main(lambda argv: 3, []) == 3
    assert run_main(lambda argv: None, []) == 0
