"""A test guard over torch.distributed: every collective our code issues must carry tensors that the
process group's backend for the training device accepts.

On CPU every tensor is a CPU tensor, so a plain device check cannot see the bug that stops a GPU
run at step 1 (an NCCL group handed ``torch.tensor([flag])``, created on the default CPU device).
The guard therefore also tags every tensor made by a factory call without an explicit ``device=``
(and what is computed from it), and refuses such a tensor in a collective: under NCCL it would be
a CPU tensor.

    with CollectiveGuard(device, roots=[ROOT / "pipeline", ROOT / "launch"]) as guard:
        trainer.run()
    guard.check()      # raises AssertionError listing every offending call site
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

FACTORIES = {
    torch.tensor,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.as_tensor,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.eye,
}
# Moving a tensor to a device makes it a device tensor: the tag does not follow it.
MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all_single",
)
TAG = "_default_device_origin"


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for x in obj:
            yield from _tensors(x)


class _DefaultDeviceTagger(TorchFunctionMode):
    def __init__(self, roots: list[Path]):
        super().__init__()
        self.roots = [str(r) for r in roots]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return out
        origin = None
        if func in FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            origin = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        elif func not in MOVES:
            tagged = [
                getattr(t, TAG) for t in _tensors(list(args) + list(kwargs.values())) if hasattr(t, TAG)
            ]
            origin = tagged[0] if tagged else None
        if origin is not None:
            with contextlib.suppress(AttributeError, RuntimeError):
                setattr(out, TAG, origin)
        return out


@dataclass
class CollectiveGuard:
    """Records (call site, backend, tensor devices) of every collective issued from ``roots``."""

    device: torch.device
    roots: list[Path]
    calls: list[tuple[str, str, str, list[str]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __enter__(self) -> CollectiveGuard:
        self._saved = {name: getattr(dist, name) for name in COLLECTIVES}
        for name in COLLECTIVES:
            setattr(dist, name, self._wrap(name, self._saved[name]))
        self._mode = _DefaultDeviceTagger(self.roots)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _caller(self) -> str | None:
        for fs in reversed(traceback.extract_stack()[:-2]):
            if fs.filename == __file__:
                continue
            if any(fs.filename.startswith(str(r)) for r in self.roots):
                return f"{fs.filename}:{fs.lineno}"
            return None  # the immediate caller is library code (DeepSpeed, megatron): not ours
        return None

    def _wrap(self, name, fn):
        def guarded(*args, **kwargs):
            site = self._caller()
            if site is not None:
                group = kwargs.get("group")
                backend = str(dist.get_backend(group))
                tensors = list(_tensors(list(args) + list(kwargs.values())))
                self.calls.append((site, name, backend, [str(t.device) for t in tensors]))
                for t in tensors:
                    if t.device != self.device:
                        self.problems.append(
                            f"{site}: dist.{name} on a {t.device} tensor; the training device is {self.device}"
                        )
                    elif hasattr(t, TAG):
                        self.problems.append(
                            f"{site}: dist.{name} on a tensor created on the default (CPU) device at "
                            f"{getattr(t, TAG)} without device=: an NCCL group rejects it on a GPU"
                        )
            return fn(*args, **kwargs)

        return guarded

    def check(self) -> None:
        assert not self.problems, (
            "collectives that would fail on the training device's backend:\n"
            + "\n".join(sorted(set(self.problems)))
        )
