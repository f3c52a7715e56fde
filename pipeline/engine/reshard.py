"""``make reshard CHECKPOINT=...``: convert a checkpoint so any TP x DP layout can resume it.

    make reshard CHECKPOINT=runs/local/checkpoints [TP=.. DP=..]
    python -m pipeline.engine.reshard runs/local/checkpoints/step-000100 --tp 2 --dp 1

The newest checkpoint of a run (or the one named) is verified against its ``files.json`` before
anything of it is unpickled, converted to DeepSpeed's universal format once
(pipeline/engine/universal.py), and with ``--tp``/``--dp`` the resume at that layout is checked
(the model's family must be able to split it; ``grad_accum`` must keep the global batch). A resume
at another layout converts on its own (``checkpoint.reshard: auto``); this command does it ahead
of time, or for ``checkpoint.reshard: never``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.cli import run_main
from pipeline.config import ConfigError, from_dict
from pipeline.engine.checkpoint import CheckpointError, Layout, select_checkpoint
from pipeline.engine.elastic import plan_resume, saved_layout
from pipeline.engine.universal import convert_to_universal, verify_source
from pipeline.families import family_of
from pipeline.model.config import ModelConfig
from pipeline.parallel.dims import ParallelDims

USER_ERRORS = (CheckpointError, ConfigError)


def _check_target(path: Path, state: dict[str, Any], tp: int | None, dp: int | None) -> str | None:
    """What a resume at ``tp`` x ``dp`` will do (its grad_accum); an error when it cannot."""
    if tp is None and dp is None:
        return None
    saved = saved_layout(state)
    tp, dp = saved.tp if tp is None else tp, saved.dp if dp is None else dp
    model = from_dict(ModelConfig, state["config"]["model"], f"{path / 'train_state.json'} (model)")
    family_of(model).plan.check(model, ParallelDims(world=tp * dp, tp=tp))  # what TP splits divides
    plan = plan_resume(path, state, Layout(tp * dp, tp, dp, saved.grad_accum, saved.micro_batch))
    return f"resuming at TP={tp} x DP={dp}: {plan.describe()}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)  # one `error:` line through run_main, not argparse's usage + error


def _size(option: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(
                f"got {text!r}, expected an integer >= 1 (make reshard {option[2:].upper()}=...)"
            )
        return value

    parse.__name__ = option  # argparse names the type in "invalid <name> value"
    return parse


def _chosen(path: Path) -> tuple[Path, bool]:
    """The checkpoint ``path`` names, and whether it was verified choosing it."""
    if (path / "train_state.json").is_file():
        return path, False
    chosen = select_checkpoint(path)  # verifies the sizes and sha256 of the one it returns
    if chosen is None:
        raise CheckpointError(f"{path}: no checkpoint here (expected step-NNNNNN folders or one of them)")
    return chosen, True


def main(argv: list[str] | None = None) -> int:
    """``make reshard CHECKPOINT=...``: convert a checkpoint so any TP x DP layout can resume it.

    Raises ``CheckpointError`` / ``ConfigError`` for what the user can fix (``USER_ERRORS``)."""
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint",
        help="a checkpoint folder (runs/<run>/checkpoints/step-NNNNNN) or its run's checkpoints/",
    )
    parser.add_argument("--tp", type=_size("--tp"), help="check that this tensor-parallel size can resume it")
    parser.add_argument("--dp", type=_size("--dp"), help="check that this data-parallel size can resume it")
    args = parser.parse_args(argv)
    path, verified = _chosen(Path(args.checkpoint))
    if not verified:
        verify_source(path)  # before anything of it is unpickled
    state = json.loads((path / "train_state.json").read_text(encoding="utf-8"))
    layout = state.get("layout", {})
    target = _check_target(path, state, args.tp, args.dp)
    out = convert_to_universal(path, verified=True)
    if target:
        print(target)
    print(
        f"universal checkpoint ready: {out} (written at TP={layout.get('tp')} x DP={layout.get('dp')}); "
        "resume the run at any TP x DP whose grad_accum keeps the global batch: the trainer loads it automatically"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, user_errors=USER_ERRORS))
