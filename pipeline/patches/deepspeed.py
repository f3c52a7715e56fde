"""DeepSpeed patches (written for 0.19.8): each works around one measured problem of the pinned
version, and tests/unit/test_patches.py shows the unpatched library still has it.

``skip_shm_comm_build``: the first ``init_distributed`` on a CPU JIT-compiles the
``deepspeed_shm_comm`` op (about 2 minutes of C++ on 2 cores), used only for inference
all-reduce. Marking it incompatible skips the build; nothing we run uses it.

``universal_load_repairs`` (a context manager around ``engine.load_checkpoint`` of a universal
checkpoint, pipeline/engine/elastic.py): ZeRO-3's universal load

* cuts TP shards in the group ``deepspeed.utils.groups`` names, which only DeepSpeed's own AutoTP
  sets (the ``mpu`` we pass is not consulted there): our TP group is named for the load only;
* copies the first param group's hyperparameters into every group
  (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``): the no-decay group (norms) would start
  decaying. Ours differ in ``weight_decay`` only; it is put back;
* stores one tensor object as ``state["step"]`` of every sub-group, which torch's AdamW increments
  in place: with two sub-groups each step counted twice in Adam's bias correction (losses drifted
  2e-5 to 9e-4 relative within 4 steps). Every sub-group gets its own counter.

``frozen_experts_saveable`` (a context manager around ``engine.save_checkpoint``): ZeRO-3's
AutoEP checkpoint refuses frozen expert parameters ("frozen fragments are not stored in ZeRO
optimizer shards"), and then requires every expert parameter among the optimizer's
``param_shapes``: outer LoRA on a mixture of experts (a frozen base) died at its first checkpoint.
For the save only, the refusal sees them as trainable, the shape check skips them, and they are
saved with the other frozen parameters (each rank's ZeRO fragment), where the loader restores
them from. Converting such a checkpoint to another layout stays refused by DeepSpeed's converter.

``wrap_bare_universal_tensors``: ``ds_to_universal`` writes a state as ``{"param": tensor}`` for a
TP>1 source but as a bare tensor for a TP=1 one, and the loader applies a parameter's TP layout to
the dict form only: a TP=1 checkpoint resumed at TP=2 would load every full tensor into a
half-size shard. The bare tensors are re-wrapped (same values).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.hardware.device import deepspeed_accelerator
from pipeline.patches import Patch, require

WRITTEN_FOR = "0.19.8"
SKIP_SHM_COMM_BUILD = Patch(
    name="deepspeed.skip_shm_comm_build",
    distribution="deepspeed",
    written_for=WRITTEN_FOR,
    why="init_distributed on a CPU compiles the inference-only deepspeed_shm_comm op (~2 min)",
    test="tests/unit/test_patches.py::test_unpatched_deepspeed_would_build_the_shm_comm_op_on_cpu",
)
UNIVERSAL_LOAD_REPAIRS = Patch(
    name="deepspeed.universal_load_repairs",
    distribution="deepspeed",
    written_for=WRITTEN_FOR,
    why="its ZeRO-3 universal load ignores the mpu's TP group, copies group 0's weight decay to every "
    "group and shares one Adam step counter among sub-groups",
    test="tests/unit/test_patches.py::test_unpatched_universal_load_shares_adam_step_and_weight_decay",
)
FROZEN_EXPERTS_SAVEABLE = Patch(
    name="deepspeed.frozen_experts_saveable",
    distribution="deepspeed",
    written_for=WRITTEN_FOR,
    why="its ZeRO-3 AutoEP checkpoint refuses frozen expert parameters (outer LoRA on a MoE base)",
    test="tests/unit/test_patches.py::test_unpatched_deepspeed_refuses_to_checkpoint_frozen_experts",
)
WRAP_BARE_UNIVERSAL_TENSORS = Patch(
    name="deepspeed.wrap_bare_universal_tensors",
    distribution="deepspeed",
    written_for=WRITTEN_FOR,
    why="ds_to_universal writes bare tensors for a TP=1 source, which its loader never cuts for TP",
    test="tests/unit/test_patches.py::test_unpatched_ds_to_universal_writes_bare_tensors_for_tp1",
)


def skip_shm_comm_build() -> None:
    """Pick DeepSpeed's accelerator for the training device and skip the shm op's build (before
    DeepSpeed initialises its communication)."""
    require(SKIP_SHM_COMM_BUILD)
    os.environ["DS_ACCELERATOR"] = deepspeed_accelerator()
    import deepspeed.ops  # heavy: only where an engine is built

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@contextlib.contextmanager
def universal_load_repairs(engine, tp_group) -> Iterator[None]:
    """Around ``engine.load_checkpoint`` of a universal checkpoint (module docstring)."""
    require(UNIVERSAL_LOAD_REPAIRS)
    from deepspeed.utils import groups  # heavy: only on a resized resume

    decay = [group["weight_decay"] for group in engine.optimizer.param_groups]
    before = groups._TENSOR_MODEL_PARALLEL_GROUP
    groups._TENSOR_MODEL_PARALLEL_GROUP = tp_group
    try:
        yield
    finally:
        groups._TENSOR_MODEL_PARALLEL_GROUP = before
    for group, value in zip(engine.optimizer.param_groups, decay, strict=True):
        group["weight_decay"] = value
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


@contextlib.contextmanager
def frozen_experts_saveable(engine) -> Iterator[None]:
    """Around ``engine.save_checkpoint``: its frozen expert parameters pass DeepSpeed's two
    save-time checks and are saved with the other frozen parameters (module docstring); a no-op
    without them."""
    module = engine.module
    frozen = {
        n: p
        for n, p in module.named_parameters()
        if getattr(p, "is_expert_group", False) and not p.requires_grad
    }
    if not frozen:
        yield
        return
    require(FROZEN_EXPERTS_SAVEABLE)
    from deepspeed.runtime.engine import DeepSpeedEngine  # heavy: only where an engine exists

    def set_trainable(value: bool) -> None:
        for p in frozen.values():
            p.requires_grad_(value)

    names = DeepSpeedEngine.__dict__["_autoep_expert_parameter_names"]
    common_state = engine._common_checkpoint_state

    def trainable_expert_names(autoep_layers, model):
        return names.__func__(autoep_layers, model) - set(frozen)

    def state_with_frozen_experts(*args, **kwargs):
        set_trainable(False)  # frozen again while the frozen parameters' fragments are collected
        try:
            return common_state(*args, **kwargs)
        finally:
            set_trainable(True)

    set_trainable(True)  # the refusal of frozen experts reads requires_grad
    DeepSpeedEngine._autoep_expert_parameter_names = staticmethod(trainable_expert_names)
    engine._common_checkpoint_state = state_with_frozen_experts
    try:
        yield
    finally:
        del engine._common_checkpoint_state
        DeepSpeedEngine._autoep_expert_parameter_names = names
        set_trainable(False)


def wrap_bare_universal_tensors(zero: Path) -> None:
    """Store every state under ``zero`` (a universal checkpoint's ``zero/`` folder) as
    ``{"param": tensor}``, the form ZeRO-3's universal loader cuts for TP."""
    require(WRAP_BARE_UNIVERSAL_TENSORS)
    from deepspeed.checkpoint.constants import PARAM  # heavy: only when converting

    for file in sorted(zero.glob("*/*.pt")):
        if file.stem not in ("fp32", "exp_avg", "exp_avg_sq"):
            continue
        try:
            value = torch.load(file, weights_only=True)
        except pickle.UnpicklingError:
            continue  # not tensors only (a dict with DeepSpeed's sub-parameter shape): not bare
        if isinstance(value, torch.Tensor):
            torch.save({PARAM: value}, file)
