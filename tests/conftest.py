"""Shared fixtures: small seeded corpora and datasets built with the real data_prep code."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

# Two processes on two cores: one OpenMP thread each, or they oversubscribe (STACK-FACTS).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# MLflow system metrics (a sampling thread per run) are off in tests unless a test turns them on.
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

WORDS = (
    "the a of and to in is was he that it his for with as on be at by had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said "
    "what up its about into than them can only other new some could time these two may then do first any my "
    "now such like our over man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people river stone garden winter lamp castle "
    "letter seven forty 1911 3.14 café naïve"
).split()


def make_text(rng: random.Random, lines: int) -> str:
    """Seeded pseudo-prose: lines of words with punctuation, blank lines between paragraphs."""
    out = []
    for _ in range(lines):
        if rng.random() < 0.1:
            out.append("")
            continue
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        out.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ";"]))
    return "\n".join(out) + "\n"


def write_txt_corpus(root: Path, n_docs: int = 24, seed: int = 0, lines: tuple[int, int] = (20, 60)) -> Path:
    """``n_docs`` .txt files under ``root/corpus``; returns that directory."""
    rng = random.Random(seed)
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (corpus / f"doc{i:03d}.txt").write_text(make_text(rng, rng.randint(*lines)), encoding="utf-8")
    return corpus


def prep_config(out_dir: Path, corpus: list[str], **overrides):
    from pipeline.dataset.prep_config import PrepConfig, TokenizerConfig

    tok = overrides.pop("tokenizer", {})
    base = dict(
        out_dir=str(out_dir),
        corpus=corpus,
        seq_len=32,
        val_fraction=0.1,
        train_shards=8,
        val_shards=2,
        seed=7,
        workers=2,
        tokenizer=TokenizerConfig(**{"vocab_size": 400, **tok}),
    )
    base.update(overrides)
    cfg = PrepConfig(**base)
    cfg.validate()
    return cfg


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A prepared dataset (8 train shards of equal size, 2 val shards) shared by read-only tests."""
    from data_prep.shard import prepare_dataset

    root = tmp_path_factory.mktemp("tiny")
    corpus = write_txt_corpus(root, n_docs=40, seed=1)
    prepare_dataset(prep_config(root / "ds", [str(corpus)]), progress=False)
    return root / "ds"


def require_service(reason: str | None, what: str) -> None:
    """Skip with ``reason`` when a service a test needs (Slurm, Chromium) is missing, but fail under
    CI (``CI=true``), which must provide it: a CI that silently skips would prove nothing."""
    if reason is None:
        return
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must provide {what}: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def world1():
    """A one-process gloo world with megatron's parallel state at TP=1 (shared by the session)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    os.environ["RANK"], os.environ["WORLD_SIZE"] = "0", "1"
    from pipeline.parallel.dims import init_distributed

    return init_distributed(tp=1)


def tiny_model_config(**kw):
    from pipeline.model.config import ModelConfig

    base = dict(vocab_size=300, seq_len=24, d_model=64, n_layers=4, n_heads=4, ffn_hidden=96)
    base.update(kw)
    return ModelConfig(**base)


def tiny_run_overrides(dataset, tracking_root, *extra: str) -> list[str]:
    """Training overrides shared by the Trainer tests: tiny preset, the tiny dataset, batch 4,
    every step logged, MLflow kept under ``tracking_root`` (never the repository's runs/)."""
    return [
        "model_preset=tiny",
        f"data.path={dataset}",
        f"tracking.root={tracking_root}",
        "log_every=1",
        "data.batch_size=4",
        "data.num_workers=0",
        *extra,
    ]


def tiny_trainer_config(dataset, run_dir: Path, *extra: str):
    """The tiny Trainer config of the one-process Trainer tests: 4 steps, checkpoints every 2, no
    eval, ZeRO-3 really partitioning (persistence threshold 0); ``extra`` overrides win."""
    from pipeline.train_config import load_train_config

    return load_train_config(
        None,
        tiny_run_overrides(
            dataset,
            run_dir.parent / "mlruns",
            f"run_dir={run_dir}",
            "steps=4",
            "checkpoint.every=2",
            "eval.every=0",
            "parallel.param_persistence_threshold=0",
            *extra,
        ),
    )


def tiny_job_args(dataset, tmp_path: Path, *extra: str) -> list[str]:
    """``pipeline.train`` arguments for a submitted tiny job writing to ``tmp_path/run``."""
    overrides = tiny_run_overrides(dataset, tmp_path / "mlruns", f"run_dir={tmp_path / 'run'}", *extra)
    return ["--config", "configs/train/ci-tiny.yaml", *overrides]


def export_random_model(
    out: Path, tokenizer: Path, method: str = "memdlm", seed: int = 0, **model_kw
) -> Path:
    """Write an export directory (the layout ``export_model`` writes) for a random-weight tiny model.

    Needs a megatron TP=1 group (the ``world1`` fixture)."""
    import json
    import shutil
    from dataclasses import asdict

    import torch
    from safetensors.torch import save_file

    from pipeline.dataset.tokenizer import load_tokenizer
    from pipeline.diffusion.config import ObjectiveConfig
    from pipeline.memory.config import MemoryConfig
    from tests._models import dense_model

    tok = load_tokenizer(tokenizer)
    cfg = tiny_model_config(**{"vocab_size": tok.vocab_size, "seq_len": 512, **model_kw})
    torch.manual_seed(seed)
    model = dense_model(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous() for k, v in model.named_parameters()}, str(out / "model.safetensors")
    )
    info = {
        "model": asdict(cfg),
        "method": method,
        "memory": asdict(MemoryConfig(enabled=method == "memdlm")),
        "objective": asdict(ObjectiveConfig()),
        "special_ids": tok.special_ids(),
        "step": 0,
    }
    (out / "config.json").write_text(json.dumps(info, indent=2))
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_dataset, world1) -> Path:
    """A random-weight tiny MemDLM export (seq_len 512) with the tiny dataset's tokenizer."""
    return export_random_model(tmp_path_factory.mktemp("export") / "export", tiny_dataset / "tokenizer.model")


# Process hygiene (tests/_proc.py). Every process this session starts inherits this tag, so the
# end-of-session guard finds the ones left behind even after they leave the process tree (a new
# session, a dead parent).
_SESSION = os.environ["MEMDLM_TEST_SESSION"] = f"{os.getpid()}-{os.urandom(4).hex()}"
_first_seen: dict[int, str] = {}


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    """Remember which test a leftover process outlived, for the session report (/proc is small)."""
    from tests._proc import leftovers

    for proc in leftovers(_SESSION, os.getpid(), wait_s=0):
        _first_seen.setdefault(proc.pid, item.nodeid)


def pytest_sessionfinish(session):
    """Fail the session, naming them, if processes it started are still alive; then end them."""
    from tests._proc import end, leftovers

    left = leftovers(_SESSION, os.getpid())
    if not left:
        return
    report = session.config.pluginmanager.get_plugin("terminalreporter")
    if report is not None:
        report.ensure_newline()
        report.write_sep("=", f"{len(left)} process(es) left behind by the tests (now killed)", red=True)
        for proc in left:
            report.write_line(f"{proc}  [alive after {_first_seen.get(proc.pid, 'the session')}]")
    end(left)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
