"""Generate from an exported checkpoint: the command line over :mod:`pipeline.sampler`.

    make sample CHECKPOINT=runs/local/export PROMPT="In the beginning"
    python -m launch.sample --checkpoint runs/local/export --prompt "In the beginning" \
        --gen-length 64 --steps 64 --block-length 16 --temperature 0 --adapt both
    make sample CHECKPOINT=... PROMPT="..." ARGS='--block-length 32 --threshold 0.9 --hide-later-blocks'
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from pipeline.cli import run_main
from pipeline.config import ConfigError
from pipeline.hardware.precision import resolve_precision
from pipeline.sampler import SamplerConfig, cut_at_eos, load_sampler


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument(
        "--checkpoint", required=True, help="export directory (make pretrain writes runs/<run>/export)"
    )
    ap.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="default: gen_length (one token per step)")
    ap.add_argument("--block-length", type=int, default=0)
    ap.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="LLaDA2 decoding: commit every masked position of the block whose confidence is above\n"
        "this (at least the schedule's share); steps / blocks is then a cap per block.\n"
        "default: the fixed schedule",
    )
    ap.add_argument(
        "--hide-later-blocks",
        action="store_true",
        help="the current block sees only the prompt, the finished blocks and itself (LLaDA2)",
    )
    ap.add_argument(
        "--adapt",
        choices=["off", "on", "both"],
        default=None,
        help="inference-time memory; default: both for MemDLM checkpoints, off for MDLM",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto: bf16 where the device multiplies it natively (GPU, AMX CPU), else fp32",
    )
    ap.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
    return ap


# A bad export, tokenizer or sampling option (ConfigError, TokenizerError, ... are ValueErrors).
USER_ERRORS = (ConfigError, ValueError)


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not (Path(args.checkpoint) / "model.safetensors").is_file():
        raise FileNotFoundError(
            errno.ENOENT,
            "not an export directory (no model.safetensors); `make pretrain CLUSTER=local` writes runs/local/export",
            args.checkpoint,
        )
    sampler, tok, info = load_sampler(args.checkpoint, device=args.device)
    adapt = args.adapt or ("both" if info.get("method") == "memdlm" else "off")
    modes = {"off": [False], "on": [True], "both": [False, True]}[adapt]
    prompts = [tok.encode(p) for p in args.prompt]
    precision = resolve_precision(args.precision, sampler.device)
    bf16 = precision.bf16
    print(f"checkpoint {args.checkpoint}: method {info.get('method')}, step {info.get('step')}")
    print(f"precision: {precision.dtype} ({precision.reason})")
    for on in modes:
        cfg = SamplerConfig(
            gen_length=args.gen_length,
            steps=args.steps or args.gen_length,
            block_length=args.block_length,
            remasking=args.remasking,
            temperature=args.temperature,
            threshold=args.threshold,
            hide_later_blocks=args.hide_later_blocks,
            adapt=on,
            seed=args.seed,
            bf16=bf16,
        )
        out = sampler.generate(prompts, cfg)
        bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
        for text, ids in zip(args.prompt, out.tokens.tolist(), strict=True):
            resp = tok.decode(cut_at_eos(ids, tok.eos_id))
            print(
                f"--- memory {'on (adapted to the prompt)' if on else 'off'} ---\n{text}{bold}{resp}{plain}"
            )
        if cfg.threshold is not None:  # what the threshold saved
            print(f"denoising steps per prompt: {out.steps.tolist()} (at most {cfg.steps})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; a user error is one ``error:`` line and 2 (pipeline/cli.py), also when called."""
    return run_main(_main, argv, user_errors=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(run_main(main, user_errors=USER_ERRORS))
