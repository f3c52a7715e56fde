"""An independent plain-PyTorch DLM + MDLM + MemDLM, written from the spec, for the tests to compare against.

Reads the weights of a TP=1 ``DLMTransformer`` but none of its code: RMSNorm, RoPE (as a
complex rotation), attention (explicit softmax), SwiGLU, LoRA deltas (explicit per-sample
loops), the weighted cross-entropy and the two-stage inner loop are all re-derived here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, T, H, hd]: pairs (x[j], x[j + hd/2]) rotated as complex numbers by pos * theta^(-2j/hd)."""
    _, T, _, hd = x.shape
    half = hd // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None]
    rot = torch.polar(torch.ones_like(angle), angle).to(torch.complex64)  # [T, half]
    z = torch.complex(x[..., :half].float(), x[..., half:].float()) * rot[None, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, fast: dict | None, name: str) -> torch.Tensor:
    """x [B, T, in] @ (W + delta)^T, with the delta applied sample by sample (no batched einsum)."""
    y = x @ w.t()
    if not fast or (name + ".A" not in fast and name + ".W" not in fast):
        return y
    outs = []
    for b in range(x.shape[0]):
        if name + ".W" in fast:
            dw = fast[name + ".W"]
            dw = dw[b] if dw.dim() == 3 else dw
            outs.append(x[b] @ dw.t())
        else:
            A, Bm = fast[name + ".A"], fast[name + ".B"]
            A = A[b] if A.dim() == 3 else A
            Bm = Bm[b] if Bm.dim() == 3 else Bm
            outs.append(float(fast["scale"]) * (x[b] @ A.t()) @ Bm.t())
    return y + torch.stack(outs)


def block(model, i: int, x: torch.Tensor, fast: dict | None) -> torch.Tensor:
    blk, cfg = model.layers[i], model.cfg
    B, T, D = x.shape
    H, hd = cfg.n_heads, cfg.head_dim
    a = rms(x, blk.attn_norm.weight, cfg.norm_eps)
    qkv = linear(a, blk.qkv.weight, fast, "qkv").view(B, T, H, 3, hd)
    q, k, v = rope(qkv[..., 0, :], cfg.rope_theta), rope(qkv[..., 1, :], cfg.rope_theta), qkv[..., 2, :]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, D)
    x = x + linear(att, blk.out.weight, fast, "out")
    h = rms(x, blk.ffn_norm.weight, cfg.norm_eps)
    g = linear(h, blk.gate.weight, fast, "gate")
    u = linear(h, blk.up.weight, fast, "up")
    return x + linear(g * torch.sigmoid(g) * u, blk.down.weight, fast, "down")


def hidden(model, tokens=None, *, h=None, start=0, end=None, fast=None) -> torch.Tensor:
    end = model.cfg.n_layers if end is None else end
    if h is None:
        h = model.embedding.weight[tokens]
    for i in range(start, end):
        h = block(model, i, h, None if fast is None else fast.get(i))
    return h


def logits(model, h: torch.Tensor) -> torch.Tensor:
    out = rms(h, model.final_norm.weight, model.cfg.norm_eps) @ model.head.weight.t()
    # padded vocabulary rows are never in a softmax (the model sets them to PAD_LOGIT = -2**100)
    return out.masked_fill(torch.arange(out.shape[-1]) >= model.cfg.vocab_size, -(2.0**100))


def mdlm_loss(model, tokens, t, mask, maskable, fast=None, h_below=None, start=0) -> torch.Tensor:
    """sum over masked of CE / t, divided by the maskable count (linear schedule, token norm)."""
    noisy = torch.where(mask, model_mask_id(model), tokens)
    h = (
        hidden(model, noisy, fast=fast)
        if h_below is None
        else hidden(model, h=h_below, start=start, fast=fast)
    )
    ce = F.cross_entropy(logits(model, h)[mask].float(), tokens[mask], reduction="none")
    w = (1.0 / t)[:, None].expand_as(mask)[mask]
    return (ce * w).sum() / maskable.sum()


_MASK_ID = {"id": 4}


def model_mask_id(model) -> int:
    return _MASK_ID["id"]


def inner_sgd(loss: torch.Tensor, phi: dict, lr: float, clip: float) -> dict:
    """phi - lr * g * min(1, clip / (|g| + 1e-6)) for each tensor separately (batch scope)."""
    keys = [k for k in phi if k != "scale"]
    grads = torch.autograd.grad(loss, [phi[k] for k in keys])
    out = {"scale": phi["scale"]}
    for k, g in zip(keys, grads, strict=True):
        coef = min(1.0, clip / (g.norm().item() + 1e-6))
        out[k] = (phi[k] - lr * coef * g).detach().requires_grad_(True)
    return out


def stage_loss(model, tokens, state_mask, weight, fast, first) -> torch.Tensor:
    """Inner CE loss at ``state_mask`` / number of loss positions, per-sequence weight [B]."""
    noisy = torch.where(state_mask, model_mask_id(model), tokens)
    with torch.no_grad():
        h_below = hidden(model, noisy, end=first)
    h = hidden(model, h=h_below, start=first, fast=fast)
    ce = F.cross_entropy(logits(model, h)[state_mask].float(), tokens[state_mask], reduction="none")
    w = weight[:, None].expand_as(state_mask)[state_mask]
    return (ce * w).sum() / state_mask.sum().clamp(min=1)
