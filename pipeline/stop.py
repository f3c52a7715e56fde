"""The stop protocol: a scheduler's signal becomes a checkpoint at the next step boundary.

    stop = StopSignal()
    signal.signal(signal.SIGUSR2, stop.handler)      # launch/submit.py, in every task
    Trainer(cfg, stop=stop).run()                    # raises StoppedForRequeue after saving

Each rank only records the signal; at every step boundary all ranks agree on it with one
all-reduce (a MAX of the flag), so they save the same step together and stop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

STOPPED_EXIT = 3  # pipeline.train's exit status after a requested stop (checkpoint saved)


class StoppedForRequeue(RuntimeError):
    """The run saved a checkpoint because a stop was requested (a scheduler's time-out signal)."""


class StopSignal:
    """A stop request from a signal handler (or a test), read at step boundaries."""

    def __init__(self) -> None:
        self.signum = 0

    def request(self, signum: int = 15) -> None:
        self.signum = int(signum)

    def handler(self, signum: int, frame: object) -> None:
        """For ``signal.signal``: records the signal, nothing else (safe at any point of a step)."""
        self.request(signum)

    def agreed(self, device: torch.device) -> bool:
        """Collective: whether any rank was asked to stop (the flag lives on the training device)."""
        flag = torch.tensor([float(self.signum)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
