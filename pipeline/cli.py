"""How every command-line entry point ends: one ``error:`` line, never a traceback by surprise.

    if __name__ == "__main__":
        sys.exit(run_main(main, user_errors=(ConfigError, DatasetError)))

* An error the user can fix (a type in ``user_errors``, or an ``OSError``: a missing file, a full
  disk, a permission) prints ``error: <message>`` on one line to stderr and exits 2.
* Ctrl-C exits 130 with ``error: interrupted``.
* Anything else is a bug of ours: ``error: internal error: <Type>: <message>`` plus where to get
  the traceback, and exit 1.
* ``--debug`` anywhere on the command line, or ``MEMDLM_DEBUG=1`` in the environment, re-raises
  instead (the full traceback). ``--debug`` also sets ``MEMDLM_DEBUG=1`` so the jobs a launcher
  starts show theirs too.

A leaf module (standard library only): data_prep, launch and pipeline all use it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

DEBUG_ENV = "MEMDLM_DEBUG"
DEBUG_FLAG = "--debug"
USER_ERROR_EXIT = 2
INTERNAL_ERROR_EXIT = 1
INTERRUPTED_EXIT = 130


def debug_enabled() -> bool:
    """Whether tracebacks were asked for (``MEMDLM_DEBUG=1``, or ``--debug`` seen by :func:`run_main`)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def one_line(message: object) -> str:
    """``message`` on a single line (an exception text with newlines is joined with ' | ')."""
    text = str(message).strip()
    return " | ".join(part.strip() for part in text.splitlines() if part.strip()) or "(no message)"


def os_error_text(exc: OSError) -> str:
    """``<file>: <reason>`` for an OSError (``[Errno 28] No space left on device`` -> its words)."""
    where = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or str(exc)
    return f"{where}: {reason}" if where else reason


def print_error(message: object) -> None:
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)


def run_main(
    main: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    user_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Call ``main(argv)`` (``sys.argv[1:]`` by default, ``--debug`` removed) and turn what it raises
    into an exit status with one ``error:`` line (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if DEBUG_FLAG in args:
        args = [a for a in args if a != DEBUG_FLAG]
        os.environ[DEBUG_ENV] = "1"
    try:
        rc = main(args)
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print_error("interrupted")
        return INTERRUPTED_EXIT
    except user_errors as exc:
        if debug_enabled():
            raise
        print_error(exc)
        return USER_ERROR_EXIT
    except OSError as exc:
        if debug_enabled():
            raise
        print_error(os_error_text(exc))
        return USER_ERROR_EXIT
    except Exception as exc:
        if debug_enabled():
            raise
        print_error(
            f"internal error: {type(exc).__name__}: {exc} (rerun with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the "
            "traceback, and report it)"
        )
        return INTERNAL_ERROR_EXIT
    return 0 if rc is None else int(rc)
