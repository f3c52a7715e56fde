"""The matplotlib figures: a run's loss curves, MDLM vs MemDLM, the exposure-bias ratio.

matplotlib is imported inside each function (Agg backend): importing this module costs nothing.
Loss axes never use an offset (``1e-5+6.689``): close losses get as many digits as they need.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

GAIN = "memory/gain"  # outer loss with phi0 minus with phi2, same anchor (> 0: the memory helped)
# Each method's fixed colour (matplotlib's tab:blue / tab:orange), as CSS hex: launch/compare.py
# sets the same one as the MLflow run's colour, so the dashboard and loss_curves.png agree.
COLORS = {"mdlm": "#1f77b4", "memdlm": "#ff7f0e"}


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
    out, m = [], 0.0
    for i, v in enumerate(values, start=1):
        m = beta * m + (1 - beta) * v
        out.append(m / (1 - beta**i))
    return out


def _pyplot():
    # heavy: only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    # heavy: only when a figure is drawn
    import matplotlib.pyplot as plt

    return plt


def _plain_axis(ax) -> None:
    """No offset or scientific notation on the y axis; enough digits to tell the ticks apart."""
    # heavy: only when a figure is drawn
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    fmt = ScalarFormatter(useOffset=False)
    fmt.set_scientific(False)
    ax.yaxis.set_major_formatter(fmt)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    ax.grid(alpha=0.3)


def _series(records: list[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in pts], [v for _, v in pts]


def _gain_panel(ax, steps: list[int], gain: list[float], color: str = COLORS["memdlm"]) -> None:
    ax.axhline(0.0, color="grey", lw=0.8)
    if steps:
        ax.plot(steps, gain, color=color, alpha=0.3, marker="." if len(steps) < 40 else None)
        ax.plot(steps, ema(gain), color=color, label=f"EMA 0.9 (mean {sum(gain) / len(gain):+.2e})")
        ax.legend(fontsize=8)
    ax.set(
        title="memory gain: loss(phi0) - loss(phi2), same anchor",
        xlabel="step",
        ylabel="loss decrease from the memory",
    )
    _plain_axis(ax)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3), useOffset=False)


def plot_loss_curves(records: list[dict[str, Any]], path: Path, title: str) -> Path:
    """A run's train loss (raw and smoothed) and eval loss against step; with MemDLM's
    ``memory/gain`` records, a second panel with the memory's gain."""
    plt = _pyplot()
    steps, gain = _series(records, GAIN)
    fig, axes = plt.subplots(1, 2 if steps else 1, figsize=(12 if steps else 7, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    s, loss = _series(records, "loss")
    if s:
        ax.plot(s, loss, alpha=0.35, label="train (raw)")
        ax.plot(s, ema(loss), label="train (EMA 0.9)")
    es, ev = _series(records, "eval/loss")
    if es:
        ax.plot(es, ev, "o-", label="eval")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    _plain_axis(ax)
    if steps:
        _gain_panel(axes[0][1], steps, gain)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_compare(summary: dict[str, Any], path: Path) -> Path:
    """MDLM vs MemDLM: train loss, held-out loss, the memory's gain and its update norms."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=100)
    (train_ax, eval_ax), (gain_ax, upd_ax) = axes
    for method, c in summary["curves"].items():
        color = COLORS.get(method)
        train_ax.plot(c["steps"], c["loss"], color=color, alpha=0.25)
        train_ax.plot(c["steps"], c["loss_ema"], color=color, label=f"{method} (EMA 0.9)")
        if c["eval_steps"]:
            eval_ax.plot(c["eval_steps"], c["eval_loss"], "o-", ms=3, color=color, label=method)
    train_ax.set(title="train loss (raw, smoothed)", xlabel="step", ylabel="loss")
    eval_ax.set(title="held-out loss (memory off)", xlabel="step", ylabel="loss")
    for ax in (train_ax, eval_ax):
        ax.legend()
        _plain_axis(ax)
    mem = summary["curves"].get("memdlm", {})
    _gain_panel(gain_ax, mem.get("gain_steps", []), mem.get("gain", []), COLORS["memdlm"])
    for k, (s, norms) in enumerate(mem.get("update_norms", {}).values(), start=1):
        upd_ax.plot(s, norms, marker="." if len(s) < 40 else None, label=f"stage {k}")
    clip = summary.get("memdlm_clipped_frac")
    upd_ax.set(
        title="fast-weight update |phi_k - phi_k-1|"
        + (f" (clipped: {clip:.0%} of tensors)" if clip is not None else ""),
        xlabel="step",
        ylabel="norm",
    )
    if mem.get("update_norms"):
        upd_ax.legend()
    _plain_axis(upd_ax)
    upd_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3), useOffset=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_exposure_bias(curves: Mapping[str, Any], path: str | Path) -> Path:
    """R(step) per setting (and the selection-only control dashed) into a PNG.

    ``curves`` maps a setting's name to a ``pipeline.eval.exposure_bias.ExposureBiasCurve``."""
    plt = _pyplot()
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
