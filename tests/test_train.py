"""The training entry point end to end: mlflow run, the CLI and the Python call, read back only
through the tracking API; resume after SIGKILL; DDP on two gloo processes; bad input."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import assert_same_metrics, metric_steps, ROOT, image_tree, mlflow_run, subprocess_env, tiny_vit
from tgo import cli
from tgo.probe import ProbeResult, probe
from tgo.spectral import OBSERVABLE_NAMES





def _geom_keys(depth: int) -> set[str]:
    sites = ["patch_embed", "pos_embed", *[f"block_{i:02d}" for i in range(depth)], "final"]
    return {
        f"geom/{s}/{v}/{n}"
        for s in sites
        for v in ("cls", "patch", "mean")
        if (s, v) != ("patch_embed", "cls")
        for n in OBSERVABLE_NAMES
    }


@pytest.mark.slow
def test_mlflow_run_end_to_end(store, tmp_path):
    """`mlflow run . -e train` on the smoke preset, read back through the tracking API only."""
    proc = mlflow_run("train", "e2e", store, tmp_path, "preset=smoke", "epochs=2", "checkpoint_epochs=0,1,last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["e2e"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    rid = run.info.run_id
    history = metric_steps(rid)
    expected = _geom_keys(depth=2) | {"val/loss", "val/acc1", "val/acc5", "lr", "time/probe_s", "time/checkpoint_s"}
    assert expected <= set(history)
    for key in expected:
        assert sorted(history[key]) == [0, 1, 2], key
    for key in ("train/loss", "train/acc1", "time/epoch_s", "train/images_per_s"):
        assert sorted(history[key]) == [1, 2], key
    assert all(np.isfinite(v) for h in history.values() for v in h.values())
    # params: the entry point's own, and the resolved config
    params = run.data.params
    assert params["preset"] == "smoke" and params["epochs"] == "2"
    assert params["config.epochs"] == "2" and params["config.depth"] == "2" and params["config.dataset"] == "synthetic"
    tags = run.data.tags
    assert tags["tgo.preset"] == "smoke" and tags["tgo.dataset"] == "synthetic" and tags["tgo.kind"] == "train"
    assert tags["tgo.model"] == "vit_tiny_patch16_224" and tags["tgo.version"]
    # artifacts: spectra every epoch, weights at 0, 1, 2, a resumable checkpoint, probe record
    dst = tmp_path / "dl"
    root = Path(mlflow.artifacts.download_artifacts(run_id=rid, dst_path=str(dst)))
    for epoch in (0, 1, 2):
        spectra = ProbeResult.load(root / "geometry" / "spectra" / f"epoch_{epoch:04d}.npz")
        assert spectra.metrics()["geom/final/cls/effective_rank"] == pytest.approx(history["geom/final/cls/effective_rank"][epoch])
        weights = torch.load(root / "checkpoints" / f"weights_epoch_{epoch:04d}.pt", weights_only=True)
        assert "pos_embed" in weights
    last = torch.load(root / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and {"model", "optimizer", "scheduler", "scaler", "rng", "config"} <= set(last)
    import json

    record = json.loads((root / "probe" / "probe_set.json").read_text())
    assert record["size"] == 32 and len(record["indices"]) == 32 and record["fingerprint"] == tags["tgo.probe_fingerprint"]
    config = json.loads((root / "config" / "config.json").read_text())
    assert config["epochs"] == 2 and config["preset"] == "smoke"


@pytest.mark.slow
def test_python_call_returns_run_id_and_metrics(smoke_run):
    result = smoke_run.result  # run(preset="smoke", epochs=1, probe_every=1, ...)
    assert result.epoch == 1 and sorted(result.history) == [0, 1]
    run_obj = MlflowClient().get_run(result.run_id)
    assert run_obj.info.status == "FINISHED"
    for key in ("val/acc1", "geom/final/cls/effective_rank", "geom/block_01/patch/alpha"):
        assert result.metrics[key] == pytest.approx(run_obj.data.metrics[key])
    # The logged epoch-0 geometry is the probe of the initial weights: re-probe them independently.
    from tgo.config import resolve
    from tgo.data import build_datasets
    from tgo.model import create_model
    from tgo.probeset import ProbeSet

    cfg = resolve("smoke", epochs=1)
    data = build_datasets(cfg)
    model = create_model(cfg, data.num_classes)
    path = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="checkpoints/weights_epoch_0000.pt")
    model.load_state_dict(torch.load(path, weights_only=True))
    ps = ProbeSet.from_dataset(data.val, cfg.probe_size, seed=cfg.probe_seed)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = probe(model, ps.loader(7)).metrics()
    for key, value in again.items():
        assert result.history[0][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def _train_cmd(*args) -> list[str]:
    return [sys.executable, str(ROOT / "entrypoints" / "train.py"), *args]




@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(store, tmp_path):
    common = ["--preset", "smoke", "--epochs", "4", "--experiment", "resume"]
    proc = subprocess.run(_train_cmd(*common, "--run_name", "whole"), env=subprocess_env(store), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole = re.search(r"run ([0-9a-f]{32}) finished", proc.stdout).group(1)

    # The same run, killed with SIGKILL as soon as it reports epoch 2.
    victim = subprocess.Popen(_train_cmd(*common, "--run_name", "killed"), env=subprocess_env(store), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    run_id = None
    for line in victim.stdout:
        found = re.search(r"run ([0-9a-f]{32}):", line)
        run_id = run_id or (found and found.group(1))
        if line.startswith("tgo: epoch 2/4"):
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL and run_id
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"  # a killed process cannot say otherwise
    partial = metric_steps(run_id)
    assert max(partial["val/loss"]) < 4

    proc = subprocess.run(_train_cmd("--resume", run_id), env=subprocess_env(store), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming run {run_id}" in proc.stdout
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert_same_metrics(metric_steps(whole), metric_steps(run_id))


@pytest.mark.slow
def test_a_run_still_training_is_not_resumed_by_a_second_process(store, tmp_path, capsys):
    import socket

    victim = subprocess.Popen(_train_cmd("--preset", "smoke", "--epochs", "500", "--experiment", "lease"), env=subprocess_env(store),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        run_id = None
        for line in victim.stdout:
            found = re.search(r"run ([0-9a-f]{32}):", line)
            run_id = run_id or (found and found.group(1))
            if line.startswith("tgo: epoch 1/"):
                break
        code = cli.main(["train", "--resume", run_id])
        err = capsys.readouterr().err
        assert code == 2 and f"run {run_id} is being trained by {socket.gethostname()}:{victim.pid}" in err, err
        assert victim.poll() is None  # the refusal did not disturb the live run
    finally:
        victim.kill()
        victim.wait(timeout=60)

    # A lease held from another machine: refused while it is renewed, given up once it is stale.
    import json
    import time

    from tgo import tracking
    from tgo.errors import TrackingError
    from tgo.liveness import grace_period

    client = MlflowClient()
    other = client.create_run(client.get_experiment_by_name("lease").experiment_id).info.run_id
    client.set_tag(other, "tgo.lease", json.dumps({"worker": "elsewhere:1", "renewed": time.time(), "nonce": "x"}))
    with pytest.raises(TrackingError, match="is being trained by elsewhere:1"):
        tracking.claim(client.get_run(other))
    client.set_tag(other, "tgo.lease", json.dumps({"worker": "elsewhere:1", "renewed": time.time() - grace_period() - 1, "nonce": "x"}))
    tracking.claim(client.get_run(other))
    assert json.loads(client.get_run(other).data.tags["tgo.lease"])["worker"] == f"{socket.gethostname()}:{os.getpid()}"


@pytest.mark.parametrize("status", ["FINISHED", "KILLED", "FAILED"])
def test_a_run_that_ends_gives_its_lease_up(store, status):
    """The lease belongs to a live run: once the run is closed (end_run, then Lease.stop, in the
    order training calls them) the tag is gone, and resuming the run claims it afresh."""
    import time

    from tgo import tracking

    client = MlflowClient()
    run_id = tracking.start_run("lease-end").info.run_id
    lease = tracking.Lease(run_id, interval=0.05).start()
    time.sleep(0.3)  # renewed a few times by its thread
    assert "tgo.lease" in client.get_run(run_id).data.tags
    assert tracking.end_run(status, "" if status == "FINISHED" else "RuntimeError: for the test")
    lease.stop()
    run = client.get_run(run_id)
    assert run.info.status == status and "tgo.lease" not in run.data.tags
    time.sleep(0.2)  # no renewal comes after the stop
    assert "tgo.lease" not in client.get_run(run_id).data.tags
    tracking.claim(run)  # a resume of a finished or failed run, with no lease tag
    assert client.get_run(run_id).data.tags["tgo.lease"]


def test_a_lease_another_process_took_over_is_not_given_up(store):
    import json
    import time

    from tgo import tracking

    client = MlflowClient()
    run_id = tracking.start_run("lease-other").info.run_id
    lease = tracking.Lease(run_id, interval=3600).start()
    theirs = json.dumps({"worker": "elsewhere:1", "renewed": time.time(), "nonce": "x"})
    client.set_tag(run_id, "tgo.lease", theirs)  # claimed from elsewhere after this one went stale
    tracking.end_run("FAILED")
    lease.stop()
    assert client.get_run(run_id).data.tags["tgo.lease"] == theirs


def test_a_trained_run_and_a_failed_one_keep_no_lease(store):
    from tgo.train import run

    done = run(preset="smoke", epochs=0, experiment="lease-train")
    assert "tgo.lease" not in MlflowClient().get_run(done.run_id).data.tags

    def fail(epoch, _):
        raise RuntimeError("failed for the test")

    with pytest.raises(RuntimeError, match="failed for the test"):
        run(preset="smoke", epochs=0, experiment="lease-train", epoch_callback=fail)
    (failed,) = [r for r in mlflow.search_runs(experiment_names=["lease-train"], output_format="list") if r.info.run_id != done.run_id]
    assert failed.info.status == "FAILED" and "tgo.lease" not in failed.data.tags
    resumed = run(resume=failed.info.run_id, epochs=1)  # resuming it claims the run with no lease tag
    after = MlflowClient().get_run(resumed.run_id)
    assert resumed.run_id == failed.info.run_id and after.info.status == "FINISHED" and "tgo.lease" not in after.data.tags


def test_the_run_of_a_dead_worker_is_failed_without_its_lease(store):
    import json
    import time

    from tgo import tracking

    client = MlflowClient()
    run_id = tracking.start_run("lease-dead").info.run_id
    mlflow.end_run()  # leave it RUNNING in the store, as a killed worker does
    client.update_run(run_id, "RUNNING")
    client.set_tag(run_id, "tgo.lease", json.dumps({"worker": "elsewhere:1", "renewed": time.time() - 3600, "nonce": "x"}))
    tracking.fail_run(run_id, "worker elsewhere:1 died")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "tgo.lease" not in run.data.tags


def _chattr(path: Path, flag: str) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_store_that_turns_read_only_ends_in_one_message_and_resume_continues(store, tmp_path):
    db = tmp_path / "mlflow.db"
    if not _chattr(db, "+i"):
        pytest.skip("needs chattr +i (root on ext4 or similar) to make the store read-only under a running process")
    _chattr(db, "-i")
    victim = subprocess.Popen(_train_cmd("--preset", "smoke", "--epochs", "4", "--experiment", "readonly"), env=subprocess_env(store),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in victim.stdout:
            if line.startswith("tgo: epoch 1/"):
                assert _chattr(db, "+i")  # the store can no longer be written, from here on
                break
        out, err = victim.communicate(timeout=300)
    finally:
        _chattr(db, "-i")
    assert victim.returncode == 1
    run_id = re.search(r"tgo train --resume ([0-9a-f]{32})", err).group(1)
    # One message, no traceback: what happened, what is kept, how to go on.
    assert "Traceback" not in err and "stopped accepting writes" in err and "are recorded with their checkpoint" in err, err
    assert len([line for line in err.splitlines() if line.startswith("tgo: error")]) == 1
    proc = subprocess.run(_train_cmd("--resume", run_id), env=subprocess_env(store), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(metric_steps(run_id)["val/loss"]) == list(range(5))  # every epoch once


@pytest.mark.slow
def test_resume_from_a_checkpoint_whose_metrics_were_not_logged(store, tmp_path):
    """Killed between writing last.pt and logging the epoch: the resume logs that epoch's metrics
    from the checkpoint, so the history has every step exactly once."""
    from tgo.train import run

    first = run(preset="smoke", epochs=1, experiment="gap")
    client = MlflowClient()
    # A run in the state such a kill leaves: epochs 0-1 artifacts and checkpoint, metrics of 0 only.
    gap = client.create_run(client.get_experiment_by_name("gap").experiment_id, tags={"tgo.kind": "train"}).info.run_id
    root = Path(mlflow.artifacts.download_artifacts(run_id=first.run_id, dst_path=str(tmp_path / "a")))
    client.log_artifacts(gap, str(root / "checkpoints"), "checkpoints")
    client.log_batch(gap, metrics=[mlflow.entities.Metric(k, v, 0, 0) for k, v in first.history[0].items()])
    ckpt = torch.load(root / "checkpoints" / "last.pt", weights_only=True)
    ckpt["run_id"] = gap
    torch.save(ckpt, tmp_path / "last.pt")
    client.log_artifact(gap, str(tmp_path / "last.pt"), "checkpoints")
    resumed = run(preset="smoke", resume=gap, epochs=2)
    history = metric_steps(gap)
    assert sorted(history["val/loss"]) == [0, 1, 2]
    assert history["val/loss"][1] == pytest.approx(first.history[1]["val/loss"])
    assert resumed.epoch == 2


@pytest.mark.slow
def test_ddp_on_two_gloo_processes_measures_what_one_process_measures(store, tmp_path):
    args = ["--preset", "smoke", "--epochs", "1", "--device", "cpu", "--experiment", "ddp", "--checkpoint_epochs", "0,last"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "entrypoints" / "train.py"), *args]
    proc = subprocess.run(cmd, env=subprocess_env(store, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = mlflow.search_runs(experiment_names=["ddp"], output_format="list")
    assert len(runs) == 1, "only rank 0 talks to MLflow"
    rid = runs[0].info.run_id
    assert runs[0].data.tags["tgo.world_size"] == "2"
    history = metric_steps(rid)

    # A single-process probe of the same images with the DDP run's weights, at epoch 0 and 1.
    from tgo.config import resolve
    from tgo.data import build_datasets
    from tgo.model import create_model
    from tgo.probeset import ProbeSet

    cfg = resolve("smoke", epochs=1)
    data = build_datasets(cfg)
    ps = ProbeSet.from_dataset(data.val, cfg.probe_size, seed=cfg.probe_seed)
    import warnings

    for epoch in (0, 1):
        model = create_model(cfg, data.num_classes)
        path = mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=f"checkpoints/weights_epoch_{epoch:04d}.pt", dst_path=str(tmp_path / str(epoch)))
        model.load_state_dict(torch.load(path, weights_only=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            single = probe(model, ps.loader(32)).metrics()
        for key, value in single.items():
            assert history[key][epoch] == pytest.approx(value, rel=1e-5, abs=1e-8), (epoch, key)


# --------------------------------------------------------------------------------------------------
# bad input: a clear message, exit status 2, and nothing logged
# --------------------------------------------------------------------------------------------------


def _cli(capsys, *args) -> tuple[int, str]:
    code = cli.main(["train", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "huge"], "preset: unknown preset 'huge'; choose one of demo, smoke, tgo1"),
        (["--dataset", "mnist"], "dataset: unknown dataset 'mnist'"),
        (["--epochs", "ten"], "epochs: expected an integer, got 'ten'"),
        (["--epochs", "2.5"], "epochs: expected an integer"),
        (["--lr", "-1"], "lr: must be a number >= 0"),
        (["--batch_size", "0"], "batch_size: must be an integer in [1, 1000000]"),
        (["--device", "tpu"], "device: unknown device 'tpu'"),
        (["--checkpoint_epochs", "0,7"], "checkpoint_epochs: epochs [7] are outside 0..2"),
        (["--probe_size", "1000"], "probe_size=1000 exceeds the 64 images of the validation set"),
        (["--dataset", "imagefolder"], "data_dir: dataset=imagefolder needs data_dir"),
        (["--dataset", "imagefolder", "--data_dir", "/nonexistent"], "/nonexistent/train does not exist"),
        (["--dataset", "cifar10", "--data_dir", "/nonexistent"], "download=true"),
        (["--resume", "0123456789abcdef0123456789abcdef"], "no run '0123456789abcdef0123456789abcdef'"),
        (["--model", "resnet50"], "model: tgo cannot probe resnet50 (timm.models.resnet.ResNet): "),
    ],
)
def test_bad_parameters_stop_before_any_work(store, capsys, args, message):
    code, err = _cli(capsys, "--preset", "smoke", *args)
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_unreachable_tracking_server_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    try:
        code, err = _cli(capsys, "--preset", "smoke")
    finally:
        mlflow.set_tracking_uri(None)
    assert code == 2 and "cannot reach the MLflow tracking server at http://127.0.0.1:9" in err


def test_unreadable_image_is_named(store, tmp_path, capsys, workers="2"):
    image_tree(tmp_path / "tree")
    bad = tmp_path / "tree" / "val" / "b" / "broken.png"
    bad.write_bytes(b"not an image")
    code, err = _cli(capsys, "--preset", "smoke", "--dataset", "imagefolder", "--data_dir", str(tmp_path / "tree"), "--probe_size", "9",
                     "--num_classes", "0", "--workers", workers)
    assert code == 2 and "cannot read image" in err and str(bad) in err
    # One message, also when a DataLoader worker process read the file: no worker traceback around it.
    assert "Traceback" not in err and "DataLoader worker" not in err, err
    assert len([line for line in err.splitlines() if " INFO mlflow" not in line]) == 1, err


def test_wrong_layout_is_explained(store, tmp_path, capsys):
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "val").mkdir(parents=True)
    code, err = _cli(capsys, "--preset", "smoke", "--dataset", "imagefolder", "--data_dir", str(tmp_path / "flat"))
    assert code == 2 and "Expected one folder per class" in err


@pytest.mark.slow
def test_imagefolder_trains(store, tmp_path):
    from tgo.train import run

    image_tree(tmp_path / "tree", classes=("a", "b", "c"), per_class=6)
    result = run(preset="smoke", dataset="imagefolder", data_dir=str(tmp_path / "tree"), num_classes=0, epochs=1, probe_size=12, batch_size=6)
    assert result.config.dataset == "imagefolder"
    assert MlflowClient().get_run(result.run_id).data.tags["tgo.num_classes"] == "3"
    assert "geom/final/cls/effective_rank" in result.metrics


@pytest.mark.slow
def test_non_finite_loss_fails_the_run_and_keeps_the_last_checkpoint(store, tmp_path, capsys):
    code, err = _cli(capsys, "--preset", "smoke", "--lr", "1e30", "--epochs", "3", "--experiment", "nan")
    assert code == 1 and "non-finite training loss" in err and "last good checkpoint" in err
    (run,) = mlflow.search_runs(experiment_names=["nan"], output_format="list")
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["tgo.error"]
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoints/last.pt", dst_path=str(tmp_path))
    ckpt = torch.load(path, weights_only=True)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert sorted(metric_steps(run.info.run_id)["val/loss"]) == list(range(ckpt["epoch"] + 1))


def test_imagenet100_builder_reports_missing_classes_and_training_says_so(store, tmp_path, capsys):
    from tgo.data import imagenet100_classes

    classes = imagenet100_classes()
    src = tmp_path / "in1k"
    image_tree(src, classes=classes[:-2] + ["n99999999"], per_class=1, size=8)
    code = cli.main(["data", "imagenet100", "--src", str(src), "--dst", str(tmp_path / "in100")])
    out = capsys.readouterr().out
    assert code == 1 and "INCOMPLETE" in out and classes[-1] in out and classes[-2] in out
    assert (tmp_path / "in100" / "train" / classes[0] / "0.png").is_symlink()
    assert not (tmp_path / "in100" / "train" / "n99999999").exists()
    code, err = _cli(capsys, "--preset", "smoke", "--dataset", "imagenet100", "--data_dir", str(tmp_path / "in100"))
    assert code == 2 and "is incomplete: 2 of 100 classes" in err and classes[-1] in err


@pytest.mark.slow
def test_inside_an_active_run_training_is_a_nested_child(store):
    from tgo.train import run

    mlflow.set_experiment("nested")
    with mlflow.start_run() as parent:
        result = run(preset="smoke", epochs=0)
        assert mlflow.active_run().info.run_id == parent.info.run_id  # the parent stays active
    child = MlflowClient().get_run(result.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert sorted(metric_steps(result.run_id)["geom/final/cls/effective_rank"]) == [0]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_checkpoint_write_is_atomic_in_a_local_artifact_store(store, tmp_path):
    from tgo import tracking
    from tgo.recording import EpochCommitter

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("atomic")).info.run_id
    local = tracking.local_artifact_dir(run_id)
    assert local is not None  # a sqlite store keeps artifacts on the local file system
    tracking.save_torch(run_id, {"w": torch.ones(3)}, "checkpoints", "last.pt", tmp_path, local)
    # The same file mode as MLflow's other artifacts (0666 less the umask), so that a shared
    # artifact store can serve checkpoints to other users (mkstemp alone would leave 0600).
    tracking.log_json(run_id, {"a": 1}, "checkpoints", "other.json")
    mode = lambda name: (local / "checkpoints" / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("last.pt") == mode("other.json") and mode("last.pt") & 0o044
    (local / "checkpoints" / "other.json").unlink()
    # A write that fails half-way (as a kill would) leaves the previous checkpoint whole.
    with pytest.raises(RuntimeError, match="cannot pickle"):
        tracking.save_torch(run_id, {"w": torch.zeros(3), "bad": _Unpicklable()}, "checkpoints", "last.pt", tmp_path, local)
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/last.pt"]
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/last.pt", dst_path=str(tmp_path / "dl"))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    # A partial file left by a real kill is removed when the run is next written to (a resume).
    (local / "checkpoints" / ".last.pt.abc.partial").write_bytes(b"cut short")
    EpochCommitter(run_id, str(tmp_path), background=False)
    assert not list((local / "checkpoints").glob(".*.partial"))


def test_the_progress_line_names_the_view_that_feeds_the_head(store, tmp_path, caplog):
    # An average-pooled ViT (no class token) feeds its head with final/mean: each recorded epoch's
    # line gives that view's effective rank and anisotropy with their standard errors (it used to
    # look for final/cls, which such a model does not have, and print no geometry at all).
    import logging
    import warnings

    from torch.utils.data import TensorDataset

    from tgo.probeset import ProbeSet
    from tgo.recording import EpochCommitter

    model = tiny_vit(class_token=False, global_pool="avg").eval()
    images = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    probe_set = ProbeSet.from_dataset(TensorDataset(images, torch.zeros(40, dtype=torch.long)), 40, seed=0, folds=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        geometry = probe(model, probe_set.loader(20), folds=5)
    assert geometry.head == ("final", "mean")
    metrics = {"val/loss": 1.5, "val/acc1": 20.0, **geometry.metrics(), **geometry.stderr_metrics()}
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("line")).info.run_id
    logger = logging.getLogger("tgo")  # the CLI (in an earlier test) may have stopped it propagating
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="tgo")
    try:
        EpochCommitter(run_id, str(tmp_path), background=False).submit(0, 3, {"epoch": 0}, None, geometry, metrics)
    finally:
        logger.removeHandler(caplog.handler)
    (line,) = {r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 0/3")}
    rank, rank_se = metrics["geom/final/mean/effective_rank"], metrics["geom_se/final/mean/effective_rank"]
    aniso, aniso_se = metrics["geom/final/mean/spectral_anisotropy"], metrics["geom_se/final/mean/spectral_anisotropy"]
    assert f"final/mean eff. rank {rank:.1f} +- {rank_se:.1f}, anisotropy {aniso:.3f} +- {aniso_se:.3f}" in line, line
    assert "cls" not in line.lower(), line


def test_imagenet100_links_refuse_a_dst_inside_the_source_and_handle_odd_links(tmp_path, capsys):
    from tgo import cli
    from tgo.data import DataError, build_imagenet100, imagenet100_classes

    src = tmp_path / "inet"
    wnid = imagenet100_classes()[0]
    for split in ("train", "val"):
        (src / split / wnid).mkdir(parents=True)
        (src / split / wnid / "a.JPEG").write_bytes(b"jpeg")
    loop = src / "train" / wnid / "loop.JPEG"
    loop.symlink_to(loop)  # a link to itself: not an image
    with pytest.raises(DataError, match="lies inside --src"):
        build_imagenet100(src, src / "train")
    dst = tmp_path / "inet100"
    (dst / "train" / wnid).mkdir(parents=True)
    (dst / "train" / wnid / "a.JPEG").symlink_to(tmp_path / "gone.JPEG")  # dangling, from an older tree
    report = build_imagenet100(src, dst)
    assert report["replaced_links"] == 1
    assert (dst / "train" / wnid / "a.JPEG").resolve() == (src / "train" / wnid / "a.JPEG").resolve()
    assert not os.path.lexists(dst / "train" / wnid / "loop.JPEG")
    # A file where a folder should be: a message, exit 2, no traceback.
    other = tmp_path / "other"
    other.mkdir()
    (other / "val").write_text("not a folder")
    assert cli.main(["data", "imagenet100", "--src", str(src), "--dst", str(other)]) == 2
    assert "a file stands where a folder should be" in capsys.readouterr().err


@pytest.mark.slow
def test_extending_a_finished_run_replans_its_schedule_over_the_new_length(store, tmp_path):
    # resume=<id> with more epochs: from the next epoch on the lr is that of a run planned for the
    # new length from the start (it used to stay at the old schedule's end, min_lr).
    from tgo.train import run

    whole = run(preset="smoke", epochs=4, warmup_epochs=0, experiment="extend", run_name="whole")
    short = run(preset="smoke", epochs=2, warmup_epochs=0, experiment="extend", run_name="short")
    extended = run(resume=short.run_id, epochs=4)
    assert extended.run_id == short.run_id
    lr_whole = {m.step: m.value for m in MlflowClient().get_metric_history(whole.run_id, "lr")}
    lr_ext = {m.step: m.value for m in MlflowClient().get_metric_history(short.run_id, "lr")}
    assert sorted(lr_ext) == [0, 1, 2, 3, 4]
    assert lr_ext[3] == pytest.approx(lr_whole[3]) and lr_ext[4] == pytest.approx(lr_whole[4])
    assert lr_ext[3] > 2 * lr_whole[4]  # not at the end of the old 2-epoch schedule
    tags = MlflowClient().get_run(short.run_id).data.tags
    assert tags["tgo.resumed.epochs"] == "4"  # the logged config says how long the run now is
