"""Stream token batches from WebDataset shards, split by rank and worker, resumable mid-epoch.

    loader = TokenBatchLoader(DataConfig(path="data/sample", batch_size=8), rank=0, world_size=1)
    for batch in loader:            # endless: epoch after epoch
        batch["tokens"]             # LongTensor [batch_size, seq_len]
        state = loader.state_dict() # goes into the training checkpoint

How the order is made deterministic (and therefore resumable):

* Epoch ``e`` permutes the shard list with ``rng(seed, e)`` (the same permutation on every
  rank); rank ``r`` of ``W`` takes ``shards[r::W]``; logical worker ``l`` of ``N`` takes
  ``rank_shards[l::N]``. Each shard holds the same number of samples (data_prep guarantees
  it), so every rank and worker sees the same number of batches and no collective hangs.
* A worker streams its shards through a shuffle buffer seeded by ``(seed, e, r, l)`` and cuts
  full batches. Global batch ``g`` of the epoch comes from logical worker ``g % N``: torch's
  DataLoader serves workers round-robin, and workers finish in lock-step.
* Resuming at batch ``T`` of epoch ``e``: logical worker ``l`` skips the ``T // N + (l < T % N)``
  batches it already produced, and physical worker ``p`` plays logical worker ``(T + p) % N``
  so the round-robin restarts at exactly the next batch. The state is a few integers.

Shards are checked against the manifest: the size (a stat) before a shard is opened, and the
sha256, computed on the bytes as the tar reader consumes them (no second read), once the shard
has been read to its end. A mismatch is a corrupt shard (:class:`CorruptShardError`, or skipped
and counted with ``on_corrupt_shard: skip``).

A shard path that is a URL (``http(s)://``, ``pipe:<command>``; pipeline/dataset/remote.py) is
streamed with the same checks: its size comes from the HTTP ``Content-Length`` before the first
sample (and the bytes read are counted to the end, for a ``pipe:`` that has no size), and a
dropped connection is retried and resumed at the byte it stopped at, so the hash stays exact.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.config import ConfigError
from pipeline.dataset.manifest import DatasetError, Manifest, load_manifest, verify_manifest
from pipeline.dataset.remote import is_url, locate, open_shard
from pipeline.dataset.seeding import seed_of

STATE_VERSION = 1


class CorruptShardError(DatasetError):
    """A shard that cannot be read, holds fewer/other samples than its manifest entry says, or
    whose size or sha256 differs from it."""


class _HashingReader:
    """Read-through file wrapper: every byte the tar reader consumes also goes into a sha256."""

    def __init__(self, f: Any, name: str):
        self._f = f
        self.name = name
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Hash what the tar reader left unread (the end-of-archive padding)."""
        while self.read(1 << 20):
            pass

    def __repr__(self) -> str:  # webdataset appends the stream to its error messages
        return self.name


@dataclass
class DataConfig:
    """Where the shards are and how to batch them (the ``data`` section of a training config)."""

    path: str = "data/sample"  # a prepared dataset directory (manifest.json, shards/)
    batch_size: int = 8  # sequences per rank per micro-batch
    num_workers: int = 1  # DataLoader worker processes per rank (0 = read in the training process)
    shuffle_buffer: int = 1000  # samples; 0 = no sample shuffle (shard order is still permuted)
    seed: int = 0  # shard order and shuffle buffer (each epoch reshuffles from it)
    on_corrupt_shard: Literal["fail", "skip"] = (
        "fail"  # a shard whose size or sha256 disagrees with the manifest: stop, or skip and count it
    )

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"key 'data.batch_size': got {self.batch_size}, expected >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"key 'data.num_workers': got {self.num_workers}, expected >= 0")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"key 'data.shuffle_buffer': got {self.shuffle_buffer}, expected >= 0")


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs to reproduce its part of one epoch (picklable)."""

    root: str
    shards: tuple[tuple[str, int, int, str], ...]  # (relative path, samples, bytes, sha256) in manifest order
    seq_len: int
    dtype: str
    batch_size: int
    rank: int
    world_size: int
    num_workers: int  # logical workers (>= 1)
    seed: int
    shuffle: bool
    shuffle_buffer: int
    epoch: int
    start_batch: int
    on_corrupt_shard: str
    sft: bool  # samples carry prompt_len.txt

    def worker_shards(self, logical: int) -> list[tuple[str, int, int, str]]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = list(np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards)))
        rank_shards = order[self.rank :: self.world_size]
        return [self.shards[i] for i in rank_shards[logical :: self.num_workers]]

    def batches_per_worker(self) -> int:
        samples = sum(shard[1] for shard in self.worker_shards(0))
        return samples // self.batch_size


class _ShardStream(IterableDataset):
    """One epoch of batches for one rank; each DataLoader worker plays one logical worker."""

    def __init__(self, plan: _Plan):
        super().__init__()
        self.plan = plan

    def _read_shard(self, url: str, expected: int, size: int, sha256: str) -> Iterator[dict[str, Any]]:
        """The samples of one shard, checked against the manifest; CorruptShardError otherwise."""
        p = self.plan
        dtype = np.dtype(p.dtype)
        if is_url(url):
            f = open_shard(url)  # retried; its size is the server's Content-Length (None: unknown)
            actual_size = f.size
        else:
            actual_size = os.stat(url).st_size
            f = open(url, "rb")  # noqa: SIM115 - closed by the `with` below
        if actual_size is not None and actual_size != size:
            f.close()
            raise CorruptShardError(
                f"shard {url}: {actual_size:,} bytes, manifest says {size:,} (truncated or replaced; "
                "re-run the dataset build to repair it)"
            )
        count = 0
        with f:
            reader = _HashingReader(f, url)
            for sample in group_by_keys(tar_file_expander([{"url": url, "stream": reader}])):
                raw = sample.get("tokens.npy")
                if raw is None:
                    raise CorruptShardError(f"shard {url}: sample {sample.get('__key__')} has no tokens.npy")
                tokens = np.load(io.BytesIO(raw), allow_pickle=False)
                if tokens.shape != (p.seq_len,) or tokens.dtype != dtype:
                    raise CorruptShardError(
                        f"shard {url}: sample {sample['__key__']} has {tokens.dtype}{list(tokens.shape)}, "
                        f"expected {dtype}[{p.seq_len}]"
                    )
                out = {"tokens": tokens, "index": int(sample["__key__"][1:])}
                if p.sft:
                    try:
                        out["prompt_len"] = int(sample["prompt_len.txt"])
                    except (KeyError, ValueError):
                        raise CorruptShardError(
                            f"shard {url}: SFT sample {sample['__key__']} has no valid prompt_len.txt"
                        ) from None
                count += 1
                yield out
            if count != expected:
                raise CorruptShardError(f"shard {url}: truncated, {count} of {expected} samples")
            # Only a shard read from its first byte to its last can be hashed. Every shard is (a
            # resumed worker re-reads its shards from the start and drops the batches it already
            # produced), except the one a consumer stops in the middle of; that one is checked the
            # next time it is read through. The samples are out before the verdict: the stat above
            # catches truncation and replacement before any sample, the hash a same-size change after.
            reader.drain()
            if reader.bytes != size:  # a stream whose size was not known before reading it
                raise CorruptShardError(
                    f"shard {url}: {reader.bytes:,} bytes read, manifest says {size:,} (truncated or "
                    "replaced; re-run the dataset build to repair it)"
                )
            actual = reader.sha256.hexdigest()
            if actual != sha256:
                raise CorruptShardError(
                    f"shard {url}: sha256 {actual}, manifest says {sha256} (contents changed; "
                    "re-run the dataset build to repair it)"
                )

    def _samples(self, logical: int, skipped: list[int]) -> Iterator[dict[str, Any]]:
        """The samples of this logical worker's shards; a corrupt one fails or is skipped and counted."""
        for rel, expected, size, sha256 in self.plan.worker_shards(logical):
            url = locate(self.plan.root, rel)
            count = 0
            try:
                for sample in self._read_shard(url, expected, size, sha256):
                    count += 1
                    yield sample
            except Exception as exc:
                err = (
                    exc
                    if isinstance(exc, CorruptShardError)
                    else CorruptShardError(
                        f"shard {url}: unreadable after {count} samples ({type(exc).__name__}: {exc})"
                    )
                )
                if self.plan.on_corrupt_shard == "fail":
                    raise err from None
                skipped[0] += 1
                warnings.warn(
                    f"skipping corrupt shard ({err}); this rank now has fewer batches", stacklevel=1
                )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        p = self.plan
        info = get_worker_info()
        physical = info.id if info is not None else 0
        yield from self.worker_batches((p.start_batch + physical) % p.num_workers)

    def worker_batches(self, logical: int) -> Iterator[dict[str, torch.Tensor]]:
        """Logical worker ``logical``'s batches from the plan's ``start_batch`` on, then its report."""
        p = self.plan
        skip = p.start_batch // p.num_workers + (1 if logical < p.start_batch % p.num_workers else 0)
        skipped = [0]  # corrupt shards this logical worker skipped in this epoch so far
        samples: Iterator[dict[str, Any]] = self._samples(logical, skipped)
        if p.shuffle and p.shuffle_buffer > 1:
            seed = seed_of(p.seed, p.epoch, p.rank, logical)
            samples = wds.shuffle(p.shuffle_buffer, initial=p.shuffle_buffer, seed=seed)(samples)
        buf: list[dict[str, Any]] = []
        made = 0
        for sample in samples:
            buf.append(sample)
            if len(buf) < p.batch_size:
                continue
            if made >= skip:  # resumed: batches before `skip` were already consumed
                batch = {
                    "tokens": torch.from_numpy(np.stack([s["tokens"] for s in buf]).astype(np.int64)),
                    "index": torch.tensor([s["index"] for s in buf], dtype=torch.int64),
                    "skipped_shards": torch.tensor(skipped[0]),
                    "worker": torch.tensor(logical),
                }
                if p.sft:
                    lens = torch.tensor([s["prompt_len"] for s in buf], dtype=torch.int64)
                    batch["prompt_mask"] = torch.arange(p.seq_len)[None] < lens[:, None]
                yield batch
            made += 1
            buf = []
        # No batch follows a shard skipped at the end of the worker's list: report the count.
        yield {"skipped_shards": torch.tensor(skipped[0]), "worker": torch.tensor(logical)}

    def rank_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rank's batches in epoch order from ``start_batch`` (what a DataLoader with one
        worker process per logical worker serves), read in this process: the logical workers'
        streams taken round-robin."""
        p = self.plan
        streams = [self.worker_batches((p.start_batch + i) % p.num_workers) for i in range(p.num_workers)]
        while streams:
            for stream in list(streams):
                for batch in stream:
                    if "tokens" in batch:
                        yield batch
                        break
                else:
                    streams.remove(stream)


@dataclass
class _Carry:
    """The rest of an epoch begun at another data-parallel layout (an elastic resume).

    The old layout's ranks were at batches ``next_batch[r]`` of ``end_batch`` in ``epoch``; one
    training step consumed ``old_grad_accum`` batches of every old rank. Global micro-batch slot
    ``k`` of a step (``k = dp_rank * grad_accum + micro``, the same numbering in both layouts)
    held old rank ``k // old_grad_accum``'s batch ``next + step * old_grad_accum + k %
    old_grad_accum``. The new layout gives each slot the same batch, so every global batch of the
    rest of the epoch is the one the old layout would have trained on, and every sample of the
    epoch is read exactly once. ``position`` counts this rank's (step, micro) slots already taken.
    """

    epoch: int
    old_world: int
    old_num_workers: int
    old_grad_accum: int
    new_grad_accum: int
    next_batch: list[int]
    end_batch: int
    position: int = 0

    def slots(self, rank: int) -> Iterator[tuple[int, int, int]]:
        """``(position, old rank, old batch)`` of this rank's remaining carried-over batches, in order.

        A slot lane (one micro index) ends at its first batch past the epoch: lanes only go forward."""
        alive = set(range(self.new_grad_accum))
        c = self.position
        while alive:
            step, micro = divmod(c, self.new_grad_accum)
            if micro in alive:
                k = rank * self.new_grad_accum + micro
                old_rank, offset = divmod(k, self.old_grad_accum)
                batch = self.next_batch[old_rank] + step * self.old_grad_accum + offset
                if batch >= self.end_batch:
                    alive.discard(micro)
                else:
                    yield c, old_rank, batch
            c += 1


class TokenBatchLoader:
    """Endless, resumable stream of ``{"tokens": LongTensor[B, L], "index": LongTensor[B]}`` for one rank.

    ``index`` is each sequence's position in the packed corpus (its shard key), useful for
    checks. SFT datasets (manifest ``kind: sft``) add ``"prompt_mask": BoolTensor[B, L]``
    (True on the prompt, which is never masked). ``state_dict()`` / ``load_state_dict()`` carry the exact position (epoch and batch
    within it); resuming continues with the batch the uninterrupted run would have produced.
    With ``loop=False`` iteration stops at the end of the current epoch (evaluation).
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        loop: bool = True,
        manifest: Manifest | None = None,
        tokenizer_path: str | Path | None = None,
        model_vocab_size: int | None = None,
        model_seq_len: int | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.cfg = cfg
        self.root = Path(cfg.path)
        self.manifest = manifest or load_manifest(self.root)
        if tokenizer_path is not None or model_vocab_size is not None or model_seq_len is not None:
            verify_manifest(
                self.manifest,
                self.root,
                tokenizer_path=tokenizer_path,
                vocab_size=model_vocab_size,
                seq_len=model_seq_len,
                on_corrupt_shard=cfg.on_corrupt_shard,
            )
        info = self.manifest.split(split)
        self.split = split
        self.num_workers = cfg.num_workers
        logical = max(1, cfg.num_workers)
        n = len(info.shards)
        self._check_even_split(info, n, world_size, logical)
        self.rank, self.world_size, self.loop = rank, world_size, loop
        self.epoch = 0
        self.batch_in_epoch = 0
        # Skipped corrupt shards: in finished epochs (and restored from a checkpoint), plus per
        # logical worker in the current epoch (each worker counts from the epoch's start).
        self._skipped_before = 0
        self._skipped_in_epoch = [0] * logical
        self._carry: _Carry | None = None  # the rest of an epoch begun at another DP layout
        self._plan_args = self._plan_arguments(info, logical, shuffle)
        self.batches_per_epoch = logical * self._plan(0, 0).batches_per_worker()
        if self.batches_per_epoch == 0:
            raise DatasetError(
                f"{self.root}: split '{split}' gives a rank {info.samples_per_shard * n // (world_size * logical)} "
                f"samples per worker, fewer than batch_size={cfg.batch_size}"
            )

    def _plan_arguments(self, info, logical: int, shuffle: bool) -> dict[str, Any]:
        cfg, rank, world_size = self.cfg, self.rank, self.world_size
        return dict(
            root=str(self.root),
            shards=tuple((s.path, s.samples, s.bytes, s.sha256) for s in info.shards),
            seq_len=self.manifest.seq_len,
            dtype=self.manifest.dtype,
            batch_size=cfg.batch_size,
            rank=rank,
            world_size=world_size,
            num_workers=logical,
            seed=cfg.seed,
            shuffle=shuffle,
            shuffle_buffer=cfg.shuffle_buffer,
            on_corrupt_shard=cfg.on_corrupt_shard,
            sft=self.manifest.kind == "sft",
        )

    def _check_even_split(self, info, n: int, world_size: int, logical: int) -> None:
        if n % (world_size * logical):
            worlds = info.supported_world_sizes(logical)
            raise DatasetError(
                f"{self.root}: split '{self.split}' has {n} shards, which {world_size} rank(s) x {logical} "
                f"worker(s) cannot share equally (uneven ranks would hang collectives). With num_workers="
                f"{self.cfg.num_workers} supported world sizes are {worlds}; or re-prepare the dataset with "
                f"{self.split}_shards a multiple of {world_size * logical}"
            )

    def _plan(self, epoch: int, start_batch: int) -> _Plan:
        return _Plan(epoch=epoch, start_batch=start_batch, **self._plan_args)

    @property
    def skipped_shards(self) -> int:
        """Corrupt shards skipped so far on this rank (``on_corrupt_shard: skip``), across epochs
        and restored by :meth:`load_state_dict`."""
        return self._skipped_before + sum(self._skipped_in_epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._carry is not None:
            yield from self._carried_batches()
        while True:
            if self.batch_in_epoch >= self.batches_per_epoch:
                if not self.loop:
                    return
                self._skipped_before += sum(self._skipped_in_epoch)
                self._skipped_in_epoch = [0] * len(self._skipped_in_epoch)
                self.epoch += 1
                self.batch_in_epoch = 0
            stream = _ShardStream(self._plan(self.epoch, self.batch_in_epoch))
            loader = DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False
            )
            for batch in loader:
                self._skipped_in_epoch[int(batch.pop("worker"))] = int(batch.pop("skipped_shards"))
                if "tokens" not in batch:
                    continue  # a worker's end-of-epoch report, not a batch
                self.batch_in_epoch += 1
                yield batch
            if self.batch_in_epoch < self.batches_per_epoch:
                # Only skipped (corrupt) shards make an epoch end early; close it and go on.
                self.batch_in_epoch = self.batches_per_epoch
            if not self.loop:
                return

    def _carried_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of the epoch carried over from another layout (see :class:`_Carry`)."""
        carry = self._carry
        assert carry is not None
        readers: dict[int, tuple[Iterator[dict[str, torch.Tensor]], int]] = {}
        slots = list(carry.slots(self.rank))  # a few integers per remaining batch of the epoch
        for i, (position, old_rank, batch) in enumerate(slots):
            stream, at = readers.get(old_rank, (None, -1))
            if stream is None or at > batch:
                plan = _Plan(
                    **{
                        **self._plan_args,
                        "rank": old_rank,
                        "world_size": carry.old_world,
                        "num_workers": carry.old_num_workers,
                    },
                    epoch=carry.epoch,
                    start_batch=batch,
                )
                stream, at = _ShardStream(plan).rank_batches(), batch
            while at < batch:  # another new rank's slot
                next(stream)
                at += 1
            out = next(stream)
            readers[old_rank] = (stream, at + 1)
            for key in ("skipped_shards", "worker"):
                out.pop(key)
            carry.position = position + 1
            if i == len(slots) - 1:
                self._carry = None  # its last batch is out: the state is the next epoch's start
            yield out
        self._carry = None

    @property
    def carrying(self) -> bool:
        """Whether batches still come from an epoch begun at another data-parallel layout."""
        return self._carry is not None

    def state_dict(self) -> dict[str, Any]:
        """The exact stream position: JSON-serialisable, a few integers."""
        logical = max(1, self.num_workers)
        t = self.batch_in_epoch
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "epoch": self.epoch,
            "batch_in_epoch": t,
            "samples_consumed_per_worker": [
                (t // logical + (1 if w < t % logical else 0)) * self.cfg.batch_size for w in range(logical)
            ],
            "seed": self.cfg.seed,
            "num_workers": self.num_workers,
            "batch_size": self.cfg.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "tokenizer_sha256": self.manifest.tokenizer_sha256,
            "num_shards": len(self.manifest.split(self.split).shards),
            "skipped_shards": self.skipped_shards,
            "skipped_shards_in_epoch": list(self._skipped_in_epoch),
            "carry": None if self._carry is None else asdict(self._carry),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; a stream that cannot be reproduced exactly is a clear error."""
        if state.get("version") != STATE_VERSION:
            raise DatasetError(f"data-loader state version {state.get('version')} is not {STATE_VERSION}")
        mine = self.state_dict()
        for key in (
            "split",
            "seed",
            "num_workers",
            "batch_size",
            "rank",
            "world_size",
            "tokenizer_sha256",
            "num_shards",
        ):
            if state.get(key) != mine[key]:
                raise DatasetError(
                    f"cannot resume the data stream exactly: checkpoint has {key}={state.get(key)!r}, this run "
                    f"has {key}={mine[key]!r} (the sample order depends on it; resume with the same value)"
                )
        if not 0 <= state["batch_in_epoch"] <= self.batches_per_epoch:
            raise DatasetError(
                f"data-loader state batch_in_epoch={state['batch_in_epoch']} outside 0..{self.batches_per_epoch}"
            )
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        # The resumed workers re-read the epoch from its start and report their counts from
        # there, replacing the per-worker part; older states carry only the total.
        in_epoch = state.get("skipped_shards_in_epoch")
        if not (isinstance(in_epoch, list) and len(in_epoch) == len(self._skipped_in_epoch)):
            in_epoch = [0] * len(self._skipped_in_epoch)
        self._skipped_in_epoch = [int(n) for n in in_epoch]
        self._skipped_before = int(state.get("skipped_shards", 0)) - sum(self._skipped_in_epoch)
        carry = state.get("carry")
        self._carry = None if carry is None else _Carry(**carry)

    def load_resized_state(self, states: list[dict[str, Any]], old_grad_accum: int, grad_accum: int) -> None:
        """Continue a stream that ``len(states)`` data-parallel ranks (``states[r]`` = rank r's
        :meth:`state_dict`, ``old_grad_accum`` batches each per step) were reading, now that this
        layout reads it with ``grad_accum`` batches per rank per step.

        The same global batch size is required (``len(states) * old_grad_accum == world_size *
        grad_accum``). The rest of the current epoch is carried over slot by slot (:class:`_Carry`);
        the next epoch is split for this layout. A clear ``DatasetError`` when that is impossible."""
        old_world = len(states)
        if old_world * old_grad_accum != self.world_size * grad_accum:
            raise DatasetError(
                f"cannot carry the data stream over: {old_world} rank(s) x grad_accum {old_grad_accum} read "
                f"{old_world * old_grad_accum} micro-batches per step, this layout {self.world_size} x {grad_accum}"
            )
        mine = self.state_dict()
        for r, state in enumerate(states):
            if state.get("version") != STATE_VERSION:
                raise DatasetError(f"data-loader state version {state.get('version')} is not {STATE_VERSION}")
            for key in ("split", "seed", "batch_size", "tokenizer_sha256", "num_shards"):
                if state.get(key) != mine[key]:
                    raise DatasetError(
                        f"cannot resume the data stream exactly: checkpoint has {key}={state.get(key)!r}, this "
                        f"run has {key}={mine[key]!r} (the sample order depends on it; resume with the same value)"
                    )
            if (state.get("rank"), state.get("world_size")) != (r, old_world):
                raise DatasetError(f"data-loader states out of order: entry {r} is rank {state.get('rank')}")
            if state.get("carry") is not None:
                raise DatasetError(
                    "the checkpoint was written while the data stream was still finishing an epoch begun at "
                    "another layout (an earlier resize); resume at its own layout until that epoch ends"
                )
        epochs = {int(state["epoch"]) for state in states}
        if len(epochs) != 1:
            raise DatasetError(
                f"data-parallel ranks were in different epochs {sorted(epochs)}: cannot carry over"
            )
        (epoch,) = epochs
        old_workers = max(1, int(states[0]["num_workers"]))
        end = (
            old_workers
            * _Plan(
                **{**self._plan_args, "rank": 0, "world_size": old_world, "num_workers": old_workers},
                epoch=epoch,
                start_batch=0,
            ).batches_per_worker()
        )
        nxt = [int(state["batch_in_epoch"]) for state in states]
        self.epoch, self.batch_in_epoch = epoch + 1, 0
        self._carry = _Carry(epoch, old_world, old_workers, old_grad_accum, grad_accum, nxt, end)
        if next(self._carry.slots(self.rank), None) is None:
            self._carry = None  # the old layout had finished the epoch (or left nothing for this rank)
        # corrupt shards skipped so far, counted once (on data-parallel rank 0)
        self._skipped_before = (
            sum(int(state.get("skipped_shards", 0)) for state in states) if self.rank == 0 else 0
        )
        self._skipped_in_epoch = [0] * len(self._skipped_in_epoch)
