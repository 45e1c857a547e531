"""Faults that `tgo analyze` and `tgo compare` meet, each the way a user meets it, through the
command in a process of its own: a full TMPDIR and a full artifact store (small tmpfs mounts), a
tracking server with basic auth given the wrong password, a deleted run, and the working folders
every command used to leave in TMPDIR. Each ends in one message that names what happened, what is
safe and what to do, with no traceback, and leaves no run RUNNING and no folder behind.

The runs read are the session's smoke run (conftest.trained_smoke_run) through a copy of its
tracking database (`helpers.store_copy`): the copy's runs read the same artifact files, never written, and
what a test does in the copy (delete a run, fill its artifact store) leaves the other tests' store
as it was."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import free_port, store_copy, subprocess_env, wait_for_server

# torch keeps one compile cache per user in TMPDIR (torchinductor_<user>), shared and reused, not
# per command: the tests put it beside TMPDIR, so that what is left in TMPDIR is tgo's alone.
INDUCTOR = "TORCHINDUCTOR_CACHE_DIR"


def _tgo(uri: str, tmpdir: Path, *argv: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m tgo ARGV` against the tracking store `uri`, with TMPDIR `tmpdir`."""
    return subprocess.run(
        [sys.executable, "-m", "tgo", *argv],
        env=subprocess_env(uri, TMPDIR=str(tmpdir), **{INDUCTOR: str(tmpdir.parent / "inductor")}, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmpdir.parent,
    )


def _one_message(proc: subprocess.CompletedProcess, code: int, *parts: str) -> str:
    """The command failed with exit status `code` and one `tgo: error:` line holding `parts`."""
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("tgo: error: "), proc.stderr[-3000:]
    message = proc.stderr.strip()
    assert message.count("\n") == 0, message
    for part in parts:
        assert part in message, message
    return message


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` while inside: a real full disk (root only)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _runs(uri: str) -> dict[str, str]:
    """Every run of the store, active or deleted: id -> status."""
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=3)]
    return {r.info.run_id: r.info.status for r in client.search_runs(experiments, run_view_type=3)}


@pytest.fixture
def copy_store(trained_smoke_run, tmp_path, monkeypatch):
    """`store_copy` in tmp_path as this process's tracking store, and tmp_path/tmp this process's
    TMPDIR (tempfile's cached choice too): for the commands run in-process with `_cli`."""
    import tempfile

    import mlflow

    uri = store_copy(trained_smoke_run, tmp_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setenv(INDUCTOR, str(tmp_path / "inductor"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def _cli(capsys, *argv: str) -> subprocess.CompletedProcess:
    """`tgo ARGV` in this process (`tgo.cli.main`, as the command line runs it), for the second and
    later commands of a test: each `python -m tgo` spends about 7 CPU-seconds importing torch and
    MLflow before it starts, and the first command of each test runs that way."""
    from tgo import cli

    capsys.readouterr()
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["tgo", *argv], code, out.out, out.err)


@pytest.mark.slow
def test_a_full_tmpdir_is_named_and_nothing_is_logged_or_left(trained_smoke_run, tmp_path, monkeypatch, capsys):
    """Issue 24 item 3: a full TMPDIR said `run ... has no artifact geometry/spectra`, blaming a run
    that has them; item 11: the failed command left its folder there."""
    import tempfile

    uri = store_copy(trained_smoke_run, tmp_path)
    run_id = trained_smoke_run.result.run_id
    before = _runs(uri)
    with _tmpfs(tmp_path / "tmp", "200k") as tmpdir:
        first = _tgo(uri, tmpdir, "analyze", run_id, "--no-figures")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv(INDUCTOR, str(tmp_path / "inductor"))
        monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
        second = _cli(capsys, "compare", run_id, run_id, "--no-figures")
        for proc in (first, second):
            message = _one_message(proc, 1, "no space left", f"of run {run_id}", f"(TMPDIR {tmpdir})",
                                   "nothing was logged", "point TMPDIR (or --output_dir) at a disk with room")
            assert "has no artifact" not in message
            assert os.listdir(tmpdir) == [], f"{proc.args} left {os.listdir(tmpdir)}"
    assert _runs(uri) == before


@pytest.mark.slow
def test_a_full_artifact_store_fails_the_analysis_run_in_one_message(trained_smoke_run, tmp_path):
    """Issue 24 item 3: a full disk under the artifact store while the analysis logs its files was a
    traceback, and the analysis run stayed RUNNING."""
    run_id = trained_smoke_run.result.run_id
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    with _tmpfs(tmp_path / "store", "16k") as store:  # room for the first table or two, not for the rest
        uri = store_copy(trained_smoke_run, tmp_path, artifacts=store)
        proc = _tgo(uri, tmpdir, "analyze", run_id, "--no-figures")
        message = _one_message(proc, 1, "no space left in the artifact store", "marked FAILED", f"tgo analyze {run_id}",
                               f"{run_id} and its artifacts are unchanged")
    client = MlflowClient(uri)
    (analysis,) = [r for r in client.search_runs([client.get_run(run_id).info.experiment_id]) if r.data.tags.get("tgo.kind") == "analysis"]
    assert analysis.info.run_id in message and analysis.info.status == "FAILED"
    assert "no space left in the artifact store" in analysis.data.tags["tgo.error"]
    assert "tgo.analysis_run" not in client.get_run(run_id).data.tags  # set only once an analysis succeeded
    assert os.listdir(tmpdir) == []


@pytest.mark.slow
def test_a_deleted_run_is_refused_before_anything_is_made(trained_smoke_run, copy_store, tmp_path, capsys):
    """Issue 24 item 9: analysing or comparing a deleted run made and finished an analysis or
    comparison run, then failed with MLflow's "must be in the 'active' state"."""
    run_id = trained_smoke_run.result.run_id
    MlflowClient(copy_store).delete_run(run_id)
    before = _runs(copy_store)
    tmpdir = tmp_path / "tmp"
    first = _tgo(copy_store, tmpdir, "analyze", run_id, "--no-figures")
    second = _cli(capsys, "compare", run_id, run_id, "--no-figures")
    for proc, which in ((first, ""), (second, "run_a: ")):
        _one_message(proc, 2, f"{which}run {run_id} is deleted", "nothing was created", f"mlflow runs restore --run-id {run_id}")
    assert _runs(copy_store) == before and os.listdir(tmpdir) == []


@pytest.mark.slow
def test_analyze_and_compare_leave_nothing_in_tmpdir(trained_smoke_run, copy_store, tmp_path, capsys):
    """Issue 24 item 11: every analysis and comparison left its working folder in TMPDIR; only an
    --output_dir, or a comparison that logs nothing (its files are then its only result), is kept."""
    run_id = trained_smoke_run.result.run_id
    tmpdir = tmp_path / "tmp"
    analysed = _cli(capsys, "analyze", run_id, "--no-figures")
    assert analysed.returncode == 0, analysed.stderr[-3000:]
    assert "report report/report.html in analysis run" in analysed.stdout and os.listdir(tmpdir) == []
    compared = _cli(capsys, "compare", run_id, run_id, "--no-figures")
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "report report/report.html in comparison run" in compared.stdout and os.listdir(tmpdir) == []
    failed = _cli(capsys, "analyze", run_id, "--sites", "block_07/cls")  # bad input found once the folder is made
    assert failed.returncode == 2 and "were not measured" in failed.stderr and os.listdir(tmpdir) == []
    unlogged = _cli(capsys, "compare", run_id, run_id, "--no-figures", "--no-log")
    (kept,) = os.listdir(tmpdir)
    assert f"report {tmpdir / kept / 'report' / 'report.html'} (not logged)" in unlogged.stdout
    assert sorted(os.listdir(tmpdir / kept)) == ["comparison.json", "report", "tables"]  # its downloads removed
    assert "RUNNING" not in _runs(copy_store).values()


@pytest.mark.slow
def test_a_wrong_password_is_one_message_naming_the_server_never_the_password(trained_smoke_run, tmp_path, monkeypatch, capsys):
    """Issue 24 item 6: a wrong MLFLOW_TRACKING_PASSWORD against a server with basic auth was an
    MlflowException ... 401 traceback (and, for analyze, "no run ..."). `check_tracking`, which
    train, analyze, compare, sweep and study call first, now asks the server once with the
    credentials."""
    import mlflow

    pytest.importorskip("flask_wtf", reason="mlflow server --app-name basic-auth needs Flask-WTF (mlflow[auth])")
    port, admin, wrong = free_port(), "admin-pw-7d1c", "wrong-pw-93b2"
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    cmd = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--app-name", "basic-auth", "--backend-store-uri",
           f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    env = dict(os.environ, MLFLOW_AUTH_ADMIN_PASSWORD=admin, MLFLOW_FLASK_SERVER_SECRET_KEY="tgo-test")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_server(url, proc, timeout=180, log=log)
        tmpdir = tmp_path / "tmp"
        tmpdir.mkdir()
        run_id = trained_smoke_run.result.run_id
        given = dict(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=wrong)
        results = [_tgo(url, tmpdir, "train", "--preset", "smoke", "--epochs", "1", timeout=120, **given)]
        for key, value in {"MLFLOW_TRACKING_URI": url, **given}.items():
            monkeypatch.setenv(key, value)
        mlflow.set_tracking_uri(url)
        results += [_cli(capsys, "analyze", run_id), _cli(capsys, "compare", run_id, run_id)]
        for out in results:
            _one_message(out, 2, f"tracking server at {url} refused the credentials", "MLFLOW_TRACKING_PASSWORD")
            assert wrong not in out.stdout + out.stderr and admin not in out.stdout + out.stderr
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin)
        assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []  # nothing was logged
        assert os.listdir(tmpdir) == []
    finally:
        mlflow.set_tracking_uri(None)
        os.killpg(proc.pid, 9)
        proc.wait(timeout=60)


def test_a_damaged_or_foreign_spectra_file_is_one_message(trained_smoke_run, copy_store, tmp_path, capsys):
    """Issue 24 item 4: a spectra file holding garbage, or an object array (which numpy would only
    read by unpickling), ended analyze and compare in numpy's traceback about pickled data. The
    training run's artifacts are copied first, so that the shared run stays whole."""
    import numpy as np

    from tgo import tracking

    run_id = trained_smoke_run.result.run_id
    artifacts = tmp_path / "artifacts"
    shutil.copytree(tracking.local_artifact_dir(run_id), artifacts)
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        db.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", (str(artifacts), run_id))
        db.commit()
    spectra = artifacts / "geometry" / "spectra" / "epoch_0001.npz"
    spectra.write_bytes(b"PK\x03\x04 not a zip archive" * 10)
    garbage = _cli(capsys, "analyze", run_id, "--no-figures")
    np.savez(spectra, **{"observable_names": np.array([object()], dtype=object)})
    foreign = _cli(capsys, "compare", run_id, run_id, "--no-figures", "--no-log")
    for proc in (garbage, foreign):
        message = _one_message(proc, 2, "spectra/epoch_0001.npz is not a geometry file tgo wrote", "without unpickling anything")
        assert "pickled" not in message and "allow_pickle" not in message
