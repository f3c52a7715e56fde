"""SFT data: prompt never masked, shards and loader, task data build, and fine-tuning from an export."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from data_prep.sft import SFTDataError, encode_pair, write_sft_dataset
from data_prep.task_sft import TaskDataConfig, TaskSFTSet, prepare_task_data
from pipeline.config import ConfigError
from pipeline.dataset.tokenizer import load_tokenizer
from pipeline.loader.stream import DataConfig, TokenBatchLoader
from pipeline.train import Trainer
from pipeline.train_config import load_train_config
from tests.conftest import WORDS, export_random_model, tiny_run_overrides


def _pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    return [
        (f"p{i}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + "?", rng.choice(WORDS))
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def sft_dataset(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "ds"
    write_sft_dataset(
        {"train": _pairs(64, 0), "val": _pairs(16, 1)},
        tokenizer=tiny_dataset / "tokenizer.model",
        out_dir=out,
        seq_len=32,
        shards={"train": 8, "val": 2},
    )
    return out


def test_sft_sample_is_prompt_response_eos_padding(tiny_dataset):
    tok = load_tokenizer(tiny_dataset / "tokenizer.model")
    tokens, plen = encode_pair(tok, "Where is the lamp?", "garden", 32)
    p, r = tok.encode("Where is the lamp?"), tok.encode(" garden")
    assert plen == len(p)
    assert tokens[: len(p) + len(r)].tolist() == p + r
    assert (tokens[len(p) + len(r) :] == tok.eos_id).all()  # EOS to the end: scored, so answers end
    with pytest.raises(SFTDataError, match="exceed seq_len 8"):
        encode_pair(tok, "the river and the stone and the garden", "x", 8)


def test_loader_yields_the_prompt_mask_of_each_sample(sft_dataset, tiny_dataset):
    tok = load_tokenizer(tiny_dataset / "tokenizer.model")
    loader = TokenBatchLoader(
        DataConfig(path=str(sft_dataset), batch_size=4, num_workers=0), shuffle=False, loop=False
    )
    assert loader.manifest.kind == "sft"
    pairs = {f"s{i:010d}": pr for i, pr in enumerate(_pairs(64, 0))}
    seen = 0
    for batch in loader:
        for row, idx, pm in zip(batch["tokens"], batch["index"], batch["prompt_mask"], strict=True):
            _, prompt, _ = pairs[f"s{int(idx):010d}"]
            n = len(tok.encode(prompt))
            assert pm.tolist() == [True] * n + [False] * (32 - n)
            assert row[:n].tolist() == tok.encode(prompt)
            seen += 1
    assert seen == 64


def test_sft_training_never_scores_the_prompt_and_mode_must_match(
    world1, sft_dataset, tiny_dataset, tmp_path
):
    cfg = load_train_config(
        None,
        tiny_run_overrides(
            sft_dataset,
            tmp_path / "mlruns",
            f"run_dir={tmp_path / 'run'}",
            "steps=2",
            "eval.every=2",
            "objective.mode=sft",
            "memory.enabled=true",
        ),
    )
    trainer = Trainer(cfg)
    seen = []
    real = trainer._micro

    def spy(raw, micro):
        seen.append(raw.get("prompt_mask"))
        return real(raw, micro)

    trainer._micro = spy
    records = trainer.run()
    assert all(m is not None and m.any() for m in seen)
    assert any("eval/continuation_loss_adapted" in r for r in records)
    with pytest.raises(ConfigError, match=r"objective.mode.*'pretrain'.*kind 'sft'"):
        Trainer(
            load_train_config(
                None, tiny_run_overrides(sft_dataset, tmp_path / "mlruns", f"run_dir={tmp_path / 'r2'}")
            )
        )


def test_fine_tuning_starts_from_the_exported_weights(world1, tiny_dataset, tmp_path):
    export = export_random_model(
        tmp_path / "export", tiny_dataset / "tokenizer.model", seed=7, seq_len=32, ffn_hidden=128
    )
    cfg = load_train_config(
        None,
        tiny_run_overrides(
            tiny_dataset,
            tmp_path / "mlruns",
            f"run_dir={tmp_path / 'run'}",
            "steps=1",
            f"init_from={export}",
            "parallel.param_persistence_threshold=0",
            "parallel.precision=fp32",
            "optim.lr=1e-4",
            "optim.warmup_steps=0",
        ),
    )
    trainer = Trainer(cfg)
    from safetensors.torch import load_file

    from pipeline.engine.export import consolidated_state_dict

    ours = consolidated_state_dict(trainer.model)
    theirs = load_file(str(export / "model.safetensors"))
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    # One Adam step moves each weight by about lr: the optimizer's fp32 master copy holds the
    # exported weights too (set after deepspeed.initialize, step 1 would restore the random init).
    trainer.run()
    after = consolidated_state_dict(trainer.model)
    for k in ours:
        assert float((after[k] - theirs[k]).abs().max()) < 3e-4, k
    bad = export_random_model(tmp_path / "bad", tiny_dataset / "tokenizer.model", seq_len=32)  # ffn 96
    with pytest.raises(ConfigError, match="ffn_hidden: export 96 vs run 128"):
        Trainer(
            load_train_config(
                None,
                tiny_run_overrides(
                    tiny_dataset, tmp_path / "mlruns", f"run_dir={tmp_path / 'r3'}", f"init_from={bad}"
                ),
            )
        )


def test_task_data_build_is_idempotent_and_keeps_splits_apart(tiny_dataset, tmp_path):
    filler = tmp_path / "filler.txt"
    rng = random.Random(0)
    filler.write_text(
        " ".join(" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + "." for _ in range(300))
    )
    cfg = TaskDataConfig(
        out_dir=str(tmp_path / "tasks"),
        tokenizer=str(tiny_dataset / "tokenizer.model"),
        filler=str(filler),
        seq_len=512,
        train_shards=2,
        val_shards=1,
        tasks=[TaskSFTSet(task="babi", context_tokens=400, n_train=4, n_val=2, difficulty={"facts": 4})],
    )
    m = prepare_task_data(cfg)
    assert m.kind == "sft" and m.splits["train"].sequences == 4 and m.splits["val"].sequences == 2
    before = {p.name: p.read_bytes() for p in (tmp_path / "tasks" / "shards").iterdir()}
    prepare_task_data(cfg)  # up to date: nothing rewritten
    assert {p.name: p.read_bytes() for p in (tmp_path / "tasks" / "shards").iterdir()} == before
    loader = TokenBatchLoader(
        DataConfig(path=cfg.out_dir, batch_size=2, num_workers=0), split="train", loop=False
    )
    val = TokenBatchLoader(DataConfig(path=cfg.out_dir, batch_size=2, num_workers=0), split="val", loop=False)
    train_rows = {tuple(r.tolist()) for b in loader for r in b["tokens"]}
    val_rows = {tuple(r.tolist()) for b in val for r in b["tokens"]}
    assert len(train_rows) == 4 and not train_rows & val_rows
    assert np.all([len(r) == 512 for r in train_rows])
    with pytest.raises(ConfigError, match="leaves no room"):
        TaskDataConfig(seq_len=100, tasks=[TaskSFTSet(task="babi", context_tokens=100)]).validate()


def test_fine_tuning_refuses_an_export_with_another_tokenizer(world1, tiny_dataset, tmp_path):
    from data_prep.shard import prepare_dataset
    from pipeline.dataset.manifest import DatasetError
    from tests.conftest import prep_config, write_txt_corpus

    corpus = write_txt_corpus(tmp_path / "other", n_docs=12, seed=9)
    prepare_dataset(
        prep_config(tmp_path / "other" / "ds", [str(corpus)], tokenizer={"vocab_size": 320}), progress=False
    )
    export = export_random_model(
        tmp_path / "export",
        tmp_path / "other" / "ds" / "tokenizer.model",
        seq_len=32,
        ffn_hidden=128,
        vocab_size=400,
    )
    overrides = tiny_run_overrides(
        tiny_dataset, tmp_path / "mlruns", f"run_dir={tmp_path / 'run'}", f"init_from={export}"
    )
    with pytest.raises(DatasetError, match=r"is not the one .* was tokenised with"):
        Trainer(load_train_config(None, overrides))
