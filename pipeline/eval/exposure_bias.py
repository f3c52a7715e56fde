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

    python -m pipeline.eval.run --checkpoint runs/local/export   # includes this (make eval)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.memory.fast_weights import FastWeights
from pipeline.sample import commit_schedule, pack, prompt_seed


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
    G = len(responses[0])
    if any(len(r) != G for r in responses) or len(prompts) != len(responses):
        raise ValueError("exposure_bias needs one response per prompt, all of the same length")
    if not 1 <= steps <= G:
        raise ValueError(f"steps={steps}: expected 1..{G} (the response length)")
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
            l_static = torch.zeros((), dtype=torch.float64, device=device)
            per_row = count // B
            for _ in range(static_draws):
                smask = torch.zeros_like(masked)
                for b, g in enumerate(gens):
                    pick = torch.randperm(G, generator=g, device=g.device)[:per_row].to(device)
                    smask[b, resp_pos[b, pick]] = True
                l_static += _nll_sum(model, truth, smask, real, mem, mask_id, vocab_size, bf16)
            curve.steps.append(k)
            curve.masked_ratio.append(per_row / G)
            curve.L_seq.append(float(l_seq) / count)
            curve.L_control.append(float(l_ctrl) / count)
            curve.L_static.append(float(l_static) / (count * static_draws))
        # commit the n most confident greedy predictions of each row (never [MASK] or [PAD])
        conf, tok = logp.index_fill(1, torch.tensor([mask_id, pad_id], device=device), float("-inf")).max(-1)
        conf, tok = conf.view(B, -1), tok.view(B, -1)
        slots = masked.nonzero()[:, 1].view(B, -1)  # absolute positions of the masked slots
        chosen = conf.topk(n_commit, dim=1).indices
        pos = slots.gather(1, chosen)
        x.scatter_(1, pos, tok.gather(1, chosen))
        masked.scatter_(1, pos, False)
    return curve


def plot_exposure_bias(curves: dict[str, ExposureBiasCurve], path: str | Path) -> Path:
    """R(step) per setting (and the selection-only control dashed) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.0 + 0.22 * 2 * len(curves)))
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(c.steps, c.R, color=color, marker="o", ms=3, label=f"{name}: L_seq / L_static")
        sel = c.to_json()["R_selection"]
        ax.plot(c.steps, sel, color=color, ls="--", lw=1, label=f"{name}: control (selection only)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("denoising steps taken")
    ax.set_ylabel("exposure-bias ratio R")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    ax.set_title("Exposure bias over the denoising trajectory")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
