"""The MLflow UI as a user meets it: `mlflow server` on loopback over a store with a training run
and its analysis, pages rendered by headless Chromium, and the REST API."""

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import free_port, sqlite_store, tracking_store, wait_for_server

pytestmark = pytest.mark.slow  # a training run, an mlflow server and headless Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--virtual-time-budget=60000", "--run-all-compositor-stages-before-draw", "--window-size=1600,1100"]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui")
    uri = sqlite_store(folder)
    with tracking_store(uri, cwd=folder):
        from tgo.analysis import analyze
        from tgo.train import run

        trained = run(preset="smoke", epochs=2, experiment="ui", run_name="ui-smoke")
        analysed = analyze(trained.run_id, output_dir=folder / "analysis")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(base, proc, timeout=300)
        exp = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui")["experiment"]["experiment_id"]
        yield {"base": base, "run_id": trained.run_id, "analysis_id": analysed.analysis_run_id, "experiment_id": exp, "folder": folder}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers, by process id
        proc.wait(timeout=30)


def test_rest_api_has_the_geometry_params_and_figures(server):
    base, rid = server["base"], server["run_id"]
    run = _get(f"{base}/api/2.0/mlflow/runs/get?run_id={rid}")["run"]
    metrics = {m["key"] for m in run["data"]["metrics"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert "geom/final/cls/effective_rank" in metrics and "geom/block_00/patch/spectral_anisotropy" in metrics
    assert params["config.preset"] == "smoke"
    history = _get(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={rid}&metric_key=geom/final/cls/effective_rank")["metrics"]
    assert sorted(m["step"] for m in history) == [0, 1, 2]
    files = _get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={server['analysis_id']}&path=figures")["files"]
    assert "figures/epochs_effective_rank.png" in {f["path"] for f in files}
    with urllib.request.urlopen(f"{base}/get-artifact?path=figures/epochs_effective_rank.png&run_uuid={server['analysis_id']}", timeout=30) as r:
        assert r.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_pages_render_in_headless_chromium(server):
    base, exp, rid = server["base"], server["experiment_id"], server["run_id"]
    shots = Path(os.environ.get("TGO_UI_SCREENSHOTS", server["folder"] / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    pages = {
        "experiment": f"{base}/#/experiments/{exp}?workflowType=machine_learning",
        "run_metrics": f"{base}/#/experiments/{exp}/runs/{rid}/model-metrics?workflowType=machine_learning",
        "analysis_artifacts": f"{base}/#/experiments/{exp}/runs/{server['analysis_id']}/artifacts?workflowType=machine_learning",
    }
    for name, url in pages.items():
        profile = server["folder"] / f"profile-{name}"
        shot = shots / f"{name}.png"
        subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", url], capture_output=True, timeout=180)
        with Image.open(shot) as img:
            pixels = np.asarray(img.convert("L"), dtype=float)
        assert pixels.std() > 10, f"{name}: the screenshot is blank"
        dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
        if name == "experiment":
            assert "ui-smoke" in dom, "the experiment page lists the run"
        if name == "run_metrics":
            assert "geom/final/cls" in dom, "the run page shows the geometry metric sections"
        if name == "analysis_artifacts":
            assert "figures" in dom
