"""The family seam is real: a family defined and registered in this file alone (a plain GELU MLP
instead of SwiGLU, with its own Hugging Face layout) trains through the Trainer with MemDLM, exports,
goes to its Hugging Face layout and back, and samples, with nothing under pipeline/ knowing it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pipeline.engine.export import export_model, load_exported
from pipeline.families.dense.model import Block, DLMTransformer, column_linear, row_linear
from pipeline.families.registry import (
    Family,
    LayerShape,
    ParallelPlan,
    Projection,
    register_family,
    unregister_family,
)
from pipeline.hf.convert import export_hf, import_hf
from pipeline.model.config import ModelConfig
from pipeline.model.hf_format import HFLayout, Source, number, pad_rows, special_ids
from pipeline.parallel.tp_layout import describe_tensor_parallel_layout
from pipeline.perf.memory_model import estimate_memory
from pipeline.sampler import SamplerConfig, load_sampler
from pipeline.train import Trainer
from tests.conftest import tiny_trainer_config


# ---------------------------------------------------------------- the family, as a user would write it
@dataclass
class ToyConfig(ModelConfig):
    family: str = "toy"
    mlp_scale: float = 1.0  # a key of its own: the config section grows with the family


class ToyBlock(Block):
    """Attention as the dense family's, then x + down(gelu(up h)) * mlp_scale."""

    def build_ffn(self, cfg, mp, dims) -> None:
        d, f, group = cfg.d_model, cfg.ffn_hidden, dims.tp_group
        self.up = column_linear(d, f, mp, self.init, group)
        self.down = row_linear(f, d, mp, self.init_out, group)
        self.mlp_scale = cfg.mlp_scale

    def ffn(self, h, fast):
        return self.mlp_scale * self._linear("down", F.gelu(self._linear("up", h, fast)), fast)


class ToyModel(DLMTransformer):
    block_class = ToyBlock


def toy_shapes(cfg: ToyConfig) -> list[LayerShape]:
    d, f = cfg.d_model, cfg.ffn_hidden
    projections = (
        Projection("qkv", d, cfg.qkv_size, "column"),
        Projection("out", d, d, "row"),
        Projection("up", d, f, "column"),
        Projection("down", f, d, "row"),
    )
    return [LayerShape(projections, cfg.n_heads, cfg.head_size, other_params=2 * d)] * cfg.n_layers


def toy_hf_names(cfg: ToyConfig) -> dict[str, str]:
    """Our name -> the toy layout's."""
    names = {"embedding.weight": "toy.embed", "final_norm.weight": "toy.norm", "head.weight": "toy.head"}
    for i in range(cfg.n_layers):
        for ours in ("attn_norm", "qkv", "out", "ffn_norm", "up", "down"):
            names[f"layers.{i}.{ours}.weight"] = f"toy.blocks.{i}.{ours}"
    return names


def toy_read_config(config: dict[str, Any], names: set[str], seq_len: int | None, multiple: int) -> Source:
    model = ToyConfig(
        vocab_size=number(config, "vocab", int),
        d_model=number(config, "dim", int),
        n_layers=number(config, "layers", int),
        n_heads=number(config, "heads", int),
        ffn_hidden=number(config, "mlp", int),
        seq_len=seq_len or number(config, "max_len", int),
        mlp_scale=number(config, "mlp_scale", float),
        vocab_multiple=multiple,
    )
    ids = special_ids(config)
    return Source("toyformer", model, ids["mask"], ids, "toyformer")


def toy_hf_config(cfg: ToyConfig, ids: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_type": "toyformer",
        "vocab": cfg.vocab_size,
        "dim": cfg.d_model,
        "layers": cfg.n_layers,
        "heads": cfg.n_heads,
        "mlp": cfg.ffn_hidden,
        "max_len": cfg.seq_len,
        "mlp_scale": cfg.mlp_scale,
        **{f"{k}_token_id": v for k, v in ids.items() if k in ("pad", "mask", "bos", "eos")},
    }


def toy_hf_shapes(cfg: ToyConfig) -> dict[str, tuple[int, ...]]:
    d, f, v = cfg.d_model, cfg.ffn_hidden, cfg.vocab_size
    per = {
        "attn_norm": (d,),
        "qkv": (cfg.qkv_size, d),
        "out": (d, d),
        "ffn_norm": (d,),
        "up": (f, d),
        "down": (d, f),
    }
    shapes = {"toy.embed": (v, d), "toy.norm": (d,), "toy.head": (v, d)}
    for ours, theirs in toy_hf_names(cfg).items():
        if ours.startswith("layers."):
            shapes[theirs] = per[ours.split(".")[2]]
    return shapes


def toy_to_ours(read, cfg: ToyConfig) -> dict[str, torch.Tensor]:
    out = {ours: read(theirs).float() for ours, theirs in toy_hf_names(cfg).items()}
    for name in ("embedding.weight", "head.weight"):
        out[name] = pad_rows(out[name], cfg.padded_vocab_size)
    return out


def toy_from_ours(state: dict[str, torch.Tensor], cfg: ToyConfig) -> dict[str, torch.Tensor]:
    out = {theirs: state[ours] for ours, theirs in toy_hf_names(cfg).items()}
    out["toy.embed"], out["toy.head"] = out["toy.embed"][: cfg.vocab_size], out["toy.head"][: cfg.vocab_size]
    return out


TOYFORMER = HFLayout(
    name="toyformer",
    family="toy",
    detects=lambda config, names: config.get("model_type") == "toyformer",
    read_config=toy_read_config,
    hf_shapes=toy_hf_shapes,
    to_ours=toy_to_ours,
    from_ours=toy_from_ours,
    hf_config=toy_hf_config,
    model_types=("toyformer",),
)
TOY = Family(
    name="toy",
    config_class=ToyConfig,
    build=lambda cfg, dims: ToyModel(cfg, dims),
    layer_shapes=toy_shapes,
    plan=ParallelPlan(
        check=lambda cfg, dims: None,
        describe=lambda model, dims: describe_tensor_parallel_layout(model, dims.tp),
    ),
    activation_bytes=lambda cfg, tp: 20 * cfg.d_model + (18 * cfg.d_model + 8 * cfg.ffn_hidden) / tp,
    fast_weight_targets={"ffn": ("up", "down")},
    hf_layouts=(TOYFORMER,),
    hf_export_layout=lambda cfg: TOYFORMER,
    description="a throwaway family of this test",
)


@pytest.fixture
def toy_family():
    register_family(TOY)
    yield TOY
    unregister_family("toy")


# ---------------------------------------------------------------- what the pipeline does with it
@pytest.mark.slow
def test_a_family_registered_in_a_test_trains_exports_and_round_trips_through_its_hf_layout(
    toy_family, world1, tiny_dataset, tmp_path
):
    cfg = tiny_trainer_config(
        tiny_dataset,
        tmp_path / "run",
        "model.family=toy",
        "model.mlp_scale=0.5",
        "steps=2",
        "memory.enabled=true",
        "parallel.precision=fp32",
        "tracking.enabled=false",
    )
    assert type(cfg.model) is ToyConfig and cfg.model.mlp_scale == 0.5
    trainer = Trainer(cfg)
    records = trainer.run()
    assert isinstance(trainer.model, ToyModel) and not hasattr(trainer.model.layers[0], "gate")
    assert len(records) == 2 and all(r["loss"] == r["loss"] for r in records)  # finite
    assert (
        "inner/stage2_loss" in records[-1] and records[-1]["mfu"] > 0
    )  # memory on up/down; the cost model knows it
    export = export_model(
        trainer.engine,
        cfg,
        tmp_path / "export",
        tiny_dataset / "tokenizer.model",
        trainer.manifest.special_ids,
        2,
    )
    trainer.close()
    model, info = load_exported(export)
    assert isinstance(model, ToyModel) and info["model"]["family"] == "toy"

    hf_dir = export_hf(export, tmp_path / "hf")
    assert set(load_file(str(hf_dir / "model.safetensors"))) == set(toy_hf_shapes(cfg.model))
    back = import_hf(hf_dir, tmp_path / "back")
    ours, again = load_file(str(export / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert ours.keys() == again.keys()
    v = cfg.model.vocab_size  # the padded vocabulary rows stay behind (the HF layout has none)

    def real(name: str, t: torch.Tensor) -> torch.Tensor:
        return t[:v] if name in ("embedding.weight", "head.weight") else t

    assert all(torch.equal(real(k, ours[k]), real(k, again[k])) for k in ours)
    twice = import_hf(export_hf(back, tmp_path / "hf2"), tmp_path / "back2")  # and from there bit for bit
    final = load_file(str(twice / "model.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in again)

    sampler, tok, _ = load_sampler(back)
    out = sampler.generate([tok.encode("the river")], SamplerConfig(gen_length=4, steps=4, adapt=True))
    assert out.tokens.shape == (1, 4)
    mem = estimate_memory(cfg.model, cfg.memory, micro_batch=4, tp=1, dp=1)
    assert mem.total > 0 and mem.fast_weights > 0
