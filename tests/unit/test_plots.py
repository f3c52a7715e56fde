"""pipeline/plots.py: readable loss axes (no offset), the memory-gain panel, the moved plots."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.image
import matplotlib.pyplot as plt

from pipeline.plots import _plain_axis, plot_loss_curves


def test_close_losses_get_distinct_tick_labels_without_an_offset():
    fig, ax = plt.subplots()
    ax.plot([10, 20, 30], [6.68925, 6.68921, 6.68917], "o-")
    _plain_axis(ax)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    plt.close(fig)
    assert ax.yaxis.get_offset_text().get_text() == ""  # no "1e-5+6.689"
    assert len(labels) == len(set(labels)) >= 2
    assert all(label.startswith("6.689") for label in labels), labels


def test_a_memdlm_runs_png_has_the_memory_gain_panel(tmp_path):
    records = [{"step": s, "loss": 6.0 - 0.1 * s, "memory/gain": 1e-3 * s} for s in range(1, 6)]
    records[-1]["eval/loss"] = 5.5
    wide = matplotlib.image.imread(plot_loss_curves(records, tmp_path / "mem.png", "memdlm"))
    plain = [{k: v for k, v in r.items() if k != "memory/gain"} for r in records]
    narrow = matplotlib.image.imread(plot_loss_curves(plain, tmp_path / "mdlm.png", "mdlm"))
    assert wide.shape[1] > 1.5 * narrow.shape[1]


def test_the_moved_plots_are_importable_from_their_old_homes():
    from pipeline.eval.exposure_bias import plot_exposure_bias
    from pipeline.plots import plot_exposure_bias as moved
    from pipeline.tracking import plot_loss_curves as old

    assert plot_exposure_bias is moved and old is plot_loss_curves
