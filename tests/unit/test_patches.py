"""pipeline/patches/: each patch is still needed by the pinned library (the day one of these tests
fails, upstream fixed the problem: delete the patch), and a moved pin stops with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.patches import ALLOW_ENV, Patch, PatchVersionError, installed_version, require
from pipeline.patches import deepspeed as ds_patches
from pipeline.patches import megatron as megatron_patches
from tests import _proc
from tests.conftest import free_port, tiny_trainer_config

ROOT = Path(__file__).resolve().parents[2]


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter: patches are process-wide, the unpatched library is only seen
    in a process that never applied them."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
    }
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
    return _proc.run([sys.executable, "-c", code], env=env, timeout=120, cwd=ROOT)


def test_every_patch_names_its_pinned_version_and_it_is_the_installed_one():
    patches = [
        megatron_patches.CPU_AUTOCAST_BACKWARD,
        ds_patches.SKIP_SHM_COMM_BUILD,
        ds_patches.UNIVERSAL_LOAD_REPAIRS,
        ds_patches.WRAP_BARE_UNIVERSAL_TENSORS,
        ds_patches.FROZEN_EXPERTS_SAVEABLE,
    ]
    for patch in patches:
        assert installed_version(patch.distribution) == patch.written_for, patch.name
        require(patch)  # no error at the pinned version
        test_name = patch.test.split("::")[-1]
        assert test_name in Path(__file__).read_text(), f"{patch.name} names a test that does not exist"


def test_a_moved_pin_stops_with_a_message_naming_the_patch_and_both_versions(monkeypatch):
    patch = Patch("megatron.example", "megatron-core", "0.0.1", "an example reason", "tests/x.py::test_y")
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(
        PatchVersionError, match=r"megatron.example was written for megatron-core 0.0.1, but 0.16.1"
    ):
        require(patch)
    monkeypatch.setenv(ALLOW_ENV, "1")
    with pytest.warns(UserWarning, match="megatron.example"):
        require(patch)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the patch applies on CPU-only machines")
def test_unpatched_megatron_linear_fails_bf16_autocast_backward_on_cpu():
    code = """
import torch, torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1, init_method="env://")
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear
parallel_state.initialize_model_parallel(1)
mp = ModelParallelConfig(tensor_model_parallel_size=1, use_cpu_initialization=True)
lin = ColumnParallelLinear(8, 8, config=mp, init_method=torch.nn.init.normal_, bias=False, gather_output=False)
x = torch.randn(2, 8, requires_grad=True)
with torch.autocast("cpu", dtype=torch.bfloat16):
    y, _ = lin(x)
y.float().sum().backward()
print("backward ran")
"""
    done = _fresh_python(
        "import os; os.environ.setdefault('MASTER_ADDR', '127.0.0.1'); os.environ['RANK']='0'; os.environ['WORLD_SIZE']='1'"
        + code
    )
    assert done.returncode != 0 and "expected m1 and m2 to have the same dtype" in done.stderr, done.stderr[
        -2000:
    ]
    patched = _fresh_python(
        "import os; os.environ.setdefault('MASTER_ADDR', '127.0.0.1'); os.environ['RANK']='0'; os.environ['WORLD_SIZE']='1'\n"
        "from pipeline.patches import megatron; megatron.apply()" + code
    )
    assert patched.returncode == 0 and "backward ran" in patched.stdout, patched.stderr[-2000:]


@pytest.mark.slow
def test_unpatched_deepspeed_would_build_the_shm_comm_op_on_cpu():
    done = _fresh_python(
        "import deepspeed.ops as ops; print(ops.__compatible_ops__.get('deepspeed_shm_comm'))"
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("True"), done.stdout + done.stderr[-2000:]


@pytest.fixture(scope="module")
def universal_checkpoint(tiny_dataset, tmp_path_factory, world1):
    """A 2-step tiny run's checkpoint (one process, two param groups) and DeepSpeed's own universal
    conversion of it, without our repairs."""
    from pipeline.engine.universal import _run_converter
    from pipeline.train import Trainer

    run = tmp_path_factory.mktemp("patches") / "run"
    trainer = Trainer(
        tiny_trainer_config(tiny_dataset, run, "steps=2", "checkpoint.every=0", "memory.enabled=false")
    )
    trainer.run()
    ckpt = run / "checkpoints" / "step-000002"
    out = ckpt.parent / "bare-universal"
    _run_converter(ckpt / "ds", out / "ds", quiet=True)  # DeepSpeed's converter as it is
    return trainer, ckpt, out


def test_unpatched_ds_to_universal_writes_bare_tensors_for_tp1(universal_checkpoint):
    _, _, out = universal_checkpoint
    files = sorted((out / "ds" / "zero").glob("*/fp32.pt"))
    assert files, "the converter wrote no fp32 states"
    bare = [f for f in files if isinstance(torch.load(f, weights_only=True), torch.Tensor)]
    assert bare, "ds_to_universal wraps every state in a dict now: wrap_bare_universal_tensors can go"


def test_unpatched_universal_load_shares_adam_step_and_weight_decay(
    universal_checkpoint, tiny_dataset, tmp_path
):
    import copy

    from deepspeed.utils import groups

    from pipeline.build import model_factory
    from pipeline.engine.checkpoint import CheckpointError, load_engine_state
    from pipeline.engine.deepspeed import build_engine
    from pipeline.patches.deepspeed import wrap_bare_universal_tensors

    trainer, _, out = universal_checkpoint
    wrap_bare_universal_tensors(out / "ds" / "zero")  # the TP layout problem is the other test's
    cfg = copy.deepcopy(trainer.cfg)
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, trainer.dims, model_factory(cfg, trainer.dims), trainer.precision, True)
    decays = [g["weight_decay"] for g in engine.optimizer.param_groups]
    # 1. without our TP group named in deepspeed.utils.groups, the load does not run at all
    with pytest.raises(CheckpointError, match="intra_layer_model parallel group is not initialized"):
        load_engine_state(engine, out)
    # 2. with it named (the repair's first part only): one step counter shared, group 0's decay copied
    before = groups._TENSOR_MODEL_PARALLEL_GROUP
    groups._TENSOR_MODEL_PARALLEL_GROUP = trainer.dims.tp_group
    try:
        load_engine_state(engine, out)
    finally:
        groups._TENSOR_MODEL_PARALLEL_GROUP = before
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    steps = [s["step"] for s in inner.state.values() if torch.is_tensor(s.get("step"))]
    assert len(steps) >= 2
    shared = any(a is b for i, a in enumerate(steps) for b in steps[i + 1 :])
    copied = [g["weight_decay"] for g in engine.optimizer.param_groups] != decays
    assert shared and copied, (
        "DeepSpeed's universal load no longer shares Adam's step or copies group 0's weight decay"
    )


def test_unpatched_deepspeed_refuses_to_checkpoint_frozen_experts(tiny_dataset, tmp_path, world1):
    from deepspeed.runtime.engine import DeepSpeedEngine

    from pipeline.train import Trainer

    moe_lora = ("model_preset=tiny-moe", "model.vocab_size=400", "model.seq_len=32", "lora.enabled=true")
    trainer = Trainer(tiny_trainer_config(tiny_dataset, tmp_path / "run", "steps=1", *moe_lora))
    engine = trainer.engine
    experts = [p for p in engine.module.parameters() if getattr(p, "is_expert_group", False)]
    assert experts and not any(p.requires_grad for p in experts)  # the frozen base's experts
    with pytest.raises(RuntimeError, match="does not support frozen expert parameters"):
        engine.save_checkpoint(str(tmp_path / "bare"), tag="ds", save_latest=False)
    names = DeepSpeedEngine.__dict__["_autoep_expert_parameter_names"]
    with ds_patches.frozen_experts_saveable(engine):
        engine.save_checkpoint(str(tmp_path / "patched"), tag="ds", save_latest=False)
    saved = torch.load(next((tmp_path / "patched" / "ds").glob("*model_states.pt")), weights_only=False)
    assert any(".experts.w1" in name for name in saved["frozen_param_fragments"])  # saved with the frozen
    # everything the patch touched is as it was
    assert DeepSpeedEngine.__dict__["_autoep_expert_parameter_names"] is names
    assert "_common_checkpoint_state" not in vars(engine) and not any(p.requires_grad for p in experts)
    trainer.close()
