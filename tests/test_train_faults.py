"""Training's faults as a user meets them: a SIGKILL before the first checkpoint, a full artifact
store, a damaged or planted checkpoint, a resume of a run that is not a training run, absurd
integers and a one-class dataset. Each ends in one message, and a run that no process trains any
more never reads RUNNING."""

import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import assert_same_metrics, metric_steps, image_tree, mlflow_run, subprocess_env
from tgo import cli

MARKER = "tgo-test-planted-code-ran"  # the file a planted pickle would create if it were unpickled






def _artifacts(run_id: str, folder: str = "") -> list[str]:
    """Every artifact path of the run, hidden files included (MLflow lists them too)."""
    out = []
    for item in MlflowClient().list_artifacts(run_id, folder or None):
        out += _artifacts(run_id, item.path) if item.is_dir else [item.path]
    return sorted(out)


def _train(store: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tgo", "train", *args], env=subprocess_env(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("tgo: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_resumes_equal_to_an_uninterrupted_run(store, tmp_path, capsys):
    from tgo.train import run

    settings = ["--preset", "smoke", "--epochs", "1", "--experiment", "first-checkpoint"]
    # SIGKILL as soon as the run exists: during epoch 0's validation and probe, before any checkpoint.
    victim = _train(store, *settings)
    run_id = ""
    for line in victim.stdout:
        found = re.search(r"run ([0-9a-f]{32}):", line)
        if found:
            victim.send_signal(signal.SIGKILL)
            run_id = found.group(1)
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL and run_id
    client = MlflowClient()
    killed = client.get_run(run_id)
    assert killed.info.status == "RUNNING" and "tgo.lease" in killed.data.tags  # a killed process cannot say otherwise
    assert "checkpoints/last.pt" not in _artifacts(run_id) and not killed.data.metrics, "the kill came after the first checkpoint"
    # What a kill while weights_epoch_0000.pt is written leaves beside it (tracking.save_torch).
    local = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    (local / "checkpoints").mkdir(parents=True, exist_ok=True)
    (local / "checkpoints" / ".weights_epoch_0000.pt.k1ll3d.partial").write_bytes(b"")

    code, out, err = _cli(capsys, "train", "--resume", run_id)
    assert code == 0, err
    assert f"run {run_id} stopped before its first checkpoint: it starts again from its initialisation" in out
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED" and "tgo.lease" not in resumed.data.tags

    whole = run(preset="smoke", epochs=1, experiment="uninterrupted")
    assert_same_metrics(metric_steps(whole.run_id), metric_steps(run_id))  # every step once, each as an uninterrupted run has it
    assert _artifacts(run_id) == _artifacts(whole.run_id)  # the partial file is gone, nothing else is left
    params = lambda r: {k: v for k, v in r.data.params.items() if k != "config.experiment"}  # noqa: E731
    assert params(resumed) == params(client.get_run(whole.run_id))


@pytest.mark.parametrize("kind", ["deleted", "analysis", "comparison", "foreign"])
def test_resume_of_a_run_that_is_not_a_training_run_names_what_it_is(store, capsys, kind):
    client = MlflowClient()
    experiment = client.create_experiment("not-training")
    tags = {"tgo.kind": "train"} if kind == "deleted" else {} if kind == "foreign" else {"tgo.kind": kind}
    run_id = client.create_run(experiment, tags=tags).info.run_id
    if kind == "deleted":
        client.delete_run(run_id)
    before = client.get_run(run_id)
    code, _, err = _cli(capsys, "train", "--resume", run_id)
    line = _one_error_line(err)
    assert code == 2 and "has no artifact" not in line
    expected = {
        "deleted": f"run {run_id} is deleted (in MLflow's trash)",
        "analysis": f"run {run_id} is an analysis run",
        "comparison": f"run {run_id} is a comparison run (tgo.kind=comparison), not a training run",
        "foreign": f"run {run_id} is not a run tgo trained (it has no tgo.kind tag)",
    }[kind]
    assert expected in line and "Nothing was changed" in line, line
    after = client.get_run(run_id)
    assert after.info.status == before.info.status == "RUNNING" and after.data.tags == before.data.tags  # nothing written


class _Planted:
    """A pickle that runs a command when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, how: str, marker: Path) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "torch pickle":  # a checkpoint-shaped file with code in it, as torch.save writes it
        torch.save({"format": "tgo-checkpoint-1", "epoch": 0, "model": _Planted(marker)}, path)
    else:  # a plain pickle
        path.write_bytes(pickle.dumps({"model": _Planted(marker)}))


@pytest.mark.slow
def test_a_damaged_or_planted_checkpoint_is_refused_in_one_line_and_nothing_runs(store, tmp_path, capsys):
    from tgo.train import run

    result = run(preset="smoke", epochs=0, experiment="planted")
    run_id, client = result.run_id, MlflowClient()
    local = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://")) / "checkpoints"
    original = (local / "last.pt").read_bytes()
    marker = tmp_path / MARKER
    for how, message in (
        ("truncated", f"checkpoints/last.pt of run {run_id} is damaged (truncated or corrupt"),
        ("torch pickle", f"checkpoints/last.pt of run {run_id} is not a tgo checkpoint"),
        ("plain pickle", f"checkpoints/last.pt of run {run_id} is not a tgo checkpoint"),
    ):
        (local / "last.pt").write_bytes(original)
        _plant(local / "last.pt", how, marker)
        client.update_run(run_id, "RUNNING")  # as a kill leaves it
        code, _, err = _cli(capsys, "train", "--resume", run_id)
        line = _one_error_line(err)
        assert code == 2 and message in line, (how, line)
        assert "weights_only" not in err and "PytorchStreamReader" not in line.split("(truncated or corrupt")[0], line
        if how != "truncated":
            assert "tgo will not unpickle it" in line, line
        assert not marker.exists(), f"the {how} ran"
        after = client.get_run(run_id)
        assert after.info.status == "FAILED" and "tgo.lease" not in after.data.tags, how  # not left RUNNING
        assert line.removeprefix("tgo: error: ").startswith(after.data.tags["tgo.error"]), (after.data.tags["tgo.error"], line)

    # Kept weights, read by a re-probe: a planted file is refused the same way (and a leftover
    # partial file of a write cut short is not taken for an epoch's weights).
    _plant(local / "weights_epoch_0000.pt", "torch pickle", marker)
    (local / ".weights_epoch_0000.pt.x1y2.partial").write_bytes(b"")
    code, _, err = _cli(capsys, "analyze", run_id, "--probe_size", "8", "--device", "cpu")
    line = _one_error_line(err)
    assert code == 2 and f"checkpoints/weights_epoch_0000.pt of run {run_id} is not a tgo checkpoint" in line, line
    assert "tgo will not unpickle it" in line and "weights_only" not in err and not marker.exists()


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_full_artifact_store_ends_in_one_message_and_resume_continues(store, tmp_path, capsys):
    disk = tmp_path / "disk"
    # 16 MB: epoch 0's record fits (weights and checkpoint, 4 MB each: no optimiser state yet), epoch
    # 1's checkpoint (11 MB with AdamW's moments, written beside the previous one) does not.
    if not _mount_tmpfs(disk, "16m"):
        pytest.skip("needs the right to mount a tmpfs (root) to fill an artifact store's file system")
    try:
        MlflowClient().create_experiment("full", artifact_location=disk.as_uri())
        victim = _train(store, "--preset", "smoke", "--epochs", "2", "--experiment", "full")
        out, err = victim.communicate(timeout=300)
        assert victim.returncode == 1, err
        line = _one_error_line(err)
        run_id = re.search(r"run ([0-9a-f]{32}): the artifact store", line).group(1)
        assert "is full" in line and "No space left on device" in line, line
        assert "Epochs up to 0 are recorded with their checkpoint" in line, line
        assert f"tgo train --resume {run_id}" in line and "The run is marked FAILED" in line
        assert "inline_container" not in err and "enforce fail" not in err
        run = MlflowClient().get_run(run_id)
        assert run.info.status == "FAILED" and "tgo.lease" not in run.data.tags
        assert run.data.tags["tgo.error"] in line and "is full" in run.data.tags["tgo.error"]
        assert not list(disk.rglob("*.partial"))  # the cut-short write is gone, its space free
        assert sorted(metric_steps(run_id)["val/loss"]) == [0]

        # Space again: the resume continues at epoch 1 and ends with every epoch once.
        assert subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], capture_output=True).returncode == 0
        code, out, err = _cli(capsys, "train", "--resume", run_id)
        assert code == 0, err
        assert f"resuming run {run_id} at epoch 1 of 2" in out
        after = MlflowClient().get_run(run_id)
        assert after.info.status == "FINISHED" and sorted(metric_steps(run_id)["val/loss"]) == [0, 1, 2]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_checkpoint_write_the_disk_refuses_is_that_os_error_not_torchs(store, tmp_path, monkeypatch):
    """Without the right to mount a small file system: a write that raises ENOSPC at the store's
    boundary (the file tracking.save_torch writes into) reaches the caller as that OSError, naming
    the artifact, and the previous checkpoint stays whole."""
    import errno
    import io

    from tgo import tracking

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("enospc")).info.run_id
    local = tracking.local_artifact_dir(run_id)
    tracking.save_torch(run_id, {"w": torch.ones(3)}, "checkpoints", "last.pt", tmp_path, local)

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tracking.os, "fdopen", lambda fd, mode: FullDisk(fd, "w"))
    with pytest.raises(OSError) as err:
        tracking.save_torch(run_id, {"w": torch.zeros(100_000)}, "checkpoints", "last.pt", tmp_path, local)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(local / "checkpoints" / "last.pt")
    monkeypatch.undo()
    assert not list((local / "checkpoints").glob(".*.partial"))
    assert torch.equal(tracking.load_checkpoint(local / "checkpoints" / "last.pt")["w"], torch.ones(3))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "99999999999999999999999"], "epochs: must be an integer in [0, 1000000], got '99999999999999999999999'"),
        (["--batch_size", "1e30"], "batch_size: must be an integer in [1, 1000000], got '1e30'"),
        (["--seed", "99999999999999999999999"], "seed: must be an integer in [0, 2^32 - 1] (numpy's and torch's seed range), got '99999999999999999999999'"),
        (["--num_classes", "1"], "num_classes: must be 0 (the dataset's count) or at least 2"),
    ],
)
def test_absurd_integers_are_refused_with_their_range(store, capsys, args, message):
    code, _, err = _cli(capsys, "train", "--preset", "smoke", *args)
    assert code == 2 and message in _one_error_line(err), err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.slow
def test_absurd_integers_through_mlflow_run_are_refused_with_their_range(store, tmp_path):
    proc = mlflow_run("main", "absurd", store, tmp_path, "preset=smoke", "epochs=99999999999999999999999", timeout=300)
    assert proc.returncode != 0
    assert "epochs: must be an integer in [0, 1000000], got '99999999999999999999999'" in proc.stderr, proc.stderr[-3000:]
    assert "99999999999999991611392" not in proc.stderr + proc.stdout


def test_a_dataset_with_one_class_is_refused(store, tmp_path, capsys):
    image_tree(tmp_path / "tree", classes=("only",))
    code, _, err = _cli(
        capsys, "train", "--preset", "smoke", "--dataset", "imagefolder", "--data_dir", str(tmp_path / "tree"), "--num_classes", "0",
        "--probe_size", "4", "--probe_folds", "2",
    )
    line = _one_error_line(err)
    assert code == 2 and f"imagefolder under {tmp_path / 'tree'} has 1 class (only); classification needs at least two" in line, line
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_refused_resume_or_a_failed_build_leaves_the_run_as_it_was(store, tmp_path, capsys):
    """The lease is taken only once everything is built: a resume refused for a setting it may not
    change, or whose build fails (its data gone), writes nothing on the run."""
    import shutil

    from tgo.train import run

    tree = tmp_path / "tree"
    image_tree(tree, classes=("a", "b"), per_class=4, size=16)
    done = run(preset="smoke", dataset="imagefolder", data_dir=str(tree), num_classes=0, epochs=0, probe_size=4, probe_folds=2,
               batch_size=4, experiment="refused")
    before = MlflowClient().get_run(done.run_id)
    code, _, err = _cli(capsys, "train", "--resume", done.run_id, "--lr", "0.5")
    assert code == 2 and "resume continues a run with its own settings" in _one_error_line(err)
    shutil.rmtree(tree)
    code, _, err = _cli(capsys, "train", "--resume", done.run_id)
    assert code == 2 and f"{tree}/train does not exist" in _one_error_line(err)
    after = MlflowClient().get_run(done.run_id)
    assert after.info.status == "FINISHED" and after.data.tags == before.data.tags and "tgo.lease" not in after.data.tags
