"""Writing files so a crash never leaves half of one: temp file in the same folder, fsync, rename.

atomic_write_text(path, text)
atomic_write_bytes(path, data)
with atomic_path(path) as tmp: save_something(tmp)     # any writer that takes a path
replace_dir(new_dir, path)                             # a whole directory, the old one put aside
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    # the rename itself must reach the disk too, or a power cut can undo it
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def put_aside_path(path: Path) -> Path:
    """Where :func:`replace_dir` keeps the directory it replaces until the new one is in place."""
    path = Path(path)
    return path.with_name(f".{path.name}.put-aside")


def restore_put_aside(path: Path) -> None:
    """Finish what a killed :func:`replace_dir` left: the old directory put back when the new one
    never arrived, deleted when the new one did."""
    path, aside = Path(path), put_aside_path(path)
    if not aside.is_dir():
        return
    if path.exists():  # killed after the new directory was renamed in: the old one was to go
        shutil.rmtree(aside)
    else:  # killed between the two renames: the old directory is the complete one
        os.replace(aside, path)
        _fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def replace_dir(new: Path, path: Path) -> Path:
    """Rename the complete directory ``new`` (a sibling of ``path``) to ``path`` like an atomic re-save.

    An existing ``path`` is renamed to :func:`put_aside_path` first and deleted only once ``new`` is
    in its place, so a kill at any moment leaves a complete directory: ``path``, or the old one put
    aside, which :func:`restore_put_aside` (called here first) puts back.
    """
    new, path = Path(new), Path(path)
    _fsync_tree(new)  # the files must be on disk before a rename can make them the only copy
    restore_put_aside(path)
    if not path.exists():
        os.replace(new, path)
        _fsync_dir(path.parent)
        return path
    aside = put_aside_path(path)
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside, path)
        raise
    _fsync_dir(path.parent)
    shutil.rmtree(aside)
    return path
