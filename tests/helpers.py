"""What several test files need, in one place: this checkout's root, free loopback ports, isolated
tracking stores, the environment and commands of the processes tests start (mlflow run, tgo,
torchrun, servers), a tiny ViT, an image folder, and a run interrupted and resumed. conftest.py
holds the fixtures, which call these. Test files import it as `helpers` (tests/ is on sys.path,
as it is for conftest.py, also in pytest-xdist's workers)."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


def free_port() -> int:
    """A free TCP port on loopback (pytest-xdist workers each start servers of their own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_TABLES: list[Path] = []  # a sqlite file with MLflow's tables and no experiment, made once per process


def sqlite_store(folder: Path) -> str:
    """The URI of a fresh sqlite tracking store in `folder`, ready before any subprocess uses it
    (several processes on a fresh sqlite file race on creating its tables), with its Default
    experiment, and in this process every experiment made later, keeping artifacts in
    `folder`/mlruns. The tables are copied from a store made once per process: MLflow takes
    seconds to create them; each copy gets a Default experiment of its own."""
    from mlflow.tracking import MlflowClient

    if not _TABLES:
        template = Path(tempfile.mkdtemp(prefix="tgo-tables-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()
        with contextlib.closing(sqlite3.connect(template)) as db:
            db.execute("DELETE FROM experiments")  # MLflow makes the Default experiment when it is missing
            db.commit()
        atexit.register(shutil.rmtree, template.parent, True)
        _TABLES.append(template)
    shutil.copyfile(_TABLES[0], folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    here = os.getcwd()
    os.chdir(folder)  # where this process's store for `uri` puts artifacts (./mlruns, resolved once)
    try:
        MlflowClient(uri).search_experiments()
    finally:
        os.chdir(here)
    return uri


def store_copy(trained, folder: Path, artifacts: Path | None = None) -> str:
    """A copy of the session smoke run's tracking database (conftest.trained_smoke_run) in `folder`,
    whose experiments put new runs' artifacts in `artifacts` (default folder/mlruns); the existing
    runs keep reading theirs, never written. What a test does in the copy (an analysis run, a
    deleted run, a full artifact store) leaves the other tests' store as it was."""
    shutil.copyfile(trained.folder / "mlflow.db", folder / "mlflow.db")
    new = str(artifacts or folder / "mlruns")
    with contextlib.closing(sqlite3.connect(folder / "mlflow.db")) as db:
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (str(trained.folder / "mlruns"), new))
        db.commit()
    return f"sqlite:///{folder / 'mlflow.db'}"


@contextlib.contextmanager
def tracking_store(uri: str, cwd: Path | None = None):
    """`uri` the tracking store while inside (MLFLOW_TRACKING_URI and MLflow's own setting), and
    `cwd`, if given, the working directory (where a sqlite store's new experiments keep their
    artifacts, ./mlruns); both put back after. For module- and session-scoped fixtures, which cannot
    use monkeypatch."""
    import mlflow

    old, here = os.environ.get("MLFLOW_TRACKING_URI"), os.getcwd()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield uri
    finally:
        os.chdir(here)
        mlflow.set_tracking_uri(None)
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def subprocess_env(uri: str, **extra: str) -> dict[str, str]:
    """The environment of a process a test starts (mlflow run, tgo, torchrun): tracking store `uri`,
    this checkout importable, this environment's tools first on PATH (as in an activated virtual
    environment: `python` in MLproject commands is this interpreter), no MLflow run or experiment
    inherited from the caller, and `extra` variables."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(ROOT), PATH=path, **extra)
    for key in MLFLOW_ENV[1:]:
        env.pop(key, None)
    return env


def mlflow_run(entry: str, experiment: str, uri: str, cwd: Path, *params: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`mlflow run <this checkout> -e entry` in the local environment, into `experiment` of the
    tracking store `uri`, started in `cwd`; `params` are its "name=value" parameters."""
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local", "--experiment-name", experiment]
    for param in params:
        cmd += ["-P", param]
    return subprocess.run(cmd, env=subprocess_env(uri), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def wait_for_server(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    """Until `url`/health answers: fail if `proc` (the server) ends first or `timeout` seconds pass,
    with the end of its `log` if there is one."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
        assert proc.poll() is None, f"mlflow server at {url} ended with status {proc.returncode}\n{tail}"
        time.sleep(0.5)
    raise AssertionError(f"mlflow server at {url} did not answer /health within {timeout:.0f} s\n"
                         + (log.read_text()[-3000:] if log is not None and log.exists() else ""))


def tiny_vit(seed: int = 0, **kwargs):
    """A 2-block ViT (32 px, 8 px patches -> 16 patch tokens, width 32) built through timm."""
    import timm
    import torch

    torch.manual_seed(seed)
    options = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    options.update(kwargs)
    return timm.models.vision_transformer.VisionTransformer(**options)


def image_tree(root: Path, classes=("a", "b"), per_class=4, size=16) -> None:
    """An image folder dataset under `root`: train/ and val/, one folder of random PNGs per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def interrupted_and_resumed(**settings):
    """Train with `settings` (an `experiment` of its own) once whole, and once stopped after epoch 1
    (an epoch callback raising StopTraining) then resumed: (whole, resumed) TrainResults."""
    import mlflow
    import pytest

    from tgo.train import StopTraining, run

    whole = run(**settings)

    def stop(epoch, _):
        if epoch == 1:
            raise StopTraining("interrupted for the test")

    with pytest.raises(StopTraining):
        run(**settings, epoch_callback=stop)
    (stopped,) = [r for r in mlflow.search_runs(experiment_names=[settings["experiment"]], output_format="list")
                  if r.info.run_id != whole.run_id]
    return whole, run(preset=settings["preset"], resume=stopped.info.run_id)


VOLATILE = ("time/", "train/images_per_s", "system/")  # metrics that differ between identical runs


def metric_steps(run_id: str) -> dict[str, dict[int, float]]:
    """Every metric of the run, step -> value; fails on a step logged twice."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    out = {}
    for key in client.get_run(run_id).data.metrics:
        hist = client.get_metric_history(run_id, key)
        steps = [m.step for m in hist]
        assert len(steps) == len(set(steps)), f"{key} has duplicated steps {steps}"
        out[key] = {m.step: m.value for m in hist}
    return out


def assert_same_metrics(a: dict, b: dict) -> None:
    """Two runs' `metric_steps` hold the same metrics at the same steps, to float tolerance (VOLATILE left out)."""
    import pytest

    keys = {k for k in a if not k.startswith(VOLATILE)}
    assert keys == {k for k in b if not k.startswith(VOLATILE)}
    for key in keys:
        assert a[key].keys() == b[key].keys(), key
        for step in a[key]:
            assert b[key][step] == pytest.approx(a[key][step], rel=1e-6, abs=1e-9), (key, step)
