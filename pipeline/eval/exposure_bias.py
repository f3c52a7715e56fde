"""The exposure-bias ratio R(r) = L_seq(r) / L_static(r) (the paper's Figure 3), with its control.

For a (prompt, true response) pair with a response of G tokens, run the sampler's greedy,
low-confidence denoising from a fully masked response for S steps. After step k a set M_k of
response positions is still masked (ratio r_k = |M_k| / G) and the rest holds the model's own
commits. Then, all NLLs averaged over the positions of the mask in question:

* ``L_seq(k)``: NLL of the true tokens at M_k, given the model's own state after step k;
* ``L_static(k)``: the true forward process at the same ratio: a uniformly random set of
  |M_k| response positions masked, true tokens elsewhere;
* ``L_control(k)``: the *sequential* set M_k masked but true tokens elsewhere. It separates
  the two reasons L_seq exceeds L_static: which positions are left (selection:
  ``L_control / L_static``) and the model's wrong commits around them (corruption:
  ``L_seq / L_control``).

R grows over the steps when the model's own commits mislead it; MemDLM claims a flatter R.
A memory (``fast``, per row, e.g. adapted on the prompt) is used in every forward.

    python -m launch.evaluate --checkpoint runs/local/export   # includes this (make eval)
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pipeline.memory.fast_weights import FastWeights
from pipeline.plots import plot_exposure_bias  # noqa: F401  (moved; imported from here by callers)
from pipeline.sampler import commit_schedule, pack, prompt_seed


@dataclass
class ExposureBiasCurve:
    steps: list[int] = field(default_factory=list)  # k: denoising steps taken
    masked_ratio: list[float] = field(default_factory=list)  # r_k
    L_seq: list[float] = field(default_factory=list)
    L_static: list[float] = field(default_factory=list)
    L_control: list[float] = field(default_factory=list)

    @property
    def R(self) -> list[float]:
        return [s / t for s, t in zip(self.L_seq, self.L_static, strict=True)]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["R"] = self.R
        out["R_selection"] = [c / t for c, t in zip(self.L_control, self.L_static, strict=True)]
        out["R_corruption"] = [s / c for s, c in zip(self.L_seq, self.L_control, strict=True)]
        return out


def _nll_sum(
    model,
    truth: torch.Tensor,
    mask: torch.Tensor,
    real: torch.Tensor,
    fast,
    mask_id: int,
    vocab: int,
    bf16: bool,
) -> torch.Tensor:
    """Summed NLL of the true tokens at ``mask`` [B, T] with true tokens everywhere else."""
    with torch.no_grad(), torch.autocast(truth.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(tokens=torch.where(mask, mask_id, truth), fast=fast, positions=mask, key_mask=real)
    logp = torch.log_softmax(logits.double()[:, :vocab], -1)
    return -logp.gather(1, truth[mask][:, None]).sum()


def exposure_bias(
    model,
    prompts: list[list[int]],
    responses: list[list[int]],
    *,
    steps: int,
    mask_id: int,
    pad_id: int,
    vocab_size: int,
    fast: FastWeights | None = None,
    seed: int = 0,
    static_draws: int = 2,
    bf16: bool = False,
) -> ExposureBiasCurve:
    """R(r) over ``steps`` greedy low-confidence denoising steps; responses all of one length G.

    ``fast`` is a per-sample memory with one row per pair (or None). The static masks of row
    ``b`` come from a generator seeded from ``seed`` and its prompt.
    """
    G = _response_length(prompts, responses, steps)
    device = next(model.parameters()).device
    B = len(prompts)
    packed = pack(prompts, G, mask_id, pad_id, device)  # prompt | [MASK] x G | pad, as the sampler
    resp, real = packed.response, packed.real
    truth = packed.tokens.clone()
    truth[resp] = torch.tensor(responses, device=device).view(-1)  # row-major: each row's response
    mem = None if fast is None else fast.by_layer
    gens = [torch.Generator(device=device).manual_seed(prompt_seed(seed, p)) for p in prompts]
    resp_pos = resp.nonzero()[:, 1].view(B, G)
    x = packed.tokens.clone()  # the model's own state
    masked = resp.clone()
    curve = ExposureBiasCurve()
    for k, n_commit in enumerate(commit_schedule(G, steps)):
        # The forward on the state after step k scores L_seq(k) and picks the next commits.
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(tokens=x, fast=mem, positions=masked, key_mask=real)
        logp = torch.log_softmax(logits.double()[:, :vocab_size], -1)
        count = int(masked.sum())
        if k > 0:
            l_seq = -logp.gather(1, truth[masked][:, None]).sum()
            l_ctrl = _nll_sum(model, truth, masked, real, mem, mask_id, vocab_size, bf16)
            per_row = count // B
            nll = functools.partial(
                _nll_sum, model, truth, real=real, fast=mem, mask_id=mask_id, vocab=vocab_size, bf16=bf16
            )
            l_static = sum(nll(_static_mask(masked, resp_pos, per_row, gens)) for _ in range(static_draws))
            curve.steps.append(k)
            curve.masked_ratio.append(per_row / G)
            curve.L_seq.append(float(l_seq) / count)
            curve.L_control.append(float(l_ctrl) / count)
            curve.L_static.append(float(l_static) / (count * static_draws))
        _commit_greedy(logp, x, masked, n_commit, (mask_id, pad_id))
    return curve


def _response_length(prompts: list[list[int]], responses: list[list[int]], steps: int) -> int:
    G = len(responses[0])
    if any(len(r) != G for r in responses) or len(prompts) != len(responses):
        raise ValueError("exposure_bias needs one response per prompt, all of the same length")
    if not 1 <= steps <= G:
        raise ValueError(f"steps={steps}: expected 1..{G} (the response length)")
    return G


def _static_mask(
    masked: torch.Tensor, resp_pos: torch.Tensor, per_row: int, gens: list[torch.Generator]
) -> torch.Tensor:
    """A random mask of ``per_row`` response positions per row (the true forward process's state)."""
    smask = torch.zeros_like(masked)
    G = resp_pos.shape[1]
    for b, g in enumerate(gens):
        pick = torch.randperm(G, generator=g, device=g.device)[:per_row].to(masked.device)
        smask[b, resp_pos[b, pick]] = True
    return smask


def _commit_greedy(
    logp: torch.Tensor, x: torch.Tensor, masked: torch.Tensor, n_commit: int, banned: tuple[int, int]
) -> None:
    """Commit the ``n_commit`` most confident greedy predictions of each row into ``x`` (in place),
    never [MASK] or [PAD]; logp [N, V] at the masked positions (row-major)."""
    B = x.shape[0]
    conf, tok = logp.index_fill(1, torch.tensor(banned, device=x.device), float("-inf")).max(-1)
    conf, tok = conf.view(B, -1), tok.view(B, -1)
    slots = masked.nonzero()[:, 1].view(B, -1)  # absolute positions of the masked slots
    chosen = conf.topk(n_commit, dim=1).indices
    pos = slots.gather(1, chosen)
    x.scatter_(1, pos, tok.gather(1, chosen))
    masked.scatter_(1, pos, False)
