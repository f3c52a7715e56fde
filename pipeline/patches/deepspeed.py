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
