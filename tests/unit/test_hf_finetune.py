"""An imported Hugging Face checkpoint is the starting point of a ZeRO-3 fine-tuning run."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file

from pipeline.dataset.tokenizer import load_tokenizer
from pipeline.engine.export import consolidated_state_dict
from pipeline.hf.convert import import_hf
from pipeline.train import Trainer
from pipeline.train_config import load_train_config
from tests.conftest import tiny_run_overrides


def test_fine_tuning_starts_from_an_imported_qwen2_checkpoint(world1, tiny_dataset, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = load_tokenizer(tiny_dataset / "tokenizer.model")
    hf_cfg = Qwen2Config(  # the tiny preset's sizes, with GQA, Q/K/V biases and a tied head
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0),
    )
    hf_cfg.mask_token_id = tok.mask_id
    torch.manual_seed(0)
    src = tmp_path / "src"
    Qwen2ForCausalLM(hf_cfg).save_pretrained(src)
    shutil.copyfile(tok.path, src / "tokenizer.model")  # a sentencepiece model our data pipeline reads
    export = import_hf(src, tmp_path / "export")
    assert (export / "tokenizer.model").is_file()
    cfg = load_train_config(
        None,
        tiny_run_overrides(
            tiny_dataset,
            tmp_path / "mlruns",
            f"run_dir={tmp_path / 'run'}",
            "steps=1",
            f"init_from={export}",  # seq_len 64 there, the dataset's here: RoPE only, allowed
            "model.n_kv_heads=2",
            "model.qkv_bias=true",
            "model.tie_embeddings=true",
            "model.norm_eps=1e-5",
            "model.rope_theta=500000.0",
            "parallel.param_persistence_threshold=0",
            "parallel.precision=fp32",
            "optim.lr=1e-4",
            "optim.warmup_steps=0",
        ),
    )
    trainer = Trainer(cfg)
    theirs = load_file(str(export / "model.safetensors"))
    ours = consolidated_state_dict(trainer.model)
    assert set(ours) == set(theirs) and "head.weight" not in ours
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    trainer.run()
    after = consolidated_state_dict(trainer.model)
    moved = {k: float((after[k] - theirs[k]).abs().max()) for k in ours}
    assert all(m < 3e-4 for m in moved.values()) and moved["layers.0.qkv.bias"] > 0
