"""`make import-hf` / `make export-hf` (and the trainer's export) never delete what they did not write,
never touch their source, replace their own output like an atomic re-save, and turn a damaged
source (safetensors, config.json) or a bad option into one `error:` line with exit status 2."""

from __future__ import annotations

import hashlib
import json
import random
import runpy
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests import _proc
from tests._hf_models import hf_checkpoint

ROOT = Path(__file__).resolve().parents[2]
MARKER = ".memdlm-output.json"


def _tree_hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (directories as ``<dir>``)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _hf_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """``python -m launch.hf ARGS`` in this process (its ``__main__`` block included): (status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["launch/hf.py", *map(str, args)])
    capsys.readouterr()
    try:
        runpy.run_path(str(ROOT / "launch" / "hf.py"), run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _error_line(err: str) -> str:
    """The single ``error:`` line of a failed command (no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory) -> Path:
    """A random transformers Llama checkpoint (read-only for the tests: copy it to damage it)."""
    return hf_checkpoint("llama-gqa", tmp_path_factory.mktemp("hf") / "src")


@pytest.fixture(scope="module")
def our_export(hf_src, tmp_path_factory) -> Path:
    from pipeline.hf.convert import import_hf

    return import_hf(hf_src, tmp_path_factory.mktemp("ours") / "export")


def _foreign_dir(root: Path, kind: str) -> Path:
    """A non-empty directory of the user's: notes, or a training run's checkpoints folder."""
    if kind == "notes":
        (root / "notes").mkdir(parents=True)
        (root / "notes" / "notes.txt").write_text("precious\n")
        return root
    step = root / "step-000002"
    step.mkdir(parents=True)
    (step / "train_state.json").write_text('{"step": 2}\n')
    (step / "mp_rank_00_model_states.pt").write_bytes(b"\x00" * 64)
    (root / "latest").write_text("step-000002\n")
    return root


# ------------------------------------------------------------------ BAD: deleting what is not ours
@pytest.mark.parametrize("command", ["import", "export"])
@pytest.mark.parametrize("kind", ["notes", "checkpoints"])
def test_a_non_empty_out_we_did_not_write_is_refused_and_its_files_stay(
    monkeypatch, capsys, tmp_path, hf_src, our_export, command, kind
):
    out = _foreign_dir(tmp_path / "out", kind)
    before = _tree_hashes(out)
    source = hf_src if command == "import" else our_export
    code, err = _hf_cli(monkeypatch, capsys, command, source, out)
    line = _error_line(err)
    assert code == 2
    assert str(out) in line and "FORCE=1" in line and "--force" in line, line
    assert _tree_hashes(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temporary left beside it


@pytest.mark.parametrize("command", ["import", "export"])
@pytest.mark.parametrize("where", ["equal", "inside", "around"])
def test_out_equal_to_inside_or_around_the_source_is_refused_even_with_force(
    monkeypatch, capsys, tmp_path, hf_src, our_export, command, where
):
    import shutil

    src = tmp_path / "parent" / "src"
    shutil.copytree(hf_src if command == "import" else our_export, src)
    out = {"equal": src, "inside": src / "converted", "around": src.parent}[where]
    before = _tree_hashes(tmp_path)
    code, err = _hf_cli(monkeypatch, capsys, command, src, out, "--force")
    line = _error_line(err)
    assert code == 2 and str(src) in line and "source" in line, line
    assert _tree_hashes(tmp_path) == before


def test_make_import_hf_leaves_a_non_empty_out_and_its_own_source_untouched(tmp_path, hf_src):
    """The acceptance check: `make import-hf` with OUT non-empty, then with OUT=SRC (FORCE=1 too)."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hf_src, src)
    out = _foreign_dir(tmp_path / "out", "notes")
    before_out, before_src = _tree_hashes(out), _tree_hashes(src)
    res = _proc.run(
        ["make", "--no-print-directory", "import-hf", f"SRC={src}", f"OUT={out}"], timeout=300, cwd=ROOT
    )
    assert res.returncode != 0 and f"error: OUT={out}" in res.stderr, res.stderr
    assert _tree_hashes(out) == before_out
    for force in ([], ["FORCE=1"]):
        cmd = ["make", "--no-print-directory", "import-hf", f"SRC={src}", f"OUT={src}", *force]
        res = _proc.run(cmd, timeout=300, cwd=ROOT)
        assert res.returncode != 0 and "is the source directory" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert _tree_hashes(src) == before_src


def test_make_passes_force_to_both_targets():
    for target, extra in (("import-hf", "SRC=a"), ("export-hf", "CHECKPOINT=a")):
        for force, want in (("FORCE=1", True), ("FORCE=", False), ("FORCE=0", False)):
            cmd = ["make", "-n", "--no-print-directory", target, extra, "OUT=b", force]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            assert ("--force" in res.stdout) is want, res.stdout


def test_force_replaces_a_directory_we_did_not_write(monkeypatch, capsys, tmp_path, hf_src):
    out = _foreign_dir(tmp_path / "out", "notes")
    code, err = _hf_cli(monkeypatch, capsys, "import", hf_src, out, "--force")
    assert code == 0, err
    assert not (out / "notes").exists() and (out / MARKER).is_file() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_out_given_as_dot_the_working_directory_is_written_and_rewritten(
    monkeypatch, capsys, tmp_path, hf_src
):
    """``OUT=.`` has no name of its own to put a sibling beside (it was an internal error)."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for _ in range(2):  # the second time the working directory itself is replaced
        code, err = _hf_cli(monkeypatch, capsys, "import", hf_src, ".")
        assert code == 0, err
        assert (tmp_path / "here" / MARKER).is_file()
        monkeypatch.chdir(tmp_path / "here")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_our_previous_output_is_replaced_without_force_also_one_written_before_the_marker(
    monkeypatch, capsys, tmp_path, hf_src
):
    other = hf_checkpoint("llama-gqa", tmp_path / "other", seed=1)
    out, hf = tmp_path / "out", tmp_path / "hf"
    for source in (hf_src, other, hf_src):
        code, err = _hf_cli(monkeypatch, capsys, "import", source, out)
        assert code == 0, err
        code, err = _hf_cli(monkeypatch, capsys, "export", out, hf)
        assert code == 0, err
        assert json.loads((out / "config.json").read_text())["source"]["path"] == str(source.resolve())
        assert json.loads((out / MARKER).read_text())["written_by"] == "import-hf"
        assert json.loads((hf / MARKER).read_text())["written_by"] == "export-hf"
        (out / MARKER).unlink()  # an export written before the marker: config.json + model.safetensors
    weights = load_file(str(hf / "model.safetensors"))
    original = load_file(str(hf_src / "model.safetensors"))
    assert all((weights[k] == v).all() for k, v in original.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "other", "out"]


# A writer that replaces OUT in a loop; each directory holds 8 files of one generation + the marker.
_LOOP = """
import sys
from pathlib import Path
from pipeline.outputs import write_output_dir

out, i = Path(sys.argv[1]), 0
while True:
    i += 1
    def fill(tmp, i=i):
        for k in range(8):
            (tmp / f"part{k}.txt").write_text(str(i) * 4096)
    write_output_dir(out, fill, written_by="test")
    print(i, flush=True)
"""


def _complete(d: Path) -> bool:
    parts = [d / f"part{k}.txt" for k in range(8)]
    if not (d / MARKER).is_file() or not all(p.is_file() for p in parts):
        return False
    return len({p.read_text() for p in parts}) == 1


def test_a_kill_at_any_moment_of_a_replace_leaves_a_complete_directory(tmp_path):
    from pipeline.outputs import check_output_dir

    out = tmp_path / "out"
    rng = random.Random(0)
    kills = 0
    for _ in range(12):
        log = tmp_path / "log.txt"
        with (
            log.open("w") as f,
            _proc.started([sys.executable, "-c", _LOOP, str(out)], stdout=f, cwd=ROOT) as p,
        ):
            deadline = time.monotonic() + 60
            while log.stat().st_size == 0 and time.monotonic() < deadline:  # started replacing
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.05))
            p.send_signal(signal.SIGKILL)
            p.wait()
        kills += 1
        survivors = [d for d in tmp_path.iterdir() if d.is_dir() and _complete(d)]
        assert survivors, sorted(p.name for p in tmp_path.iterdir())  # out, or the old one put aside
        check_output_dir(out)  # the next write starts by finishing the interrupted replace
        assert _complete(out)
        assert not (tmp_path / ".out.put-aside").exists()
    assert kills == 12


def _generation(d: Path, i: int) -> Path:
    d.mkdir(parents=True)
    for k in range(8):
        (d / f"part{k}.txt").write_text(str(i) * 4096)
    (d / MARKER).write_text("{}\n")
    return d


@pytest.mark.parametrize("killed", ["between_the_renames", "after_the_new_one_is_in"])
def test_the_next_write_finishes_a_replace_killed_between_its_steps(tmp_path, killed):
    """The two states a kill inside replace_dir can leave (too short a window to hit with a signal)."""
    from pipeline.outputs import check_output_dir, write_output_dir

    out, aside, partial = tmp_path / "out", tmp_path / ".out.put-aside", tmp_path / ".out.partial"
    _generation(aside, 1)  # the old output, renamed aside
    if killed == "between_the_renames":
        _generation(partial, 2)  # complete, never renamed in
    else:
        _generation(out, 2)
    check_output_dir(out)
    assert _complete(out) and (out / "part0.txt").read_text()[0] == (
        "1" if killed == "between_the_renames" else "2"
    )
    assert not aside.exists()

    def fill(tmp: Path) -> None:
        for k in range(8):
            (tmp / f"part{k}.txt").write_text("3" * 4096)

    write_output_dir(out, fill, written_by="test")
    assert _complete(out) and (out / "part0.txt").read_text()[0] == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------ POOR: tracebacks
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "header_bomb":
        path.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    elif how == "header_not_json":
        path.write_bytes(data[:8] + b"{" * n + data[8 + n :])
    elif how == "shorter_than_a_header":
        path.write_bytes(data[:5])


DAMAGES = ["truncated", "header_bomb", "header_not_json", "shorter_than_a_header"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_safetensors_source_is_one_error_naming_the_file(
    monkeypatch, capsys, tmp_path, hf_src, how
):
    import shutil

    src = shutil.copytree(hf_src, tmp_path / "src")
    _damage(src / "model.safetensors", how)
    code, err = _hf_cli(monkeypatch, capsys, "import", src, tmp_path / "out")
    line = _error_line(err)
    assert code == 2
    assert f"{src / 'model.safetensors'}: not a complete safetensors file" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_export_is_one_error_naming_the_file_on_export_hf(
    monkeypatch, capsys, tmp_path, our_export, how
):
    import shutil

    export = shutil.copytree(our_export, tmp_path / "export")
    _damage(export / "model.safetensors", how)
    code, err = _hf_cli(monkeypatch, capsys, "export", export, tmp_path / "hf")
    line = _error_line(err)
    assert code == 2 and f"{export / 'model.safetensors'}: not a complete safetensors file" in line, line


@pytest.mark.parametrize(
    "file, text, expected",
    [
        ("config.json", '{"model_type": "llama", ', "config.json: not valid JSON"),
        ("config.json", "[1, 2]", "config.json: expected a JSON object, got a list"),
        ("config.json", "", "config.json: not valid JSON"),
        ("model.safetensors.index.json", "{oops", "model.safetensors.index.json: not valid JSON"),
        ("model.safetensors.index.json", '{"metadata": {}}', "expected a JSON object with a 'weight_map'"),
        (
            "model.safetensors.index.json",
            '{"weight_map": {"model.norm.weight": "gone.safetensors"}}',
            "gone.safetensors: no such file",
        ),
    ],
)
def test_a_malformed_json_file_of_the_source_is_one_error_naming_it(
    monkeypatch, capsys, tmp_path, hf_src, file, text, expected
):
    import shutil

    src = shutil.copytree(hf_src, tmp_path / "src")
    (src / file).write_text(text)
    code, err = _hf_cli(monkeypatch, capsys, "import", src, tmp_path / "out")
    line = _error_line(err)
    assert code == 2 and str(src) in line and expected in line, line


@pytest.mark.parametrize("key, value", [("hidden_size", None), ("num_hidden_layers", "two")])
def test_a_config_json_missing_a_key_or_with_a_wrong_type_names_the_key(
    monkeypatch, capsys, tmp_path, hf_src, key, value
):
    import shutil

    src = shutil.copytree(hf_src, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    if value is None:
        del config[key]
    else:
        config[key] = value
    (src / "config.json").write_text(json.dumps(config))
    code, err = _hf_cli(monkeypatch, capsys, "import", src, tmp_path / "out")
    line = _error_line(err)
    assert code == 2 and f"{src / 'config.json'}" in line and f"'{key}'" in line, line


@pytest.mark.parametrize(
    "option, expected",
    [
        (["--seq-len", "0"], "SEQ_LEN / --seq-len: got 0, expected >= 1"),
        (["--seq-len", "-3"], "SEQ_LEN / --seq-len: got -3, expected >= 1"),
        (["--mask-id", "-1"], "MASK_ID / --mask-id: got -1, expected a token id >= 0"),
    ],
)
def test_a_bad_seq_len_or_mask_id_names_the_option(monkeypatch, capsys, tmp_path, hf_src, option, expected):
    code, err = _hf_cli(monkeypatch, capsys, "import", hf_src, tmp_path / "out", *option)
    line = _error_line(err)
    assert code == 2 and expected in line, line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ BAD: the trainer's export
def test_the_trainer_export_refuses_a_directory_not_ours_and_replaces_its_own(world1, tiny_dataset, tmp_path):
    from pipeline.config import ConfigError
    from pipeline.engine.export import export_model
    from pipeline.train import Trainer
    from tests.conftest import tiny_trainer_config

    cfg = tiny_trainer_config(tiny_dataset, tmp_path / "run", "parallel.precision=fp32")
    trainer = Trainer(cfg)
    ids, tokenizer = trainer.manifest.special_ids, tiny_dataset / "tokenizer.model"
    foreign = _foreign_dir(tmp_path / "checkpoints", "checkpoints")
    before = _tree_hashes(foreign)
    with pytest.raises(
        ConfigError, match=f"export {foreign} is a non-empty directory this tool did not write"
    ):
        export_model(trainer.engine, cfg, foreign, tokenizer, ids, 0)
    assert _tree_hashes(foreign) == before
    out = tmp_path / "export"
    for step in (1, 2, 3):
        export_model(trainer.engine, cfg, out, tokenizer, ids, step)
        assert json.loads((out / "config.json").read_text())["step"] == step
        assert json.loads((out / MARKER).read_text())["written_by"] == "train --export"
        if step == 2:
            (out / MARKER).unlink()  # an export from before the marker is ours too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "export", "mlruns", "run"]
