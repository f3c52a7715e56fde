"""Score a checkpoint on retrieval-task examples, by generation and by likelihood ranking.

    scores = evaluate_examples(sampler, tok, examples, adapt=True, cfg=TaskScoringConfig())
    scores["generation"], scores["ranking"]      # mean score in [0, 1], accuracy in [0, 1]

* generation: the sampler answers each prompt (greedy, low-confidence remasking, one token per
  step, response length = the longest gold answer of the set + slack); the text up to the first
  EOS goes to the task's scorer (``data_prep.retrieval_tasks.score_generation``).
* ranking: every candidate answer (plus the EOS that ends a response in SFT data) is scored by
  the Monte-Carlo log-likelihood (pipeline/eval/likelihood.py) and the best one is the choice;
  accuracy is the fraction of examples where that is the gold answer. It separates models long
  before they can generate the answer exactly.

With ``adapt`` every prompt first writes itself into its own memory, which both scorers use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from pipeline.dataset.task_format import TaskExample, score_generation
from pipeline.eval.likelihood import mc_loglikelihood
from pipeline.hardware.precision import resolve_precision
from pipeline.sampler import DiffusionSampler, SamplerConfig, cut_at_eos


@dataclass
class TaskScoringConfig:
    batch_size: int = 8
    mc_samples: int = 8  # Monte-Carlo draws per candidate for ranking
    gen_slack: int = 4  # response tokens beyond the longest gold answer
    seed: int = 0
    # auto: bf16 where the device multiplies it natively, else fp32 (pipeline/hardware/precision.py)
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    def bf16_on(self, device: torch.device) -> bool:
        """Whether scoring on ``device`` autocasts to bf16."""
        return resolve_precision(self.precision, device).bf16


def evaluate_examples(
    sampler: DiffusionSampler, tok, examples: list[TaskExample], *, adapt: bool, cfg: TaskScoringConfig
) -> dict[str, Any]:
    """``{"generation": mean score, "ranking": accuracy, "n": len, "samples": [...]}``."""
    if not examples:
        raise ValueError("no examples to evaluate")
    answers = [[*tok.encode(" " + ex.answer), tok.eos_id] for ex in examples]
    gen_length = max(len(a) for a in answers) + cfg.gen_slack
    scfg = SamplerConfig(
        gen_length=gen_length, steps=gen_length, adapt=adapt, seed=cfg.seed, bf16=cfg.bf16_on(sampler.device)
    )
    gen_scores: list[float] = []
    choices: list[int] = []
    outputs: list[str] = []
    for lo in range(0, len(examples), cfg.batch_size):
        batch = examples[lo : lo + cfg.batch_size]
        prompts = [tok.encode(ex.prompt) for ex in batch]
        out = sampler.generate(prompts, scfg)
        texts = [tok.decode(cut_at_eos(ids, tok.eos_id)) for ids in out.tokens.tolist()]
        outputs += texts
        gen_scores += [score_generation(ex, text) for ex, text in zip(batch, texts, strict=True)]
        # ranking: every candidate of every example of the batch in one scoring call
        fast = out.fast if adapt else None
        pairs_p, pairs_c, rows = [], [], []
        for j, (ex, p) in enumerate(zip(batch, prompts, strict=True)):
            for cand in ex.candidates:
                pairs_p.append(p)
                pairs_c.append([*tok.encode(" " + cand), tok.eos_id])
                rows.append(j)
        scored = mc_loglikelihood(
            sampler.model,
            pairs_p,
            pairs_c,
            mask_id=sampler.mask_id,
            pad_id=sampler.pad_id,
            vocab_size=sampler.vocab_size,
            samples=cfg.mc_samples,
            seed=cfg.seed,
            fast=fast,
            fast_rows=rows if fast is not None else None,
            batch_size=cfg.batch_size * 4,
            bf16=scfg.bf16,
        )
        ll = torch.tensor(scored.loglik)
        k = 0
        for ex in batch:
            n = len(ex.candidates)
            choices.append(int(ll[k : k + n].argmax()))
            k += n
    correct = [c == ex.answer_index for c, ex in zip(choices, examples, strict=True)]
    return {
        "generation": sum(gen_scores) / len(gen_scores),
        "ranking": sum(correct) / len(correct),
        "n": len(examples),
        "gen_length": gen_length,
        "samples": [
            {"id": ex.id, "answer": ex.answer, "generated": text, "score": s, "chose": ex.candidates[c]}
            for ex, text, s, c in zip(examples[:5], outputs[:5], gen_scores[:5], choices[:5], strict=False)
        ],
    }
