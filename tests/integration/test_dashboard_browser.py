"""The comparison's dashboard in a real browser: `mlflow ui` over a store written by a short
comparison, the printed URL opened in headless Chromium, both runs and the curves rendered.

Chromium is Debian's (``.ci/install-chromium.sh``, run here when it is missing); without it the
test is skipped with the reason, except in CI (``CI=true``) where it fails.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from launch.compare import RUN_COLOR_TAG, compare
from pipeline.plots import COLORS
from tests import _chromium
from tests._mlflow import MlflowServer, _proc
from tests.conftest import require_service, tiny_run_overrides

# Legend entries: "<run name> (<metric>)" (drawn before the data arrives).
EXPECTED = ("mdlm (loss)", "memdlm (loss)", "mdlm (eval/loss)", "memdlm (eval/loss)", "memdlm (memory/gain)")
# Per chart, in page order: the number of plotted line paths (plotly draws its `path.js-line`s
# once a trace's points are loaded; the same number per run in every chart).
CHARTS_JS = """[...document.querySelectorAll('.js-plotly-plot')].map(p =>
  [...p.querySelectorAll('.scatterlayer path.js-line')].filter(e => (e.getAttribute('d') || '').length > 10).length)"""


# The stroke colours of the plotted lines of the first chart (train loss: one line per run).
STROKES_JS = """[...document.querySelectorAll('.js-plotly-plot')[0].querySelectorAll('.scatterlayer path.js-line')]
  .filter(e => (e.getAttribute('d') || '').length > 10).map(e => e.style.stroke)"""


def _rgb(colour: str) -> str:
    """``#1f77b4`` -> ``rgb(31, 119, 180)``, as the browser reports a computed stroke."""
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def _drawn(lines) -> bool:
    """loss and eval/loss: a line per run (both runs); memory/gain: MemDLM's only."""
    return bool(lines) and len(lines) >= 3 and lines[2] > 0 and lines[0] == lines[1] == 2 * lines[2]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _chromium.find()
    reason = "no chromium on PATH"
    if path is None:
        try:
            res = _proc.run(["bash", ".ci/install-chromium.sh"], timeout=600)
            reason = f"chromium could not be installed: {(res.stderr or res.stdout).strip()[-300:]}"
        except subprocess.TimeoutExpired:
            reason = "installing chromium took over 10 minutes"
        path = _chromium.find()
    require_service(reason if path is None else None, "Chromium")
    return path


def test_the_printed_url_shows_both_runs_loss_curves_and_the_memory_gain(
    chromium, world1, tiny_dataset, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    t0 = time.monotonic()
    root = tmp_path / "runs"
    root.mkdir()
    store = f"sqlite:///{root}/mlflow.db"
    MlflowClient(tracking_uri=store).search_experiments()  # the schema, before two processes open it
    # The UI starts (~10-40 s of imports) while the comparison trains.
    with MlflowServer(tmp_path, store=store, ui=True) as server:
        server.launch()
        base = server.url
        overrides = [
            o for o in tiny_run_overrides(tiny_dataset, root, "checkpoint.every=0") if o != "log_every=1"
        ]
        out = compare("configs/train/local.yaml", 8, [*overrides, "eval.batches=1"])
        summary = json.loads((out / "compare.json").read_text())
        url = base + "/#" + summary["dashboard_route"]
        assert summary["dashboard_url"].endswith("/#" + summary["dashboard_route"])
        t_compare = time.monotonic()
        server.wait()
        t_server = time.monotonic()
        with _chromium.browser(url, tmp_path / "chromium-profile", chromium) as page:
            lines = page.wait_until(CHARTS_JS, _drawn, timeout=90)
            strokes = page.evaluate(STROKES_JS)
            t_page = time.monotonic()
            text = page.text()
            shot = page.screenshot(out / "dashboard.png")
    print(
        f"dashboard test: compare {t_compare - t0:.1f} s, then mlflow ui up {t_server - t_compare:.1f} s, "
        f"page rendered {t_page - t_server:.1f} s"
    )
    missing = [e for e in EXPECTED if e not in text]
    assert not missing, f"not rendered: {missing}; screenshot: {shot}\n{text[:3000]}"
    assert "MDLM vs MemDLM" in text and "2 matching runs" in text, text[:3000]
    assert text.index("MDLM vs MemDLM") < text.index("Model metrics")
    assert f"compare-{out.name}" not in text.split("MDLM vs MemDLM")[0]  # the parent is not listed
    assert _drawn(lines), f"plotted lines per chart: {lines}; screenshot: {shot}"
    # each method in its own fixed colour (the runs' mlflow.runColor tags), as in loss_curves.png
    client = MlflowClient(tracking_uri=store)
    tags = {m: client.get_run(summary["run_ids"][m]).data.tags.get(RUN_COLOR_TAG) for m in COLORS}
    assert tags == COLORS and tags["mdlm"] != tags["memdlm"]
    assert sorted(set(strokes)) == sorted(_rgb(c) for c in COLORS.values()), f"{strokes}; screenshot: {shot}"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the screenshot travels with the comparison: its directory and the parent run's artifacts
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    parent = client.get_run(summary["run_ids"]["mdlm"]).data.tags["mlflow.parentRunId"]
    client.log_artifact(parent, str(shot))
    assert "dashboard.png" in {a.path for a in client.list_artifacts(parent)}
