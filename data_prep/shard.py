"""Build a dataset: corpus -> tokenizer -> tokens (all cores) -> packed sequences -> WebDataset shards.

    python -m data_prep.prepare --config configs/data/sample.yaml corpus='[my/*.jsonl]' out_dir=data/mine

Layout written under ``out_dir``::

    tokenizer.model            sentencepiece model (its sha256 is in the manifest), or
    tokenizer.json             a given Hugging Face tokenizer (tokenizer.model=path/tokenizer.json),
    tokenizer_config.json        with its special tokens / chat template (both hashed)
    shards/train-00000.tar     WebDataset shards; each sample: __key__ "s<seq index>", tokens.npy
    shards/val-00000.tar       held-out split (whole documents, chosen by a seeded hash)
    manifest.json              written last, atomically: a dataset without it is not ready
    .work/                     token cache and build state, so a re-run skips finished work

Documents are joined with EOS between them and cut into ``seq_len`` sequences, which are
shuffled (seeded) across the shards. Each split's shards hold exactly the same number of
sequences (the remainder is dropped and reported), so every rank of a data-parallel world
whose size divides the shard count reads the same number of batches.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_prep.corpus import CorpusStats, Document, iter_documents, resolve_inputs
from data_prep.sample_corpus import sample_documents
from data_prep.tokenizer import sample_lines, train_tokenizer
from pipeline.dataset import to_dict
from pipeline.dataset.manifest import (
    DatasetError,
    Manifest,
    ShardInfo,
    SplitInfo,
    build_manifest,
    load_manifest,
    write_manifest,
)
from pipeline.dataset.prep_config import SAMPLE_CORPUS, PrepConfig
from pipeline.dataset.tokenizer import (
    SENTENCEPIECE_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_JSON,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    sha256_file,
)

# Every tokenizer file a build may write into out_dir (one kind at a time).
_TOKENIZER_FILES = (SENTENCEPIECE_FILE, TOKENIZER_JSON, TOKENIZER_CONFIG_FILE)
_BATCH_CHARS = 1 << 20  # text handed to a worker per task
_HASH_LIMIT = 256 << 20  # inputs up to this size are identified by content hash
_SHARD_NAME = re.compile(r"^(train|val)-\d{5}\.tar$")


class DatasetPrepError(ValueError):
    """A dataset build that cannot proceed; the message says which file/key and what to do."""


# ---------------------------------------------------------------- helpers


def _is_val(seed: int, doc_index: int, fraction: float) -> bool:
    """Seeded, order-stable assignment of whole documents to the held-out split."""
    if fraction <= 0.0:
        return False
    h = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _check_shard(path: Path, rec: dict[str, Any]) -> str | None:
    """None when ``path`` has the size and sha256 recorded in ``rec``, else what is wrong."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != rec["bytes"]:
        return f"{size:,} bytes, recorded {rec['bytes']:,} (truncated or overwritten)"
    digest = sha256_file(path)
    if digest != rec["sha256"]:
        return f"sha256 {digest}, recorded {rec['sha256']} (contents changed)"
    return None


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _stored_sha256(path: Path) -> str | None:
    """The sha256 of the tokenizer stored at ``path`` (as the manifest records it), None when it
    is missing or does not load."""
    if not path.is_file():
        return None
    try:
        return load_tokenizer(path).sha256
    except TokenizerError:
        return None


# ---------------------------------------------------------------- tokenising (worker processes)

_WORKER: dict[str, Any] = {}


# Signals a pool worker must not inherit handlers for: under submitit the job process bypasses
# SIGTERM (it only logs it) and checkpoints on SIGUSR2; a forked worker with those handlers
# survives Pool.terminate() and the parent waits on it for ever.
_WORKER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


def _init_worker(model_path: str, dtype: str) -> None:
    for sig in _WORKER_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)  # the default: the signal ends the worker
    tok = load_tokenizer(model_path)
    _WORKER.update(tok=tok, dtype=np.dtype(dtype))


def _encode_with(
    tok: Tokenizer, batch: list[tuple[int, str]], dtype: np.dtype, batched: bool = True
) -> list[tuple[int, np.ndarray]]:
    """Encode documents; each result is the document's ids followed by EOS. ``batched=False``
    encodes one at a time (a tokenizer.json then never starts its thread pool)."""
    texts = [text for _, text in batch]
    encoded = tok.encode_batch(texts) if batched else [tok.encode(t) for t in texts]
    out = []
    for (idx, _), ids in zip(batch, encoded, strict=True):
        arr = np.empty(len(ids) + 1, dtype=dtype)
        arr[:-1] = ids
        arr[-1] = tok.eos_id
        out.append((idx, arr))
    return out


def _encode_batch(batch: list[tuple[int, str]]) -> list[tuple[int, np.ndarray]]:
    """A worker process's task (after :func:`_init_worker`)."""
    return _encode_with(_WORKER["tok"], batch, _WORKER["dtype"])


def _batches(docs: Iterator[Document]) -> Iterator[list[tuple[int, str]]]:
    batch: list[tuple[int, str]] = []
    size = 0
    for idx, doc in enumerate(docs):
        batch.append((idx, doc.text))
        size += len(doc.text)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_documents(
    docs: Iterator[Document], model_path: Path, dtype: np.dtype, workers: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Encode documents in order, keeping a bounded number of batches in flight: with ``workers``
    processes (sentencepiece), or ``workers`` threads of the tokenizer library's own pool
    (tokenizer.json: no fork, so none after its threads started)."""
    tok = load_tokenizer(model_path)
    if workers <= 1:
        for batch in _batches(docs):
            yield from _encode_with(tok, batch, dtype, batched=False)
        return
    if tok.multithreaded:
        yield from _encode_threaded(tok, docs, dtype, workers)
        return
    yield from _encode_forked(docs, model_path, dtype, workers)


def _encode_forked(
    docs: Iterator[Document], model_path: Path, dtype: np.dtype, workers: int
) -> Iterator[tuple[int, np.ndarray]]:
    """``workers`` forked processes (sentencepiece), at most ``4 * workers`` batches in flight.

    The pool is closed and joined when all is done: its workers get the end-of-work sentinel and
    exit. ``Pool.terminate()`` (what ``with Pool() as pool`` does on exit) is for errors only: it
    signals the workers, which may be waiting on the task queue's lock, and then joins them."""
    # fork: workers inherit the imports and need no `if __name__ == "__main__"` guard in callers;
    # nothing threaded (torch, OpenMP) is started by data_prep before this point.
    ctx = mp.get_context("fork")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(str(model_path), dtype.name))
    try:
        pending: deque = deque()
        for batch in _batches(docs):
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) >= 4 * workers:  # bound memory: never queue the whole corpus
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()
    except BaseException:  # an error, or the consumer stopped early (GeneratorExit)
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()


def _encode_threaded(
    tok: Tokenizer, docs: Iterator[Document], dtype: np.dtype, workers: int
) -> Iterator[tuple[int, np.ndarray]]:
    """tokenizer.json: one batch is encoded (the library releases the GIL and runs on its thread
    pool, ``RAYON_NUM_THREADS`` = ``workers`` unless set) while this thread reads the next."""
    os.environ.setdefault("RAYON_NUM_THREADS", str(workers))  # read when the pool first starts
    with ThreadPoolExecutor(1) as pool:
        pending: deque = deque()
        for batch in _batches(docs):
            pending.append(pool.submit(_encode_with, tok, batch, dtype))
            if len(pending) >= 2:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


# ---------------------------------------------------------------- the build


class _Build:
    def __init__(self, cfg: PrepConfig, progress: bool, sample_cache: Path | None):
        self.cfg = cfg
        self.progress = progress
        self.out = Path(cfg.out_dir)
        self.work = self.out / ".work"
        self.shard_dir = self.out / "shards"
        self.sample_cache = sample_cache
        self.workers = cfg.workers or os.cpu_count() or 1
        self.verified: set[str] = set()  # shards whose size and sha256 were checked in this run

    # inputs ---------------------------------------------------------
    def resolve(self) -> list[tuple[Path, str]]:
        inputs: list[tuple[Path, str]] = []
        user = [c for c in self.cfg.corpus if c != SAMPLE_CORPUS]
        if SAMPLE_CORPUS in self.cfg.corpus:
            inputs.append((sample_documents(self.sample_cache, progress=self.progress), "text"))
        if user:
            inputs.extend((p, self.cfg.text_field) for p in resolve_inputs(user))
        return inputs

    def fingerprint(self, inputs: list[tuple[Path, str]]) -> str:
        """Identity of the build: config (minus knobs that do not change output) + input files."""
        cfg = to_dict(self.cfg)
        cfg.pop("workers")
        cfg.pop("out_dir")
        for key in [k for k, v in cfg["tokenizer"].items() if k.endswith("_token") and v is None]:
            del cfg["tokenizer"][key]  # unset special tokens: the fingerprint of builds made before them
        files = []
        for path, text_field in inputs:
            st = path.stat()
            # Content hash where cheap (a re-fetched sample corpus keeps its identity); size +
            # mtime for big files, where hashing would cost a full extra read of the corpus.
            ident = sha256_file(path) if st.st_size <= _HASH_LIMIT else f"{st.st_size}:{st.st_mtime_ns}"
            files.append([str(path.resolve()), ident, text_field])
        blob = json.dumps({"config": cfg, "files": files}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def check_state(self, fingerprint: str) -> dict[str, Any]:
        """The build state for ``fingerprint``: resumed, fresh, or an error for a foreign dataset.

        A finished dataset (``manifest.json`` present) of another config or corpus is refused.
        An unfinished build of another one (a failed or interrupted run, e.g. stopped by a bad
        corpus line that the user has since fixed) is discarded, so the corrected command runs.
        """
        state_path = self.work / "state.json"
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            if state.get("fingerprint") == fingerprint:
                return state
            if (self.out / "manifest.json").exists():
                raise DatasetPrepError(
                    f"{self.out}: was prepared from a different config or corpus; choose another out_dir "
                    "or delete this one to rebuild"
                )
            print(f"note: {self.out}: discarding an unfinished build from another config or corpus")
            self.discard_unfinished()
        if (self.out / "manifest.json").exists():
            raise DatasetPrepError(f"{self.out}: holds a dataset without build state; choose another out_dir")
        state = {"fingerprint": fingerprint}
        self.work.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(state_path, state)
        return state

    def save_state(self, state: dict[str, Any]) -> None:
        _atomic_write_json(self.work / "state.json", state)

    def discard_unfinished(self) -> None:
        """Remove what an unfinished build wrote (only the files this module names)."""
        shutil.rmtree(self.work, ignore_errors=True)
        for name in _TOKENIZER_FILES:
            (self.out / name).unlink(missing_ok=True)
        if self.shard_dir.is_dir():
            for p in self.shard_dir.iterdir():
                if _SHARD_NAME.match(p.name) or ".tmp-" in p.name:
                    p.unlink()

    def damaged_shards(self, manifest: Manifest, state: dict[str, Any]) -> dict[str, str]:
        """``{shard: why}`` for every shard of ``manifest`` whose size or sha256 is not what the
        build recorded; also forgets their records so that :meth:`write_split` rewrites them."""
        done: dict[str, dict[str, Any]] = state.setdefault("shards", {})
        damaged = {}
        for split in manifest.splits.values():
            for sh in split.shards:
                rec = done.get(sh.path)
                if rec is None or (rec["sha256"], rec["bytes"]) != (sh.sha256, sh.bytes):
                    damaged[sh.path] = "its manifest entry differs from the build record"
                    done.pop(sh.path, None)
                    continue
                why = _check_shard(self.out / sh.path, rec)
                if why is None:
                    self.verified.add(sh.path)
                else:
                    damaged[sh.path] = why
                    done.pop(sh.path)
        return damaged

    # tokenizer --------------------------------------------------------
    def tokenizer(self, inputs: list[tuple[Path, str]], state: dict[str, Any]) -> Tokenizer:
        dest = self.out / SENTENCEPIECE_FILE
        tcfg = self.cfg.tokenizer
        if tcfg.model is not None:
            # validates the special tokens, names the file; a tokenizer.json's given special
            # tokens are written into the dataset's tokenizer_config.json (self-describing copy)
            given = load_tokenizer(tcfg.model, special_tokens=tcfg.special_tokens())
            dest = self.out / given.file_name
            if _stored_sha256(dest) != given.sha256:
                for name in _TOKENIZER_FILES:  # one tokenizer per dataset: drop the other kind's
                    (self.out / name).unlink(missing_ok=True)
                given.save(self.out)
            return load_tokenizer(dest)
        for name in (TOKENIZER_JSON, TOKENIZER_CONFIG_FILE):
            (self.out / name).unlink(missing_ok=True)
        if (
            state.get("tokenizer_sha256")
            and dest.is_file()
            and sha256_file(dest) == state["tokenizer_sha256"]
        ):
            return load_tokenizer(dest)
        stats = CorpusStats()
        lines = sample_lines(
            (d.text for d in iter_documents(inputs, stats)), tcfg.max_sentences, self.cfg.seed, self.progress
        )
        tok = train_tokenizer(
            lines,
            tcfg,
            dest,
            threads=self.workers,
            source=", ".join(str(p) for p, _ in inputs[:3]),
            progress=self.progress,
        )
        state["tokenizer_sha256"] = tok.sha256
        self.save_state(state)
        return tok

    # tokens -------------------------------------------------------------
    def tokenise(
        self, inputs: list[tuple[Path, str]], tok: Tokenizer, state: dict[str, Any]
    ) -> dict[str, Any]:
        cached = state.get("tokens", {})
        if cached.get("tokenizer_sha256") == tok.sha256 and all(
            (self.work / f"{s}.bin").is_file() for s in ("train", "val")
        ):
            return cached
        dtype = _token_dtype(tok.vocab_size)
        stats = CorpusStats()
        counts = {"train": 0, "val": 0}
        docs_per_split = {"train": 0, "val": 0}
        t0 = time.time()
        with (
            open(self.work / "train.bin.tmp", "wb") as train_f,
            open(self.work / "val.bin.tmp", "wb") as val_f,
            tqdm(desc="tokenising", unit="tok", unit_scale=True, disable=not self.progress) as bar,
        ):
            files = {"train": train_f, "val": val_f}
            for idx, ids in encode_documents(iter_documents(inputs, stats), tok.path, dtype, self.workers):
                split = "val" if _is_val(self.cfg.seed, idx, self.cfg.val_fraction) else "train"
                files[split].write(ids.tobytes())
                counts[split] += len(ids)
                docs_per_split[split] += 1
                bar.update(len(ids))
        seconds = time.time() - t0
        for s in files:
            os.replace(self.work / f"{s}.bin.tmp", self.work / f"{s}.bin")
        return self.record_tokens(state, inputs, tok, dtype, counts, docs_per_split, seconds, stats)

    def record_tokens(
        self,
        state: dict[str, Any],
        inputs: list[tuple[Path, str]],
        tok: Tokenizer,
        dtype: np.dtype,
        counts: dict[str, int],
        docs_per_split: dict[str, int],
        seconds: float,
        stats: CorpusStats,
    ) -> dict[str, Any]:
        """Record finished ``.work/{train,val}.bin`` in the build state (shared by the job-array
        build, data_prep/array.py, so that both write the same manifest)."""
        total = counts["train"] + counts["val"]
        info = {
            "tokenizer_sha256": tok.sha256,
            "dtype": dtype.name,
            "tokens": counts,
            "documents": docs_per_split,
            "seconds": seconds,
            "tokens_per_s": total / max(seconds, 1e-9),
            "corpus": {
                "files": [str(p) for p, _ in inputs],
                "documents": stats.documents,
                "empty_documents": stats.empty_documents,
                "replaced_bytes": stats.replaced_bytes,
                "text_bytes": stats.text_bytes,
            },
        }
        if stats.replaced_bytes:
            worst = sorted(stats.per_file_replaced.items(), key=lambda kv: -kv[1])[:3]
            print(
                f"note: replaced {stats.replaced_bytes} undecodable byte sequence(s) with U+FFFD "
                f"(most in {', '.join(f'{f} ({n})' for f, n in worst)})"
            )
        state["tokens"] = info
        state["shards"] = {}
        self.save_state(state)
        return info

    # shards -------------------------------------------------------------
    def write_split(
        self,
        split: str,
        n_shards: int,
        tokens: int,
        dtype: np.dtype,
        state: dict[str, Any],
        documents: dict[str, int] | None = None,
    ) -> SplitInfo:
        L = self.cfg.seq_len
        n_seq = tokens // L
        per_shard = n_seq // n_shards
        if per_shard == 0:
            docs = documents or {}
            held_out = docs.get(split, 0)
            total = sum(docs.values())
            if split == "val" and held_out <= 1:
                # val_fraction holds out whole documents: a tiny corpus may hold out none.
                fix = (
                    f"val_fraction={self.cfg.val_fraction} held out {held_out} of {total} document(s); "
                    "set val_fraction=0 for no held-out split, or add documents"
                )
            elif split == "train" and docs.get("train", 0) == 0:
                fix = (
                    f"val_fraction={self.cfg.val_fraction} put all {total} document(s) in the held-out split "
                    "(it holds out whole documents); set val_fraction=0 or lower it, or add documents"
                )
            else:
                fix = f"lower {split}_shards or seq_len, or add text"
            raise DatasetPrepError(
                f"corpus too small for split '{split}': {tokens:,} tokens make {n_seq} sequences of seq_len={L}, "
                f"fewer than {split}_shards={n_shards}; {fix}"
            )
        # Imported here, not at the top: webdataset imports torch (~2 s), and a job-array task
        # (data_prep/array.py) imports this module only to tokenise.
        import webdataset as wds

        stream = np.memmap(self.work / f"{split}.bin", dtype=dtype, mode="r")
        offset = 1 if split == "val" else 0  # distinct permutations per split from one seed
        order = np.random.default_rng([self.cfg.seed, offset]).permutation(n_seq)[: per_shard * n_shards]
        done: dict[str, dict[str, Any]] = state.setdefault("shards", {})
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        shards = []
        for k in tqdm(
            range(n_shards), desc=f"writing {split} shards", unit="shard", disable=not self.progress
        ):
            rel = f"shards/{split}-{k:05d}.tar"
            path = self.out / rel
            rec = done.get(rel)
            # A shard on disk is kept only with the size and sha256 this build recorded for it.
            if rec is None or (rel not in self.verified and _check_shard(path, rec) is not None):
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                # mtime fixed so a re-run writes byte-identical shards (stable sha256)
                with wds.TarWriter(str(tmp), mtime=0.0) as sink:
                    for seq in order[k * per_shard : (k + 1) * per_shard]:
                        sink.write(
                            {
                                "__key__": f"s{int(seq):010d}",
                                "tokens.npy": np.asarray(stream[seq * L : (seq + 1) * L]),
                            }
                        )
                os.replace(tmp, path)
                rec = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "samples": per_shard}
                done[rel] = rec
                self.save_state(state)
            shards.append(
                ShardInfo(path=rel, sha256=rec["sha256"], bytes=rec["bytes"], samples=rec["samples"])
            )
        return SplitInfo(sequences=per_shard * n_shards, tokens=per_shard * n_shards * L, shards=shards)

    def clean_temporaries(self) -> None:
        for d in (self.out, self.work, self.shard_dir):
            if d.is_dir():
                for p in d.glob(".*.tmp-*"):
                    p.unlink()


TokeniseStep = Callable[["_Build", list[tuple[Path, str]], Tokenizer, dict[str, Any]], dict[str, Any]]


def prepare_dataset(
    cfg: PrepConfig,
    *,
    progress: bool = True,
    sample_cache: Path | None = None,
    tokenise: TokeniseStep | None = None,
) -> Manifest:
    """Build (or finish, or confirm) the dataset described by ``cfg``; returns its manifest.

    Idempotent: a finished dataset is revalidated (every shard's size and sha256 against what
    the build recorded, and the tokenizer's) and returned, after rewriting whatever is damaged;
    an interrupted build resumes at the first missing or damaged shard; an unfinished build of
    another config or corpus (a failed run) is discarded. Deterministic: the same config and
    corpus give byte-identical shards.

    ``tokenise`` replaces the in-process tokenising step (it must leave the same
    ``.work/{train,val}.bin`` and call :meth:`_Build.record_tokens`): data_prep/array.py runs it
    as a job array.
    """
    b = _Build(cfg, progress, sample_cache)
    t_start = time.time()
    inputs = b.resolve()
    fingerprint = b.fingerprint(inputs)
    b.out.mkdir(parents=True, exist_ok=True)
    state = b.check_state(fingerprint)
    if state.get("complete") and (b.out / "manifest.json").is_file():
        # Revalidate, never trust: every shard's size and sha256 (one read of the dataset), and
        # the tokenizer. Damaged files are rebuilt below; the build is deterministic, so the
        # repaired dataset is byte-identical to the one the manifest describes.
        try:
            manifest = load_manifest(b.out)
        except DatasetError as exc:
            damaged: dict[str, str] = {"manifest.json": str(exc)}
        else:
            damaged = b.damaged_shards(manifest, state)
            if _stored_sha256(b.out / manifest.tokenizer_file) != manifest.tokenizer_sha256:
                damaged[manifest.tokenizer_file] = "missing or not the tokenizer the shards were made with"
        if not damaged:
            print(
                f"dataset ready (up to date, sizes and sha256 of {len(b.verified)} shards checked): {b.out}"
            )
            return manifest
        for rel, why in damaged.items():
            print(f"repairing {b.out / rel}: {why}")
        state["complete"] = False
        b.save_state(state)
    b.clean_temporaries()
    tok = b.tokenizer(inputs, state)
    cached = state.get("tokens", {})
    if tokenise is None or (
        cached.get("tokenizer_sha256") == tok.sha256
        and all((b.work / f"{s}.bin").is_file() for s in ("train", "val"))
    ):
        tinfo = b.tokenise(inputs, tok, state)  # or the tokens already there
    else:
        tinfo = tokenise(b, inputs, tok, state)
    dtype = np.dtype(tinfo["dtype"])
    docs = tinfo.get("documents")
    splits = {"train": b.write_split("train", cfg.train_shards, tinfo["tokens"]["train"], dtype, state, docs)}
    if cfg.val_fraction > 0:
        splits["val"] = b.write_split("val", cfg.val_shards, tinfo["tokens"]["val"], dtype, state, docs)
    manifest = build_manifest(
        tok,
        kind="pretrain",
        seq_len=cfg.seq_len,
        dtype=dtype.name,
        splits=splits,
        seed=cfg.seed,
        corpus={
            **tinfo["corpus"],
            "dropped_tokens": {s: tinfo["tokens"][s] - splits[s].tokens for s in splits},
        },
        config=asdict(cfg),
    )
    write_manifest(manifest, b.out)
    state["complete"] = True
    b.save_state(state)
    n_shards = sum(len(s.shards) for s in splits.values())
    mb = sum(sh.bytes for s in splits.values() for sh in s.shards) / 1e6
    tokens = sum(s.tokens for s in splits.values())
    print(
        f"dataset ready: {b.out}  {tokens / 1e6:.2f}M tokens in {sum(s.sequences for s in splits.values()):,} "
        f"sequences of {cfg.seq_len} (train {splits['train'].tokens / 1e6:.2f}M"
        + (f", val {splits['val'].tokens / 1e6:.3f}M" if "val" in splits else "")
        + f"), {n_shards} shards, {mb:.1f} MB, tokenised at {tinfo['tokens_per_s'] / 1e6:.2f}M tokens/s, "
        f"{time.time() - t_start:.1f}s"
    )
    return manifest
