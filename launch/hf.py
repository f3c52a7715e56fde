"""`make import-hf` / `make export-hf`: Hugging Face checkpoints to and from our export format.

python -m launch.hf import SRC OUT [--mask-id N] [--seq-len N] [--force]
python -m launch.hf export CHECKPOINT OUT [--dtype float32|bfloat16|float16] [--force]

OUT may be new, empty, or an earlier output of these commands (replaced); ``--force`` (make:
``FORCE=1``) replaces any other directory. OUT equal to, inside or around the source is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.cli import run_main
from pipeline.config import ConfigError
from pipeline.hf.convert import export_hf, import_hf
from pipeline.model.hf_format import HFFormatError
from pipeline.outputs import OutputDirError

USER_ERRORS = (HFFormatError, OutputDirError, ConfigError)
FORCE_HELP = "replace OUT even when it is a non-empty directory these commands did not write"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.hf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="HF directory (config.json + *.safetensors) -> our export directory")
    imp.add_argument("src", type=Path)
    imp.add_argument("out", type=Path)
    imp.add_argument("--mask-id", type=int, default=None, help="when config.json has no mask_token_id")
    imp.add_argument(
        "--seq-len", type=int, default=None, help="model.seq_len (default: the source's maximum)"
    )
    exp = sub.add_parser("export", help="our export directory -> HF Llama/Qwen2 directory")
    exp.add_argument("checkpoint", type=Path)
    exp.add_argument("out", type=Path)
    exp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    for sub_parser in (imp, exp):
        sub_parser.add_argument("--force", action="store_true", help=FORCE_HELP)
    args = parser.parse_args(argv)
    if args.cmd == "import":
        out = import_hf(args.src, args.out, mask_id=args.mask_id, seq_len=args.seq_len, force=args.force)
        _report_import(args.src, out)
    else:
        out = export_hf(args.checkpoint, args.out, dtype=args.dtype, force=args.force)
        print(f"exported {args.checkpoint} -> {out} (transformers: AutoModelForCausalLM.from_pretrained)")
    return 0


def _report_import(src_dir: Path, out: Path) -> None:
    """What an import wrote: the model config to fine-tune with, the mask token, the data tokenizer."""
    info = json.loads((out / "config.json").read_text())
    src = info["source"]
    print(f"imported {src_dir} ({src['layout']} layout, model_type {src['model_type']}) -> {out}")
    print(f"model config (use it as the run's `model:` section to fine-tune with init_from={out}):")
    print(json.dumps(info["model"], indent=2, sort_keys=True))
    tok = src["tokenizer"]
    if tok.get("kind") is None:
        print(f"mask id {info['special_ids']['mask']}: not checked ({tok['note']})")
        return
    print(f"mask id {info['special_ids']['mask']} = {tok['mask_token']!r} (from {tok['kind']})")
    if tok.get("data_tokenizer"):
        print(f"make data reads {out}/{tok['data_tokenizer']} (tokenizer.model=...)")
    if tok.get("note"):
        print(f"note: {tok['note']}")


if __name__ == "__main__":
    sys.exit(run_main(main, user_errors=USER_ERRORS))
