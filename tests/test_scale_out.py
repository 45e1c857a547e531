"""The README's layout for several machines, end to end on loopback: an MLflow tracking server with a
PostgreSQL backend store and proxied artifacts, Optuna on PostgreSQL, workers pointed at both;
workers killed, a server that goes down, and everything read back through the server."""

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import free_port, subprocess_env, wait_for_server
from tgo import tracking
from tgo.probe import ProbeResult
from tgo.storage import open_storage

pytestmark = pytest.mark.slow  # servers, PostgreSQL and workers in processes of their own


class Server:
    """`mlflow server` with a PostgreSQL backend store and proxied artifacts, on a free loopback port."""

    def __init__(self, backend: str, artifacts: Path, log: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend, self.artifacts, self.log = backend, artifacts, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
        cmd = [mlflow_bin, "server", "--backend-store-uri", self.backend, "--artifacts-destination", str(self.artifacts),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_server(self.uri, self.proc, timeout=180, log=self.log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its worker processes
            self.proc.wait(timeout=60)


def _fresh_database(postgres_url: str, prefix: str) -> str:
    import sqlalchemy

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return postgres_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="module")
def server(postgres_url, tmp_path_factory):
    """One server for this file's tests (a database of its own: MLflow's tables and Optuna's share
    names such as alembic_version); the last test stops and restarts it."""
    folder = tmp_path_factory.mktemp("server")
    srv = Server(_fresh_database(postgres_url, "mlflow"), folder / "artifacts", folder / "server.log")
    srv.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", srv.uri)
        mp.chdir(folder)
        mlflow.set_tracking_uri(srv.uri)
        try:
            yield srv
        finally:
            srv.stop()
            mlflow.set_tracking_uri(None)


@pytest.fixture(autouse=True)
def _tracking_uri(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)  # conftest restores the environment after each test
    mlflow.set_tracking_uri(server.uri)


def _sweep_cmd(storage: str, name: str) -> list[str]:
    return [sys.executable, "-m", "tgo", "sweep", "--seeds", "0,1", "--storage", storage, "--study_name", name, "--preset", "smoke",
            "--epochs", "2", "--synthetic_train_size", "512", "--experiment", "scale"]


def test_a_sweep_shared_by_two_workers_through_a_tracking_server_and_postgresql(server, postgres_url, tmp_path):
    name = f"scale-{uuid.uuid4().hex[:8]}"
    storage = _fresh_database(postgres_url, "optuna")  # fresh: the workers started together create its tables
    # Worker a does not take over dead trials itself (a long grace period), so that the killed
    # worker's seed is finished by the restarted worker c, as when a machine is replaced.
    env_a = subprocess_env(server.uri, TGO_HEARTBEAT_INTERVAL="1", TGO_GRACE_PERIOD="600")
    env_c = subprocess_env(server.uri, TGO_HEARTBEAT_INTERVAL="1", TGO_GRACE_PERIOD="3")
    a = subprocess.Popen(_sweep_cmd(storage, name), env=env_a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen(_sweep_cmd(storage, name), env=env_a, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in b.stdout:  # killed mid-epoch: as soon as epoch 1 is recorded, while epoch 2 trains
        if line.startswith("tgo: epoch 1/2"):
            break
    b.send_signal(signal.SIGKILL)
    b.wait(timeout=60)
    out_a, err_a = a.communicate(timeout=900)
    assert a.returncode == 0, err_a[-3000:]
    assert "not complete yet" in out_a  # the dead worker's seed is still RUNNING for a

    time.sleep(4)  # past c's grace period: b's heartbeat is stale
    c = subprocess.run(_sweep_cmd(storage, name), env=env_c, capture_output=True, text=True, timeout=900)
    assert c.returncode == 0, c.stderr[-3000:]

    # Everything read back through the server.
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    trials = study.get_trials()
    (dead,) = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.params["seed"] for t in trials if t.state == TrialState.COMPLETE) == [0, 1]
    parent = study.user_attrs["mlflow_parent_run_id"]
    client = MlflowClient()
    children = mlflow.search_runs(experiment_names=["scale"], filter_string=f"tags.mlflow.parentRunId = '{parent}'", output_format="list")
    assert sorted(int(r.data.params["config.seed"]) for r in children) == [0, 1]  # one run per seed
    assert all(r.info.status == "FINISHED" for r in children)
    resumed = client.get_run(dead.user_attrs["mlflow_run_id"])  # b's run, continued by c from its checkpoint
    assert resumed.info.run_id in {r.info.run_id for r in children} and "died" in resumed.data.tags["tgo.previous_error"]

    key = "geom/final/cls/effective_rank"
    finals = []
    for run in children:
        run_id = run.info.run_id
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [0, 1, 2]  # every epoch once, the resumed run too
        finals.append({m.step: m.value for m in history})
        names = {a.path for a in client.list_artifacts(run_id, "geometry/spectra")}
        assert names == {f"geometry/spectra/epoch_{e:04d}.npz" for e in range(3)}
        spectra = ProbeResult.load(tracking.download(run_id, "geometry/spectra/epoch_0002.npz", tmp_path / run_id))
        assert spectra.metrics()[key] == pytest.approx(finals[-1][2], rel=1e-6)
        checkpoint = tracking.load_checkpoint(tracking.download(run_id, "checkpoints/last.pt", tmp_path / run_id))
        assert checkpoint["epoch"] == 2 and checkpoint["run_id"] == run_id
        assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} >= {"checkpoints/weights_epoch_0000.pt", "checkpoints/weights_epoch_0002.pt"}
    # The aggregate in the parent equals numpy on the children's histories.
    mean = {m.step: m.value for m in client.get_metric_history(parent, f"seeds/mean/{key}")}
    assert mean == pytest.approx({e: np.mean([h[e] for h in finals]) for e in range(3)})

    # tgo analyze against the server.
    target = children[0].info.run_id
    proc = subprocess.run([sys.executable, "-m", "tgo", "analyze", target], env=subprocess_env(server.uri), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    analysis_id = re.search(r"analysis run ([0-9a-f]{32})", proc.stdout).group(1)
    analysis = client.get_run(analysis_id)
    assert analysis.data.tags["mlflow.parentRunId"] == target
    assert "report/report.md" in {a.path for a in client.list_artifacts(analysis_id, "report")}


def test_a_tracking_server_that_goes_down_ends_in_one_message_and_resume_continues(server, tmp_path):
    env = subprocess_env(server.uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
                         MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    cmd = [sys.executable, "-m", "tgo", "train", "--preset", "smoke", "--epochs", "4", "--experiment", "down"]
    victim = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in victim.stdout:
        if line.startswith("tgo: epoch 1/4"):
            server.stop()
            break
    out, err = victim.communicate(timeout=600)
    assert victim.returncode == 1
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("tgo: error")]) == 1, err[-3000:]
    assert "stopped accepting writes" in err
    run_id = re.search(r"tgo train --resume ([0-9a-f]{32})", err).group(1)

    server.start()  # the same backend store and artifacts
    client = MlflowClient()
    assert client.get_run(run_id).info.status == "RUNNING"  # could not be marked while the server was down
    proc = subprocess.run([sys.executable, "-m", "tgo", "train", "--resume", run_id], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/loss")) == list(range(5))
