"""An independent plain-PyTorch DLM + MDLM + MemDLM, written from the spec, for the tests to compare against.

Reads the weights of a TP=1 ``DLMTransformer`` (or MoE transformer) but none of its code: RMSNorm, RoPE (as a
complex rotation, partial when rotary_dim < head size), attention (grouped-query, explicit
softmax, optional q/k RMSNorm per head or over the whole projection), SwiGLU, LoRA deltas (explicit per-sample
loops), the weighted cross-entropy and the two-stage inner loop are all re-derived here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tests import reference_moe


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, theta: float, rotary_dim: int | None = None) -> torch.Tensor:
    """x [B, T, H, hd]: with r = rotary_dim (default hd), pairs (x[j], x[j + r/2]) for j < r/2 rotated
    as complex numbers by pos * theta^(-2j/r); dims r.. pass through. Complex64 arithmetic, complex128
    for a float64 x."""
    _, T, _, hd = x.shape
    r = hd if rotary_dim is None else rotary_dim
    half = r // 2
    wide = x.dtype == torch.float64
    real = torch.float64 if wide else torch.float32
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / r)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None]
    rot = torch.polar(torch.ones_like(angle), angle).to(torch.complex128 if wide else torch.complex64)
    z = torch.complex(x[..., :half].to(real), x[..., half:r].to(real)) * rot[None, :, None, :]
    return torch.cat([z.real, z.imag, x[..., r:].to(real)], dim=-1).to(x.dtype)


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


def qk_norm(x: torch.Tensor, w: torch.Tensor, mode: str, eps: float) -> torch.Tensor:
    """x [B, T, heads, hd]: RMS-normalised over each head ("head", w [hd]) or over all heads of the
    projection ("full", w [heads * hd]); "none" leaves it."""
    if mode == "head":
        return rms(x, w, eps)
    if mode == "full":
        return rms(x.flatten(-2), w, eps).view(x.shape)
    return x


def attention(model, i: int, x: torch.Tensor, fast: dict | None) -> torch.Tensor:
    """x [B, T, D] -> x + Attn(RMSNorm(x)) of layer i: grouped-query attention (query head h reads
    key/value head h // (H / KV)), optional q/k norm before RoPE, RoPE on the first rotary_dim dims,
    an explicit softmax over all positions (bidirectional)."""
    blk, cfg = model.layers[i], model.cfg
    B, T, _ = x.shape
    H, KV, hd = cfg.n_heads, cfg.kv_heads, cfg.head_size
    g = H // KV
    a = rms(x, blk.attn_norm.weight, cfg.norm_eps)
    qkv = linear(a, blk.qkv.weight, fast, "qkv")
    if blk.qkv.bias is not None:
        qkv = qkv + blk.qkv.bias
    # our fused rows: per KV group, its g query heads, then its key head, then its value head
    qkv = qkv.view(B, T, KV, g + 2, hd)
    q, k, v = qkv[..., :g, :].reshape(B, T, H, hd), qkv[..., g, :], qkv[..., g + 1, :]
    if cfg.qk_norm != "none":
        q = qk_norm(q, blk.q_norm.weight, cfg.qk_norm, cfg.norm_eps)
        k = qk_norm(k, blk.k_norm.weight, cfg.qk_norm, cfg.norm_eps)
    q, k = rope(q, cfg.rope_theta, cfg.rotary_dim), rope(k, cfg.rope_theta, cfg.rotary_dim)
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)  # [B, T, H, hd]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, H * hd)
    return x + linear(att, blk.out.weight, fast, "out")


def ffn(model, i: int, h: torch.Tensor, fast: dict | None) -> torch.Tensor:
    """h [B, T, D] -> h + SwiGLU(RMSNorm(h)) of layer i: down(silu(gate) * up); in a
    mixture-of-experts layer, h + the dense-masked MoE of tests/reference_moe.py."""
    blk, cfg = model.layers[i], model.cfg
    n = rms(h, blk.ffn_norm.weight, cfg.norm_eps)
    if hasattr(blk, "moe"):
        return h + reference_moe.moe_ffn(n, reference_moe.weights_of(blk.moe), cfg, fast)[0]
    g = linear(n, blk.gate.weight, fast, "gate")
    u = linear(n, blk.up.weight, fast, "up")
    return h + linear(g * torch.sigmoid(g) * u, blk.down.weight, fast, "down")


def block(model, i: int, x: torch.Tensor, fast: dict | None) -> torch.Tensor:
    """Layer i: :func:`attention` then :func:`ffn`, each with its residual."""
    return ffn(model, i, attention(model, i, x, fast), fast)


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
