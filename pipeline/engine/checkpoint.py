"""Atomic, verified checkpoints: a DeepSpeed checkpoint plus the explicit train state.

Layout under ``<run_dir>/checkpoints``::

    step-000100/ds/...           engine.save_checkpoint (model, ZeRO optimizer, LR scheduler) per rank
    step-000100/rng/rank-K.pt    torch (and CUDA) RNG state of rank K: tensors only (weights_only load)
    step-000100/rng/rank-K.json  Python and numpy RNG state of rank K
    step-000100/buffers.pt       the model's persistent buffers (rank 0; tensors only), if it has any:
                                 a universal load restores parameters only
    step-000100/train_state.json step, data-loader state of every data-parallel rank, resolved
                                 config, dataset manifest hash, world layout, counters
    step-000100/files.json       every other file of the checkpoint with its size and sha256
    latest                       name of the newest complete checkpoint (replaced atomically)

Saving: every rank writes into ``.tmp-step-000100``; once all have finished, the ranks hash the
files between them and rank 0 writes ``files.json`` (fsynced), renames the folder to
``step-000100`` and only then repoints ``latest``. Re-saving a step that already exists (a
finished run relaunched, a stop signal right after a periodic save) never deletes the published
copy first: it is renamed to ``.old-step-000100``, the new one renamed into place, ``latest``
repointed, and only then is the old copy deleted. A kill at any moment therefore leaves a complete
checkpoint for the step ``latest`` names: either that folder, or its ``.old-`` copy when the kill
fell between the two renames. The next save sweeps stale ``.tmp-*`` folders and either deletes an
``.old-*`` copy (its replacement is in place) or renames it back (it is the only copy).

Resuming (``find_resume_checkpoint``): the checkpoint ``latest`` names is verified (sizes and
sha256 against ``files.json``) before it is trusted. A missing, truncated or altered file, or a
``latest`` naming a folder that is not there, is reported by file name; the run then falls back to
the newest checkpoint that verifies, with a warning, or with ``checkpoint.on_damaged=error``
refuses with a ``CheckpointError``. Checkpoints written before ``files.json`` existed are checked
for ``train_state.json`` only.

Loading unpickles nothing but what DeepSpeed's own loader requires: train state is JSON, RNG
states are ``torch.load(weights_only=True)``; a file that still fails to load is named in the error.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from pipeline.atomic_io import atomic_write_text
from pipeline.patches.deepspeed import frozen_experts_saveable
from pipeline.train_state import capture_rng, restore_rng

LATEST = "latest"
FILE_LIST = "files.json"
BUFFERS = "buffers.pt"  # the model's persistent buffers (rank 0; pipeline/engine/checkpoint.py)
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_NAME = re.compile(r"^(\.old-)?step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint with a missing, truncated or altered file; ``file`` is the first bad one found."""

    def __init__(self, file: Path, why: str):
        super().__init__(f"{file}: {why}")
        self.file = file
        self.why = why


class CheckpointWarning(UserWarning):
    """Resuming skipped a damaged or missing checkpoint and fell back to an older complete one."""


@dataclass
class Layout:
    """How a run is laid out: processes, tensor- and data-parallel sizes, micro-batches per rank
    per step, sequences per micro-batch (global batch = dp * grad_accum * micro_batch), and the
    expert-parallel size (a model with experts; carved out of the DP ranks)."""

    world: int
    tp: int
    dp: int
    grad_accum: int = 1
    micro_batch: int = 0
    ep: int = 1


def _fsync_write(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _fsync_dir(path: Path) -> None:
    # a rename is durable only once the directory holding it is flushed
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at ``step`` (``step-000100``)."""
    return f"step-{step:06d}"


# ------------------------------------------------------------ file list (files.json)
def file_sha256(path: Path, fsync: bool = False) -> str:
    """sha256 of a file, read in chunks (checkpoint files can be many GB)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if fsync:  # the save hashes each file once anyway; flushing it here makes it durable too
            os.fsync(f.fileno())
    return digest


def _checkpoint_files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != FILE_LIST
    )


def write_file_list(root: Path, entries: dict[str, dict[str, Any]] | None = None) -> None:
    """Write ``root/files.json`` (fsynced): size and sha256 of every file under ``root``.

    ``entries`` (relative path -> {"size", "sha256"}) are used as given, e.g. hashed by several
    ranks; without them every file is hashed here."""
    if entries is None:
        entries = {rel: _describe(root / rel) for rel in _checkpoint_files(root)}
    _fsync_write(root / FILE_LIST, json.dumps({"version": 1, "files": entries}, indent=1, sort_keys=True))


def _describe(path: Path, fsync: bool = False) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": file_sha256(path, fsync=fsync)}


def _write_file_list_collective(root: Path, phase: Callable[..., Any] | None = None) -> None:
    """Every rank hashes a share of the files (rank 0 lists them); rank 0 writes ``files.json``.

    ``phase`` (the save's, see :func:`_save_phase`) runs each part that writes, so a failure on
    any rank (an fsync finding the disk full) ends the save on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    phase = phase or (lambda work, rank0=False: work() if rank == 0 or not rank0 else None)
    names: list[Any] = [_checkpoint_files(root) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    mine = phase(lambda: {rel: _describe(root / rel, fsync=True) for rel in names[0][rank::world]})
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, mine)
    phase(lambda: write_file_list(root, {k: v for share in shares for k, v in share.items()}), rank0=True)


def verify_checkpoint(path: Path, hashes: bool = True, required: str = "train_state.json") -> None:
    """Raise ``DamagedCheckpoint`` naming the first file of ``path`` that is missing, of the wrong
    size or (with ``hashes``) of the wrong sha256 according to its ``files.json``.

    ``files.json`` must list ``required``. A checkpoint without ``files.json`` (written before it
    existed) needs a readable ``train_state.json`` only."""
    if not path.is_dir():
        raise DamagedCheckpoint(path, "the checkpoint folder does not exist")
    listing = path / FILE_LIST
    if not listing.is_file():
        _read_json(path / "train_state.json")
        return
    files = _read_json(listing).get("files")
    if not isinstance(files, dict) or required not in files:
        raise DamagedCheckpoint(listing, f"expected a 'files' mapping that lists {required}")
    for rel, want in sorted(files.items()):
        file = path / rel
        if not (isinstance(want, dict) and isinstance(want.get("size"), int) and "sha256" in want):
            raise DamagedCheckpoint(listing, f"expected size and sha256 for {rel}, found {want!r}")
        if not file.is_file():
            raise DamagedCheckpoint(file, f"missing (listed in {FILE_LIST} with {want['size']} bytes)")
        size = file.stat().st_size
        if size != want["size"]:
            raise DamagedCheckpoint(
                file, f"{size} bytes, {FILE_LIST} says {want['size']} (truncated or rewritten)"
            )
        if hashes and file_sha256(file) != want["sha256"]:
            raise DamagedCheckpoint(
                file, f"sha256 differs from {FILE_LIST} (same size, different content: the file was altered)"
            )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpoint(path, "missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedCheckpoint(path, f"expected a JSON file, could not read it ({exc})") from exc


# ------------------------------------------------------------ choosing a checkpoint
def _step_of(path: Path) -> int:
    m = _NAME.match(path.name)
    return int(m.group(2)) if m else -1


def _on_disk(ckpt_dir: Path) -> list[Path]:
    """Published checkpoints and ``.old-`` copies, newest step first (a published one before its copy)."""
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name) and p.is_dir()] if ckpt_dir.is_dir() else []
    return sorted(found, key=lambda p: (-_step_of(p), p.name.startswith(OLD_PREFIX)))


def _pick(ckpt_dir: Path, hashes: bool) -> tuple[Path | None, list[str], bool]:
    """(checkpoint to use, problems met on the way, whether it is the one ``latest`` points at)."""
    problems: list[str] = []
    pointer = ckpt_dir / LATEST
    named: str | None = None
    if pointer.is_file():
        named = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if not _NAME.match(named) or named.startswith(OLD_PREFIX):
            problems.append(f"{pointer}: expected a checkpoint name like step-000100, found {named[:60]!r}")
            named = None
    on_disk = _on_disk(ckpt_dir)
    if named is None and not on_disk:
        return None, problems, True
    if named is None and not problems:
        # No pointer yet (a kill after the first rename, before `latest` was written): the newest
        # checkpoint is complete by construction, so it is what `latest` would have named.
        named = on_disk[0].name.removeprefix(OLD_PREFIX)
    if named is not None:
        target, aside = ckpt_dir / named, ckpt_dir / f"{OLD_PREFIX}{named}"
        if not target.exists() and aside.is_dir():
            # killed between the two renames of a re-save: the copy set aside is the published one
            target = aside
        try:
            verify_checkpoint(target, hashes=hashes)
            return target, problems, not problems
        except DamagedCheckpoint as exc:
            if not target.exists():
                problems.append(f"{pointer} names {named}, which does not exist")
            else:
                problems.append(str(exc))
        tried = {ckpt_dir / named, ckpt_dir / f"{OLD_PREFIX}{named}"}
    else:
        tried = set()
    for path in on_disk:
        if path in tried:
            continue
        try:
            verify_checkpoint(path, hashes=hashes)
            return path, problems, False
        except DamagedCheckpoint as exc:
            problems.append(str(exc))
    return None, problems, False


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint a resume would start from, judged by file sizes only (cheap, no warnings);
    None when there is none. For messages; resuming uses ``select_checkpoint``."""
    return _pick(ckpt_dir, hashes=False)[0]


def select_checkpoint(ckpt_dir: Path, on_damaged: Literal["fallback", "error"] = "fallback") -> Path | None:
    """The verified checkpoint to resume from, or None when ``ckpt_dir`` holds none.

    The one ``latest`` names is verified (sizes and sha256). If it is missing or damaged: with
    ``on_damaged="fallback"`` the newest checkpoint that verifies is returned and a
    ``CheckpointWarning`` names the bad file and why; with ``"error"`` a ``CheckpointError`` does.
    Checkpoints exist but none verifies: ``CheckpointError`` (starting over would overwrite them)."""
    path, problems, as_named = _pick(ckpt_dir, hashes=True)
    found = "; ".join(problems)
    if path is None and problems:
        raise CheckpointError(
            f"{ckpt_dir}: no complete checkpoint to resume from ({found}). Restore the files, or move "
            "the checkpoints away to start over (or set checkpoint.resume=false)"
        )
    if as_named or path is None:
        return path
    if on_damaged == "error":
        raise CheckpointError(
            f"{found}. Refusing to resume (checkpoint.on_damaged=error); {path.name} is the newest complete "
            f"checkpoint: set checkpoint.on_damaged=fallback to resume from it, or restore the damaged files"
        )
    warnings.warn(
        f"{found}; resuming from {path.name}, the newest complete checkpoint", CheckpointWarning, stacklevel=2
    )
    return path


def find_resume_checkpoint(
    ckpt_dir: Path, on_damaged: Literal["fallback", "error"] = "fallback"
) -> Path | None:
    """Collective ``select_checkpoint``: rank 0 verifies and chooses, every rank gets the same
    answer (or raises the same ``CheckpointError``)."""

    def choose() -> str | None:
        path = select_checkpoint(ckpt_dir, on_damaged)
        return None if path is None else str(path)

    value = on_rank0(choose)
    return None if value is None else Path(value)


def on_rank0(work: Callable[[], Any]) -> Any:
    """Collective: ``work()`` on rank 0 only (a choice, a conversion), its result on every rank;
    a ``CheckpointError`` it raises is raised on every rank, with the same message."""
    answer: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            answer[0] = ("ok", work())
        except CheckpointError as exc:
            answer[0] = ("error", str(exc))
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise CheckpointError(value)
    return value


# ------------------------------------------------------------ save
def _sweep(ckpt_dir: Path) -> None:
    """Clear what a killed save left behind (rank 0, before a save)."""
    for stale in ckpt_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in ckpt_dir.glob(f".{LATEST}.tmp-*"):  # a pointer write cut short
        stale.unlink(missing_ok=True)
    for old in ckpt_dir.glob(f"{OLD_PREFIX}step-*"):
        current = ckpt_dir / old.name[len(OLD_PREFIX) :]
        if not current.exists():
            os.replace(old, current)  # killed between the two renames: this is the only copy
            continue
        try:
            verify_checkpoint(current, hashes=False)
        except DamagedCheckpoint:
            continue  # keep the old copy while its replacement is incomplete; resume can fall back to it
        shutil.rmtree(old, ignore_errors=True)


def _publish(ckpt_dir: Path, tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` and repoint ``latest``; an existing ``final`` is deleted last."""
    aside = ckpt_dir / f"{OLD_PREFIX}{final.name}"
    if final.exists():
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    _fsync_write(ckpt_dir / LATEST, final.name + "\n")
    _fsync_dir(ckpt_dir)
    if aside.exists():
        shutil.rmtree(aside)


def save_checkpoint(
    engine,
    ckpt_dir: Path,
    step: int,
    train_state: dict[str, Any],
    data_states: list[dict[str, Any]],
    keep: int,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    ``data_states`` holds this rank's loader state(s); rank 0 gathers those of every
    data-parallel rank into ``train_state.json``.

    A write that fails on any rank (a full disk, a quota, an I/O error) ends the save on every
    rank after the step that failed: the partial ``.tmp-step-*`` is removed, the checkpoints
    already published are untouched, and every rank raises a ``CheckpointError`` naming the
    checkpoint directory and the cause ("no space left on device"). Errors that are bugs of ours
    are re-raised as they are. (A rank failing inside DeepSpeed's own save, before its closing
    barrier, while the others succeed, leaves them in that barrier: the shared file system
    failing for everyone is the case handled.)
    """
    rank = dist.get_rank()
    name = checkpoint_name(step)
    final, tmp = ckpt_dir / name, ckpt_dir / f"{TMP_PREFIX}{name}"

    def phase(work: Callable[[], Any], rank0: bool = False) -> Any:
        return _save_phase(work, ckpt_dir, tmp, rank0)

    phase(lambda: _prepare(ckpt_dir), rank0=True)  # doubles as the barrier before writing
    phase(lambda: _write_rank_files(engine, tmp, rank))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, data_states)
    text = json.dumps(dict(train_state, step=step, data=gathered), indent=2, sort_keys=True)
    phase(lambda: _fsync_write(tmp / "train_state.json", text), rank0=True)
    _write_file_list_collective(tmp, phase)
    phase(lambda: _publish_and_prune(ckpt_dir, tmp, final, keep), rank0=True)
    return final


def _prepare(ckpt_dir: Path) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _sweep(ckpt_dir)


def persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's persistent buffers (state outside the optimizer, e.g. a router's balancing bias),
    the same on every rank."""
    out = {}
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf.detach().cpu().clone()
    return out


def restore_buffers(model: torch.nn.Module, checkpoint: Path) -> int:
    """Copy ``checkpoint``'s saved persistent buffers into ``model`` (DeepSpeed's universal load
    restores parameters only); returns how many. ``CheckpointError`` naming a missing one."""
    file = checkpoint / BUFFERS
    saved = torch.load(file, weights_only=True) if file.is_file() else {}
    mine = dict(model.named_buffers())
    wanted = persistent_buffers(model)
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise CheckpointError(f"{file}: holds no {missing[0]} (written before the model had it)")
    with torch.no_grad():
        for name in wanted:
            mine[name].copy_(saved[name])
    return len(wanted)


def _write_rank_files(engine, tmp: Path, rank: int) -> None:
    """This rank's part of the checkpoint: DeepSpeed's files and its RNG states (and, on rank 0,
    the model's persistent buffers)."""
    with frozen_experts_saveable(engine):  # outer LoRA on a MoE base: experts frozen
        engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    buffers = persistent_buffers(engine.module)
    if rank == 0 and buffers:
        torch.save(buffers, tmp / BUFFERS)
    tensors, meta = capture_rng()
    (tmp / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(tensors, tmp / "rng" / f"rank-{rank:05d}.pt")
    (tmp / "rng" / f"rank-{rank:05d}.json").write_text(json.dumps(meta))


def _publish_and_prune(ckpt_dir: Path, tmp: Path, final: Path, keep: int) -> None:
    _publish(ckpt_dir, tmp, final)
    done = sorted((p for p in ckpt_dir.glob("step-*") if (p / "train_state.json").is_file()), key=_step_of)
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


# A write failing for lack of room leaves (next to) nothing free; torch's writer says only
# "unexpected pos" or "file write failed", so the file system is asked.
_FULL_BELOW_BYTES = 64 * 2**20
_NO_ROOM = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _failure(exc: BaseException, where: Path) -> dict[str, Any]:
    """What a rank reports of its failed save step: its text, whether it is the file system's
    (an OSError, or torch's writer failing on a full disk), and "no space left" when it is."""
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    room = next((_NO_ROOM[x.errno] for x in chain if isinstance(x, OSError) and x.errno in _NO_ROOM), None)
    if room is None and any("no space left on device" in str(x).lower() for x in chain):
        room = _NO_ROOM[errno.ENOSPC]
    file_system = room is not None or isinstance(exc, OSError)
    file = next((x.filename for x in chain if isinstance(x, OSError) and x.filename), None)
    detail = f"writing {file}" if file else f"{type(exc).__name__}: {exc}"
    if room is None and isinstance(exc, OSError | RuntimeError):
        free = _free_bytes(where)
        if free < _FULL_BELOW_BYTES:
            room, file_system = _NO_ROOM[errno.ENOSPC], True
            detail = f"{free} bytes free after a failed write"
    return {
        "rank": dist.get_rank(),
        "text": f"{type(exc).__name__}: {exc}",
        "room": room,
        "fs": file_system,
        "detail": detail,
    }


def _free_bytes(where: Path) -> int:
    path = next((p for p in (where, *where.parents) if p.exists()), Path("/"))
    try:
        st = os.statvfs(path)
    except OSError:
        return 2**62
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use the reserved blocks
    return blocks * st.f_frsize


def _save_phase(work: Callable[[], Any], ckpt_dir: Path, tmp: Path, rank0: bool = False) -> Any:
    """Collective: ``work()`` on every rank (on rank 0 only with ``rank0``), then all agree whether
    it failed anywhere. If it did, rank 0 removes ``tmp`` and every rank raises (see
    :func:`save_checkpoint`)."""
    mine, error, result = None, None, None
    try:
        if dist.get_rank() == 0 or not rank0:
            result = work()
    except Exception as exc:
        error, mine = exc, _failure(exc, tmp)  # judged before the partial files are removed
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    failed = [r for r in reports if r is not None]
    if not failed:
        return result
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if not all(r["fs"] for r in failed):
        if error is not None and not mine["fs"]:
            raise error
        first = next(r for r in failed if not r["fs"])
        raise RuntimeError(f"saving {tmp.name} failed on rank {first['rank']}: {first['text']}")
    first = next((r for r in failed if r["room"]), failed[0])
    cause = f"{first['room']} (rank {first['rank']}: {first['detail']})" if first["room"] else first["text"]
    previous = latest_checkpoint(ckpt_dir)
    kept = (
        f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
    )
    raise CheckpointError(
        f"{ckpt_dir}: {cause} while saving {tmp.name.removeprefix(TMP_PREFIX)}; {kept}, any partial "
        f"{tmp.name} was removed. Free space (or lower checkpoint.keep) and resume"
    )


# ------------------------------------------------------------ load
def _not_zip_archives(folder: Path) -> list[Path]:
    """``.pt`` files under ``folder`` that are not complete zip archives (torch.save's format):
    the usual result of a truncated write, which torch reports without the file's name."""
    return [p for p in sorted(folder.rglob("*.pt")) if not zipfile.is_zipfile(p)]


def check_dataset(path: Path, state: dict[str, Any], manifest_sha256: str) -> None:
    """The checkpoint at ``path`` must have been written for this dataset (the same manifest)."""
    if state.get("manifest_sha256") != manifest_sha256:
        raise CheckpointError(
            f"{path}: written for a dataset with manifest sha256 {str(state.get('manifest_sha256'))[:12]}…, this "
            f"run's dataset has {manifest_sha256[:12]}…; the data position would not mean the same samples"
        )


def load_engine_state(engine, source: Path, repairs: contextlib.AbstractContextManager | None = None) -> None:
    """Collective: DeepSpeed's checkpoint under ``source/ds`` into ``engine`` (model, optimizer, LR
    schedule), inside ``repairs`` when given. Its errors become a ``CheckpointError`` naming the
    file (a truncated ``.pt`` by name: torch's own message does not say which)."""
    try:
        with repairs or contextlib.nullcontext():
            load_path, _ = engine.load_checkpoint(
                str(source), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True
            )
    except Exception as exc:
        bad = _not_zip_archives(source / "ds")
        where = (", ".join(map(str, bad)) + " (not a complete torch file)") if bad else str(source / "ds")
        raise CheckpointError(
            f"{where}: DeepSpeed could not load the checkpoint: {type(exc).__name__}: {exc}"
        ) from exc
    if load_path is None:
        raise CheckpointError(f"{source}: DeepSpeed found no checkpoint under tag 'ds'")


def load_checkpoint(engine, path: Path, state: dict[str, Any], manifest_sha256: str) -> dict[str, Any]:
    """Collective: a checkpoint written at this run's layout: engine and every rank's RNG states
    as written. Returns its train state (``train_state.json``); the caller restores the data
    stream. (A resume at another layout: pipeline/engine/elastic.py.)"""
    check_dataset(path, state, manifest_sha256)
    load_engine_state(engine, path)
    rank = dist.get_rank()
    rng_file = path / "rng" / f"rank-{rank:05d}.pt"
    try:
        tensors = torch.load(rng_file, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{rng_file}: could not load the RNG state: {type(exc).__name__}: {exc}"
        ) from exc
    restore_rng(tensors, _read_json(path / "rng" / f"rank-{rank:05d}.json"))
    return state
