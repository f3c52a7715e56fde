"""Directories our commands write whole (import-hf, export-hf, the trainer's export): replaced only
when they are ours, and never the source they were made from.

    check_output_dir(out, src=src, force=force)                      # first: refuse before any work
    write_output_dir(out, fill, written_by="import-hf", src=src)     # fill(tmp) writes the files

Every directory written here holds ``.memdlm-output.json`` (written last: a directory with it is
complete). Exports written before that marker are recognised by ``config.json`` (a JSON object with
"model" and "special_ids") next to ``model.safetensors``. Any other non-empty directory is the
user's: refused unless ``force``. An ``out`` equal to, inside or around ``src`` is refused even
with ``force``. The new directory is filled beside ``out`` and renamed into place by
:func:`pipeline.atomic_io.replace_dir` (the old one put aside, deleted only after), so a kill at
any moment leaves a complete directory.

A leaf module (standard library and pipeline.atomic_io only): pipeline.hf and pipeline.engine use it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from pipeline.atomic_io import atomic_write_text, replace_dir, restore_put_aside

MARKER = ".memdlm-output.json"
MARKER_VERSION = 1
FORCE_HINT = "choose a new or empty OUT, or FORCE=1 / --force replaces it (deleting its files)"


class OutputDirError(ValueError):
    """An output directory we must not write: someone else's files, or the source itself."""


def _legacy_export(path: Path) -> bool:
    """An export (trainer or import-hf) written before the marker existed."""
    if not (path / "model.safetensors").is_file():
        return False
    try:
        info = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "model" in info and "special_ids" in info


def is_our_output(path: Path) -> bool:
    """Whether directory ``path`` was written by one of our commands (marker, or an older export)."""
    path = Path(path)
    return (path / MARKER).is_file() or _legacy_export(path)


def _overlap(out: Path, src: Path) -> str | None:
    o, s = out.resolve(), src.resolve()
    if o == s:
        return "is the source directory"
    if o.is_relative_to(s):
        return "is inside the source directory"
    if s.is_relative_to(o):
        return "contains the source directory"
    return None


def check_output_dir(
    out: Path, *, src: Path | None = None, force: bool = False, hint: str = FORCE_HINT, label: str = "OUT="
) -> None:
    """Raise OutputDirError unless ``out`` may be (re)written: absent, empty, ours, or ``force``.

    ``src`` (the directory read from) is never written: OUT equal to it, inside it or around it is
    refused even with ``force``. Messages name the directory as ``label`` + path; ``hint`` ends
    the one for a directory of someone else's. A replace a kill interrupted is finished first (the
    old directory put back when the new one never arrived)."""
    out = Path(out)
    path = _normal(out)
    if src is not None and (why := _overlap(out, Path(src))):
        raise OutputDirError(
            f"{label}{out} {why} {src}: the source is never written to; choose another OUT "
            "(FORCE=1 / --force does not apply here)"
        )
    if path.is_symlink():
        raise OutputDirError(f"{label}{out} is a symbolic link: give the directory itself or a new OUT")
    restore_put_aside(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputDirError(f"{label}{out} exists and is not a directory: choose another OUT")
    if force or is_our_output(path) or not any(path.iterdir()):
        return
    raise OutputDirError(
        f"{label}{out} is a non-empty directory this tool did not write (no {MARKER}, not an export): {hint}"
    )


def _normal(out: Path) -> Path:
    """``out`` absolute, without ``.``/``..`` parts (``OUT=.`` then has a name and a parent for the
    siblings); symbolic links are left as they are."""
    return Path(os.path.abspath(out))


def partial_path(out: Path) -> Path:
    """The sibling directory a write fills before it is renamed to ``out``."""
    out = _normal(out)
    return out.with_name(f".{out.name}.partial")


def write_output_dir(
    out: Path,
    fill: Callable[[Path], None],
    *,
    written_by: str,
    src: Path | None = None,
    force: bool = False,
    hint: str = FORCE_HINT,
    label: str = "OUT=",
) -> Path:
    """``fill(tmp)`` writes the files into a sibling temporary directory, which then replaces ``out``.

    Checked by :func:`check_output_dir` before filling and again before the rename (a long fill
    may race with the user); on any error the temporary directory is removed and ``out`` is as
    it was. Returns ``out`` made absolute (``OUT=.``, the working directory, was replaced too).
    """
    target = _normal(out)  # once: when OUT is the working directory, replacing it removes the cwd
    check_output_dir(Path(out), src=src, force=force, hint=hint, label=label)
    tmp = partial_path(target)
    if tmp.exists():  # what a killed write left; the name is ours
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        marker = {"written_by": written_by, "version": MARKER_VERSION}
        atomic_write_text(tmp / MARKER, json.dumps(marker, sort_keys=True) + "\n")
        check_output_dir(target, src=src, force=force, hint=hint, label=label)
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
