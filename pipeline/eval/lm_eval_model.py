"""lm-evaluation-harness adapter: our exported checkpoints as the registered lm-eval model ``memdlm``.

    python -m pipeline.eval.lm_eval_model --checkpoint runs/local/export --include-path my_tasks \
        --tasks my_task --model-args mc_samples=16,adapt=true

    import pipeline.eval.lm_eval_model                   # registers "memdlm" (in your own script)
    lm_eval.simple_evaluate(model="memdlm", model_args="checkpoint=runs/local/export", tasks=[...])

* ``loglikelihood``: the Monte-Carlo masked estimate of ``log p(continuation | context)``
  (pipeline/eval/likelihood.py) with ``mc_samples`` draws; ``is_greedy`` says whether the
  continuation is the per-position argmax with all of it masked.
* ``loglikelihood_rolling``: the text in windows of half the model's ``seq_len``, each scored
  given the half window of text before it; the window estimates are summed.
* ``generate_until``: the denoising sampler (greedy by default, one token per step) for
  ``max_gen_toks`` tokens, cut at the first EOS and at the first ``until`` string;
  ``threshold=0.9`` (and ``hide_later_blocks=true``) decode as LLaDA2 does, one step per token
  at most (pipeline/sampler.py).
* ``adapt=true``: inference-time memory; every distinct context is first written into its own
  memory, which the scores and generations for that context then use.

Contexts longer than the model allows are cut from the left (the end of a prompt matters most).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from pipeline.cli import run_main
from pipeline.eval.likelihood import mc_loglikelihood
from pipeline.sampler import SamplerConfig, cut_at_eos, load_sampler


@register_model("memdlm")
class MemDLMEvalModel(LM):
    """An exported MemDLM/MDLM checkpoint behind lm-eval's ``LM`` interface (see module docstring)."""

    def __init__(
        self,
        checkpoint: str,
        mc_samples: int = 8,
        adapt: bool = False,
        temperature: float = 0.0,
        block_length: int = 0,
        threshold: float | str | None = None,
        hide_later_blocks: bool = False,
        seed: int = 0,
        bf16: bool = False,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
        **unused: Any,
    ):
        super().__init__()
        if unused:
            raise ValueError(f"memdlm model_args: unknown key(s) {', '.join(sorted(unused))}")
        self.sampler, self.tok, self.info = load_sampler(str(checkpoint), device=device or "auto")
        self.mc_samples, self.adapt, self.seed, self.bf16 = (
            int(mc_samples),
            bool(adapt),
            int(seed),
            bool(bf16),
        )
        self.temperature, self.block_length = float(temperature), int(block_length)
        # lm-eval hands model_args over as parsed literals; "none" (or absent) = the fixed schedule
        self.threshold = None if threshold in (None, "", "none", "None") else float(threshold)
        self.hide_later_blocks = bool(hide_later_blocks)
        SamplerConfig(gen_length=1, steps=1, threshold=self.threshold).validate()  # a bad one fails now
        self.batch = (
            int(batch_size) if isinstance(batch_size, int | float) or str(batch_size).isdigit() else 16
        )
        self.seq_len = self.sampler.model.cfg.seq_len

    # ------------------------------------------------------------------ helpers
    def _memory(self, contexts: list[list[int]]):
        """Per-context adapted memory (rows in ``contexts`` order), or None with adapt off.

        An empty context (the first window of a rolling likelihood) has nothing to adapt on and
        gets a fresh memory, whose effect is exactly zero (B = 0).
        """
        if not self.adapt:
            return None
        real = [c for c in contexts if c]
        if not real:
            return None
        fast = self.sampler.adapt_prompts(real, seed=self.seed, bf16=self.bf16)
        rows, k = [], 0
        for c in contexts:
            rows.append(k if c else len(real))  # row len(real): the fresh memory appended below
            k += bool(c)
        values = []
        for (_, name), v in zip(fast.names, fast.leaves(), strict=True):
            extra = torch.zeros_like(v[:1]) if name.endswith((".B", ".W")) else v[:1]
            values.append(torch.cat([v, extra]).index_select(0, torch.tensor(rows, device=v.device)))
        return fast.with_values(values)

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(loglik, is_greedy)`` per (context, continuation) pair; contexts adapt once each."""
        contexts = list(dict.fromkeys(tuple(p) for p, _ in pairs))
        index = {c: i for i, c in enumerate(contexts)}
        ctx_of = [index[tuple(p)] for p, _ in pairs]
        members: list[list[int]] = [[] for _ in contexts]  # pairs of each context
        for k, c in enumerate(ctx_of):
            members[c].append(k)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for lo in range(0, len(contexts), self.batch):
            chunk = contexts[lo : lo + self.batch]
            fast = self._memory([list(c) for c in chunk])
            sel = [k for c in range(lo, lo + len(chunk)) for k in members[c]]
            scored = mc_loglikelihood(
                self.sampler.model,
                [pairs[k][0] for k in sel],
                [pairs[k][1] for k in sel],
                mask_id=self.sampler.mask_id,
                pad_id=self.sampler.pad_id,
                vocab_size=self.sampler.vocab_size,
                samples=self.mc_samples,
                seed=self.seed,
                fast=fast,
                fast_rows=[ctx_of[k] - lo for k in sel] if fast is not None else None,
                batch_size=self.batch,
                bf16=self.bf16,
                check_greedy=True,
            )
            for k, ll, g in zip(sel, scored.loglik, scored.greedy, strict=True):
                results[k] = (ll, g)
        return results

    def _fit(self, context: list[int], cont_len: int) -> list[int]:
        room = self.seq_len - cont_len
        if room < 0:
            raise ValueError(
                f"a continuation of {cont_len} tokens exceeds the model's seq_len {self.seq_len}"
            )
        return context[-room:] if room else []

    # ------------------------------------------------------------------ lm-eval API
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for r in requests:
            context, continuation = r.args
            cont = self.tok.encode(continuation)
            if not cont:
                raise ValueError(f"empty continuation {continuation!r} after tokenisation")
            pairs.append((self._fit(self.tok.encode(context), len(cont)), cont))
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        half = self.seq_len // 2
        pairs, owner = [], []
        for i, r in enumerate(requests):
            (text,) = r.args
            ids = self.tok.encode(text)
            for lo in range(0, len(ids), half):
                pairs.append((ids[max(0, lo - half) : lo], ids[lo : lo + half]))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._score(pairs), strict=True):
            totals[i] += ll
        return totals

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for r in requests:
            context, kw = r.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            G = int(kw.get("max_gen_toks", 32))
            if self.block_length:
                G = -(-G // self.block_length) * self.block_length  # whole blocks
            cfg = SamplerConfig(
                gen_length=G,
                steps=G,
                block_length=self.block_length,
                temperature=float(kw.get("temperature", self.temperature) or 0.0),
                threshold=self.threshold,
                hide_later_blocks=self.hide_later_blocks,
                adapt=self.adapt,
                seed=self.seed,
                bf16=self.bf16,
            )
            prompt = self._fit(self.tok.encode(context), G)
            ids = self.sampler.generate([prompt], cfg).tokens[0].tolist()
            text = self.tok.decode(cut_at_eos(ids, self.tok.eos_id))
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            outputs.append(text)
        return outputs


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Run lm-eval tasks on an exported checkpoint.")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tasks", required=True, help="comma-separated task names")
    ap.add_argument("--include-path", help="directory of task YAMLs")
    ap.add_argument("--model-args", default="", help="extra model args, e.g. mc_samples=16,adapt=true")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--output", help="write the results JSON here")
    args = ap.parse_args(argv)
    # optional: only the lm-eval adapter needs lm-evaluation-harness
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=args.include_path, include_defaults=args.include_path is None)
    model_args = f"checkpoint={args.checkpoint}" + (f",{args.model_args}" if args.model_args else "")
    torch.manual_seed(0)
    res = simple_evaluate(
        model="memdlm",
        model_args=model_args,
        tasks=args.tasks.split(","),
        task_manager=tm,
        limit=args.limit,
        bootstrap_iters=0,
        log_samples=False,
    )
    text = json.dumps(res["results"], indent=2, default=str)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


# A bad export or model argument (ConfigError, TokenizerError, unknown keys: ValueErrors).
USER_ERRORS = (ValueError,)


def main(argv: list[str] | None = None) -> int:
    """The command; a user error is one ``error:`` line and 2 (pipeline/cli.py), also when called."""
    return run_main(_main, argv, user_errors=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(run_main(main, user_errors=USER_ERRORS))
