"""SFT datasets: (prompt, response) pairs -> one padded sequence per pair in WebDataset shards.

    write_sft_dataset({"train": pairs, "val": val_pairs}, tokenizer="data/sample/tokenizer.model",
                      out_dir="data/tasks/sft", seq_len=256, shards={"train": 8, "val": 2})

Each sample is ``tokens.npy`` = prompt | response | EOS | EOS ... (to ``seq_len``) and
``prompt_len.txt``. Padding with EOS rather than [PAD] follows LLaDA's SFT: the trailing EOS
tokens are part of the response, maskable and scored, so the model learns where an answer ends
and the sampler can generate a fixed-length response and cut it at the first EOS. The prompt is
encoded on its own (as at inference) and never masked (``objective.mode: sft``; the manifest
says ``kind: sft``). Shards are written under temporary names and renamed; the manifest last.

``chat_template="tokenizer"`` renders each pair with the tokenizer's chat template instead (a
tokenizer.json whose tokenizer_config.json has one): the prompt is the user turn plus the
generation prompt, the response is the rest of the rendered conversation (the assistant turn, no
leading space), then EOS. The rendered prompt's tokens must be a prefix of the conversation's,
or the pair is an error: the unscored prompt is exactly what the model is given at inference.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import webdataset as wds

from pipeline.dataset.manifest import Manifest, ShardInfo, SplitInfo, build_manifest, write_manifest
from pipeline.dataset.tokenizer import Tokenizer, load_tokenizer, sha256_file

ChatTemplate = Literal["none", "tokenizer"]
CHAT_TEMPLATES = ("none", "tokenizer")


class SFTDataError(ValueError):
    """A pair that does not fit, or a split too small for its shards; the message says which."""


def _chat_pair(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """``(prompt ids, response ids)`` of the pair rendered with the tokenizer's chat template."""
    user = {"role": "user", "content": prompt}
    p = tok.encode(tok.apply_chat_template([user], add_generation_prompt=True))
    full = tok.encode(
        tok.apply_chat_template(
            [user, {"role": "assistant", "content": response}], add_generation_prompt=False
        )
    )
    if full[: len(p)] != p:
        at = next(
            (i for i, (a, b) in enumerate(zip(p, full, strict=False)) if a != b), min(len(p), len(full))
        )
        raise SFTDataError(
            f"chat template of {tok.path}: the rendered prompt ({len(p)} tokens) is not a prefix of the "
            f"rendered conversation ({len(full)} tokens; they differ at token {at}), so the prompt the "
            "model would be given at inference is not the one it was trained on; use chat_template: none"
        )
    r = full[len(p) :]
    if not r or r[-1] != tok.eos_id:
        r.append(tok.eos_id)
    return p, r


def encode_pair(
    tok: Tokenizer, prompt: str, response: str, seq_len: int, chat_template: ChatTemplate = "none"
) -> tuple[np.ndarray, int]:
    """``(tokens [seq_len], prompt_len)``; the response gets a leading space (as after "Answer:"),
    or, with ``chat_template="tokenizer"``, both are rendered as a conversation (module docstring)."""
    if chat_template == "tokenizer":
        p, r = _chat_pair(tok, prompt, response)
    elif chat_template == "none":
        p = tok.encode(prompt)
        r = [*tok.encode(" " + response), tok.eos_id]
    else:
        raise SFTDataError(f"chat_template '{chat_template}': expected one of {', '.join(CHAT_TEMPLATES)}")
    if len(p) + len(r) > seq_len:
        raise SFTDataError(
            f"prompt ({len(p)} tokens) + response ({len(r)} tokens incl. EOS) exceed seq_len {seq_len}"
        )
    out = np.full(seq_len, tok.eos_id, dtype=np.int64)
    out[: len(p) + len(r)] = p + r
    return out, len(p)


def write_sft_dataset(
    splits: dict[str, Sequence[tuple[str, str, str]]],
    *,
    tokenizer: str | Path,
    out_dir: str | Path,
    seq_len: int,
    shards: dict[str, int],
    seed: int = 0,
    source: dict | None = None,
    config: dict | None = None,
    chat_template: ChatTemplate = "none",
) -> Manifest:
    """Write ``out_dir`` from ``splits[name] = [(id, prompt, response), ...]``; returns the manifest.

    ``tokenizer``: a tokenizer file or a directory holding one (a dataset's, an export's); it is
    stored with the dataset. Every shard of a split holds the same number of samples (the
    remainder is dropped and recorded), so data-parallel ranks stay balanced.
    """
    tok = load_tokenizer(tokenizer)
    if chat_template == "tokenizer" and tok.chat_template is None:
        raise SFTDataError(
            f"chat_template: tokenizer asks for the tokenizer's chat template, but {tok.path} has none "
            "(its tokenizer_config.json has no 'chat_template'); use chat_template: none"
        )
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "shards").mkdir(parents=True)
    try:
        manifest = _write_splits(splits, tok, tmp, seq_len, shards, seed, source, config, chat_template)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves nothing behind
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return manifest


def _write_splits(
    splits: dict[str, Sequence[tuple[str, str, str]]],
    tok: Tokenizer,
    tmp: Path,
    seq_len: int,
    shards: dict[str, int],
    seed: int,
    source: dict | None,
    config: dict | None,
    chat_template: ChatTemplate,
) -> Manifest:
    dtype = np.dtype("uint16") if tok.vocab_size <= 65535 else np.dtype("int32")
    infos: dict[str, SplitInfo] = {}
    dropped = {}
    for name, pairs in splits.items():
        n_shards = shards.get(name, 1)
        per = len(pairs) // n_shards
        if per == 0:
            raise SFTDataError(f"split '{name}': {len(pairs)} pairs cannot fill {n_shards} shards")
        dropped[name] = len(pairs) - per * n_shards
        shard_infos = []
        for k in range(n_shards):
            rel = f"shards/{name}-{k:05d}.tar"
            with wds.TarWriter(str(tmp / rel), mtime=0.0) as sink:
                for j in range(k * per, (k + 1) * per):
                    pid, prompt, response = pairs[j]
                    try:
                        tokens, plen = encode_pair(tok, prompt, response, seq_len, chat_template)
                    except SFTDataError as exc:
                        raise SFTDataError(f"split '{name}', example '{pid}': {exc}") from None
                    sink.write(
                        {
                            "__key__": f"s{j:010d}",
                            "tokens.npy": tokens.astype(dtype),
                            "prompt_len.txt": str(plen),
                        }
                    )
            path = tmp / rel
            shard_infos.append(
                ShardInfo(path=rel, sha256=sha256_file(path), bytes=path.stat().st_size, samples=per)
            )
        infos[name] = SplitInfo(sequences=per * n_shards, tokens=per * n_shards * seq_len, shards=shard_infos)
    tok.save(tmp)
    manifest = build_manifest(
        tok,
        kind="sft",
        seq_len=seq_len,
        dtype=dtype.name,
        splits=infos,
        seed=seed,
        corpus={"source": source or {}, "dropped_pairs": dropped, "chat_template": chat_template},
        config=config or {"seq_len": seq_len, "shards": shards},
    )
    write_manifest(manifest, tmp)
    return manifest
