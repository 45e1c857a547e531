"""`tgo probe`, GeometryMonitor and the Lightning callback: checkpoints trained elsewhere become tgo
runs. Each series is written by the library that writes it in practice (timm's CheckpointSaver, a
real Lightning Trainer with ModelCheckpoint, safetensors files laid out as the Hugging Face Trainer
lays them out, DeiT's save dict); the reference at every step is tgo's probe of the same weights on
the same probe set, and the steps follow from the files' own epochs by the README's rule."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import mlflow_run, sqlite_store, subprocess_env

SMOKE = dict(preset="smoke", device="cpu")


def _cfg(**overrides):
    from tgo.config import resolve

    return resolve("smoke", device="cpu", **overrides)


def _model(seed: int = 0, **overrides):
    from tgo.model import create_model

    torch.manual_seed(seed)
    return create_model(_cfg(**overrides), 4)


def _reference(state: dict, **overrides) -> dict[str, float]:
    """tgo's probe of `state` on the smoke preset's probe set: what a probe run must log at its step."""
    from tgo.data import build_datasets
    from tgo.probe import probe_model
    from tgo.probeset import ProbeSet

    cfg = _cfg(**overrides)
    model = _model(**overrides)
    model.load_state_dict(state)
    val = build_datasets(cfg).val
    probe_set = ProbeSet.from_dataset(val, cfg.probe_size, cfg.probe_seed, folds=cfg.probe_folds)
    result = probe_model(model, probe_set.loader(cfg.probe_batch_size), cfg, "cpu")
    return {**result.metrics(), **result.stderr_metrics()}


def _logged(run_id: str, step: int) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith(("geom/", "geom_se/"))]
    out = {}
    for key in keys:
        values = [m.value for m in client.get_metric_history(run_id, key) if m.step == step]
        if values:
            assert len(values) == 1, f"{key} logged {len(values)} times at step {step}"
            out[key] = values[0]
    return out


def _assert_same(logged: dict[str, float], reference: dict[str, float]) -> None:
    assert logged, "nothing logged at this step"
    assert set(logged) == set(reference)
    for key, value in reference.items():
        assert np.isclose(logged[key], value, rtol=1e-6, atol=1e-9, equal_nan=True), (key, logged[key], value)


def _train_a_little(model, opt, seed: int) -> None:
    """A few real optimiser steps, so that every epoch's weights differ."""
    torch.manual_seed(seed)
    for _ in range(2):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _steps(run_id: str) -> list[int]:
    from tgo import tracking

    return tracking.logged_steps(run_id, "time/probe_s")


# --------------------------------------------------------------------------------------------------
# timm's train.py (CheckpointSaver), with and without EMA; incremental
# --------------------------------------------------------------------------------------------------


def _timm_series(folder: Path, ema: bool, epochs=3, metrics=(0.1, 0.5, 0.3)) -> dict[int, dict]:
    """What timm's train.py leaves: CheckpointSaver with max_history=2 (so an epoch is dropped and
    last/model_best are copies). Returns {timm epoch: (model state, ema state)}."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    average = ModelEmaV3(model, decay=0.5) if ema else None
    args = argparse.Namespace(model="vit_tiny_patch16_224", img_size=32, num_classes=4, patch_size=8)
    saver = CheckpointSaver(model, opt, args=args, model_ema=average, checkpoint_dir=str(folder), recovery_dir=str(folder), max_history=2)
    states = {}
    for epoch in range(epochs):
        _train_a_little(model, opt, epoch)
        if average is not None:
            average.update(model)
        states[epoch] = (
            {k: v.clone() for k, v in model.state_dict().items()},
            {k: v.clone() for k, v in average.module.state_dict().items()} if average else None,
        )
        saver.save_checkpoint(epoch, metric=metrics[epoch])
    return states


def test_timm_checkpoint_saver_series_with_ema_steps_and_incremental(store, tmp_path):
    from tgo.series import probe_checkpoints

    folder = tmp_path / "output" / "train" / "vit"
    folder.mkdir(parents=True)
    states = _timm_series(folder, ema=True)
    names = sorted(p.name for p in folder.iterdir())
    assert "last.pth.tar" in names and "checkpoint-0.pth.tar" not in names  # timm dropped the worst epoch
    result = probe_checkpoints(str(folder), **SMOKE)
    # timm's epoch N is the 0-based index of the epoch just trained: step N + 1
    kept = sorted(int(n.split("-")[1].split(".")[0]) for n in names if n.startswith("checkpoint-"))
    assert result.probed == [e + 1 for e in kept] == _steps(result.run_id)
    for epoch in kept:
        _assert_same(_logged(result.run_id, epoch + 1), _reference(states[epoch][0]))
    from mlflow.tracking import MlflowClient

    tags = MlflowClient().get_run(result.run_id).data.tags
    assert tags["tgo.kind"] == "probe" and tags["tgo.probed_layout"] == "timm" and tags["tgo.step_unit"] == "epochs"
    assert tags["tgo.probed"] == str(folder)
    # again: nothing new is probed; a new checkpoint is the only one probed
    again = probe_checkpoints(str(folder), **SMOKE)
    assert again.run_id == result.run_id and again.probed == [] and again.skipped == [e + 1 for e in kept]
    model = _model()
    model.load_state_dict(states[2][0])
    torch.save({"state_dict": model.state_dict(), "epoch": 5, "version": 2}, folder / "checkpoint-5.pth.tar")
    third = probe_checkpoints(str(folder), **SMOKE)
    assert third.run_id == result.run_id and third.probed == [6] and _steps(result.run_id) == [e + 1 for e in kept] + [6]


def test_timm_series_ema_weights_are_the_averages(store, tmp_path):
    from tgo.series import probe_checkpoints

    folder = tmp_path / "timm"
    folder.mkdir()
    states = _timm_series(folder, ema=True, epochs=2, metrics=(0.1, 0.2))
    result = probe_checkpoints(str(folder), probe_weights="ema", **SMOKE)
    assert result.probed == [1, 2]
    for epoch in (0, 1):
        _assert_same(_logged(result.run_id, epoch + 1), _reference(states[epoch][1]))
    without = tmp_path / "no-ema"
    without.mkdir()
    _timm_series(without, ema=False, epochs=1, metrics=(0.1,))
    from tgo.errors import ConfigError

    with pytest.raises(ConfigError, match="holds no EMA weights"):
        probe_checkpoints(str(without), probe_weights="ema", **SMOKE)


# --------------------------------------------------------------------------------------------------
# a real Lightning Trainer: its .ckpt series through tgo probe, and the callback's own run
# --------------------------------------------------------------------------------------------------


def test_lightning_trainer_checkpoints_and_callback_agree(store, tmp_path):
    pytest.importorskip("lightning")
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, TensorDataset

    from tgo.data import build_datasets
    from tgo.integrations.lightning import GeometryCallback
    from tgo.series import probe_checkpoints

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"lr": 1e-2})
            self.backbone = _model()  # the ViT under an attribute: its keys carry "backbone."

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.backbone(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    train = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))), batch_size=8)
    ckpts = tmp_path / "lightning"
    logger = MLFlowLogger(experiment_name="lightning", tracking_uri=store)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=logger,
        callbacks=[
            ModelCheckpoint(dirpath=ckpts, save_top_k=-1, every_n_epochs=1),
            GeometryCallback(build_datasets(_cfg()).val, preset="smoke"),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(), train)
    callback_run = logger.run_id
    assert _steps(callback_run) == [0, 1, 2]  # epoch 0 at the start of fit, then after each epoch
    result = probe_checkpoints(str(ckpts), **SMOKE)
    assert result.probed == [1, 2]  # Lightning's epoch=N is the 0-based epoch just trained
    for step in (1, 2):
        _assert_same(_logged(result.run_id, step), _logged(callback_run, step))
    # the last checkpoint's own weights, probed by tgo.probe: the same numbers
    from tgo.checkpoints import read_file, vit_state_dict

    last = sorted(ckpts.glob("epoch=1-*.ckpt"))[0]
    _assert_same(_logged(result.run_id, 2), _reference(vit_state_dict(read_file(last)["state_dict"])))


# --------------------------------------------------------------------------------------------------
# the Hugging Face Trainer's layout, DeiT's save dict, bare weights
# --------------------------------------------------------------------------------------------------


def _trainer_folder(root: Path, step: int, epoch: float, state: dict) -> None:
    from safetensors.torch import save_file

    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({f"timm_model.{k}": v.contiguous() for k, v in state.items()}, folder / "model.safetensors")  # transformers' timm wrapper
    (folder / "trainer_state.json").write_text(json.dumps({"epoch": epoch, "global_step": step, "log_history": []}))


def test_hugging_face_trainer_folders_whole_and_fractional_epochs(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from tgo.series import probe_checkpoints

    model, states = _model(), {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i, (step, epoch) in enumerate(((4, 1.0), (8, 2.0))):
        _train_a_little(model, opt, i)
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}
        _trainer_folder(tmp_path / "hf", step, epoch, states[step])
    result = probe_checkpoints(str(tmp_path / "hf"), **SMOKE)
    assert result.probed == [1, 2]  # the Trainer's epoch already counts completed epochs
    _assert_same(_logged(result.run_id, 2), _reference(states[8]))
    _trainer_folder(tmp_path / "hf-steps", 6, 1.5, states[4])
    _trainer_folder(tmp_path / "hf-steps", 8, 2.0, states[8])
    steps = probe_checkpoints(str(tmp_path / "hf-steps"), **SMOKE)
    assert steps.probed == [6, 8]  # between epochs: optimiser steps, and the run says so
    assert MlflowClient().get_run(steps.run_id).data.tags["tgo.step_unit"] == "optimizer_steps"


def test_deit_checkpoint_and_bare_weights_steps(store, tmp_path):
    from tgo.series import probe_checkpoints

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_a_little(model, opt, 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    args = argparse.Namespace(model="deit_tiny_patch16_224", input_size=32)
    # DeiT's main.py: utils.save_on_master({...}, output_dir / 'checkpoint.pth') after epoch 4
    deit = tmp_path / "deit"
    deit.mkdir()
    torch.save(
        {"model": state, "optimizer": opt.state_dict(), "lr_scheduler": {}, "epoch": 4, "model_ema": state, "args": args},
        deit / "checkpoint.pth",
    )
    assert probe_checkpoints(str(deit / "checkpoint.pth"), **SMOKE).probed == [5]
    # a released file: bare weights, one file, epoch 0 unless --epoch says
    bare = tmp_path / "released"
    bare.mkdir()
    torch.save({f"module.{k}": v for k, v in state.items()}, bare / "vit.pth")  # DDP's prefix
    first = probe_checkpoints(str(bare / "vit.pth"), **SMOKE)
    assert first.probed == [0]
    _assert_same(_logged(first.run_id, 0), _reference(state))
    assert probe_checkpoints(str(bare / "vit.pth"), epoch=7, run_name="again", experiment="other", **SMOKE).probed == [7]


# --------------------------------------------------------------------------------------------------
# exact: a tgo training run's own saved weights, through `mlflow run . -e probe`
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mlflow_run_probe_of_a_training_runs_weights_logs_its_geometry(smoke_run, tmp_path):
    """`mlflow run . -e probe` over the smoke run's checkpoints/ (weights_epoch_0000.pt,
    weights_epoch_0001.pt, and last.pt, the same weights as epoch 1): the same geometry at the same
    steps as the training run logged, and analyze and compare take the run."""
    from mlflow.tracking import MlflowClient

    from tgo import tracking
    from tgo.analysis import analyze
    from tgo.compare import compare

    train_id = smoke_run.result.run_id
    folder = tracking.local_artifact_dir(train_id) / "checkpoints"
    done = mlflow_run(
        "probe",
        "probe-exact",
        smoke_run.uri,
        tmp_path,
        f"checkpoints={folder}",
        "preset=smoke",
        "feature_epochs=all",
        "weight_spectra=true",
        "device=cpu",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    client = MlflowClient()
    probe_id = client.search_runs([client.get_experiment_by_name("probe-exact").experiment_id])[0].info.run_id
    assert _steps(probe_id) == [0, 1]
    for step in (0, 1):
        _assert_same(_logged(probe_id, step), _logged(train_id, step))
    for prefix in ("tokens/", "weights/", "similarity/", "intrinsic_dim/"):
        trained = {k: v for k, v in client.get_run(train_id).data.metrics.items() if k.startswith(prefix)}
        probed = {k: v for k, v in client.get_run(probe_id).data.metrics.items() if k.startswith(prefix)}
        assert trained and set(trained) == set(probed), prefix
        assert all(np.isclose(probed[k], v, rtol=1e-6, atol=1e-9) for k, v in trained.items()), prefix
    analysis = analyze(probe_id, output_dir=tmp_path / "analysis", figures=False)
    assert analysis.findings and analysis.analysis_run_id
    comparison = compare(train_id, probe_id, output_dir=tmp_path / "compare", figures=False)
    assert comparison.epochs == [0, 1] and len(comparison.differing) == 0


# --------------------------------------------------------------------------------------------------
# your own loop: GeometryMonitor into the active run
# --------------------------------------------------------------------------------------------------


def test_geometry_monitor_in_a_loop_logs_into_the_active_run(store):
    import mlflow

    import tgo
    from tgo.data import build_datasets

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    states = {}
    with mlflow.start_run() as run:
        monitor = tgo.GeometryMonitor(model, build_datasets(_cfg()).val, preset="smoke", device="cpu")
        monitor.measure(0)
        states[0] = {k: v.clone() for k, v in model.state_dict().items()}
        for epoch in (1, 2):
            _train_a_little(model, opt, epoch)
            monitor.measure(epoch)
            states[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        monitor.close()
    assert monitor.run_id == run.info.run_id and _steps(run.info.run_id) == [0, 1, 2]
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"  # the caller's run, closed by the caller
    for epoch in (0, 2):
        _assert_same(_logged(run.info.run_id, epoch), _reference(states[epoch]))
    with pytest.raises(tgo.errors.ConfigError, match="unknown settings"):
        tgo.GeometryMonitor(model, build_datasets(_cfg()).val, probe_sise=3)


# --------------------------------------------------------------------------------------------------
# bad input: one message, exit 2, no run left behind
# --------------------------------------------------------------------------------------------------


class Planted:  # what a checkpoint that needs arbitrary unpickling holds
    def __reduce__(self):
        return (print, ("planted code ran",))


def _runs(uri: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))


def test_bad_input_is_one_message_and_leaves_no_run(store, tmp_path, capsys):
    from tgo import cli

    state = _model().state_dict()
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.pth").write_bytes(b"\x00garbage" * 100)
    other = tmp_path / "other"
    other.mkdir()
    torch.save(_model(depth=3).state_dict(), other / "weights.pt")
    twice = tmp_path / "twice"
    twice.mkdir()
    torch.save({"model": state, "epoch": 2}, twice / "checkpoint.pth")
    torch.save({"model": _model(seed=1).state_dict(), "epoch": 2}, twice / "best_checkpoint.pth")
    planted = tmp_path / "planted"
    planted.mkdir()
    torch.save({"state_dict": state, "epoch": 1, "hyper_parameters": Planted()}, planted / "epoch=1.ckpt")
    cases = {
        "empty": ([str(tmp_path / "empty")], "names no checkpoint"),
        "glob": ([str(tmp_path / "nowhere" / "*.pth")], "names no checkpoint"),
        "junk": ([str(tmp_path / "junk")], "is not a checkpoint"),
        "architecture": ([str(other)], "does not fit the model: 12 unexpected (blocks.2."),
        "twice": ([str(twice)], "both claim step 3 but hold different weights"),
        "planted": ([str(planted)], "needs arbitrary unpickling"),
        "model": ([str(other), "--model", "vit_nonexistent_patch16"], "is not a timm model"),
    }
    for name, (source, message) in cases.items():
        argv = ["probe", "--checkpoints", source[0], "--preset", "smoke", "--device", "cpu", *source[1:]]
        assert cli.main(argv) == 2, name
        err = capsys.readouterr().err
        assert message in err, (name, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
    assert _runs(store) == 0  # no run left behind by any of them
    # the architecture message names the settings that fit, from the checkpoint's tensors
    cli.main(["probe", "--checkpoints", str(other), "--preset", "smoke", "--device", "cpu"])
    assert "depth 3" in capsys.readouterr().err
    # the planted file runs nothing, and with the explicit opt-in it is read
    cli.main(["probe", "--checkpoints", str(planted), "--preset", "smoke", "--device", "cpu"])
    captured = capsys.readouterr()
    assert "--trust_checkpoints" in captured.err and "planted code ran" not in captured.out
    assert cli.main(["probe", "--checkpoints", str(planted), "--preset", "smoke", "--device", "cpu", "--trust_checkpoints", "true"]) == 0
    assert "planted code ran" in capsys.readouterr().out  # the opt-in does unpickle: only for files you trust


@pytest.mark.slow
def test_follow_probes_checkpoints_another_process_writes(tmp_path):
    """`tgo probe --follow` in a process of its own while this one writes a timm series into the
    folder it watches: every checkpoint is probed once it is written, and it stops at follow_until."""
    uri = sqlite_store(tmp_path)
    folder = tmp_path / "train"
    folder.mkdir()
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tgo",
            "probe",
            "--checkpoints",
            str(folder),
            "--preset",
            "smoke",
            "--device",
            "cpu",
            "--follow",
            "true",
            "--follow_until",
            "3",
            "--follow_timeout",
            "120",
            "--experiment",
            "follow",
        ],
        env=subprocess_env(uri),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    from mlflow.tracking import MlflowClient
    from timm.utils import CheckpointSaver

    client = MlflowClient(uri)

    def probed() -> list[int]:
        found = client.get_experiment_by_name("follow")
        runs = client.search_runs([found.experiment_id]) if found else []
        return sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "time/probe_s")) if runs else []

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    saver = CheckpointSaver(model, opt, checkpoint_dir=str(folder), recovery_dir=str(folder), max_history=10)
    try:
        time.sleep(2)  # the watcher starts on an empty folder and waits for a first checkpoint
        for epoch in range(3):  # a training in another process: one checkpoint per epoch
            _train_a_little(model, opt, epoch)
            saver.save_checkpoint(epoch, metric=float(epoch))
            deadline = time.time() + 90
            while epoch + 1 not in probed():  # picked up while the "training" waits
                assert watcher.poll() is None and time.time() < deadline, watcher.communicate(timeout=5)
                time.sleep(0.5)
        out, err = watcher.communicate(timeout=60)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, err[-3000:]
    assert "probed steps [1, 2, 3]" in out, out
    run = client.search_runs([client.get_experiment_by_name("follow").experiment_id])[0]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "time/probe_s")) == [1, 2, 3]
    assert run.info.status == "FINISHED"


def test_follow_on_a_folder_that_disappears_is_one_message_and_a_failed_run(store, tmp_path):
    import threading

    from mlflow.tracking import MlflowClient

    from tgo.errors import ConfigError
    from tgo.series import probe_checkpoints

    folder = tmp_path / "train"
    folder.mkdir()
    _timm_series(folder, ema=False, epochs=1, metrics=(0.1,))
    client = MlflowClient()

    def remove_once_probed() -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and client.get_metric_history(runs[0].info.run_id, "time/probe_s"):
                break
            time.sleep(0.2)
        import shutil

        shutil.rmtree(folder)

    remover = threading.Thread(target=remove_once_probed)
    remover.start()
    with pytest.raises(ConfigError, match="disappeared while tgo probe --follow watched it; steps \\[1\\] are recorded"):
        probe_checkpoints(str(folder), follow=True, follow_timeout=60, poll_s=0.2, **SMOKE)
    remover.join()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and "disappeared" in run.data.tags["tgo.error"]
    assert "tgo.lease" not in run.data.tags


def _lightning_module():
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.vit = _model()

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.vit(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # no update: the weights stay the initial ones

    return Module()


@pytest.mark.slow
def test_lightning_callback_under_ddp_merges_the_ranks_probe(tmp_path):
    """Two CPU processes (Lightning's DDP, gloo): each probes its shard of the probe set, the sums are
    all-reduced, and rank 0 records what one process probing every image records."""
    pytest.importorskip("lightning")
    script = tmp_path / "fit.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent.parent)!r})\n"
        "import lightning.pytorch as pl\n"
        "from lightning.pytorch.loggers import MLFlowLogger\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "from tests.test_probe_series import _cfg, _lightning_module\n"
        "from tgo.data import build_datasets\n"
        "from tgo.integrations.lightning import GeometryCallback\n"
        "if __name__ == '__main__':\n"
        "    train = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))), batch_size=4)\n"
        "    trainer = pl.Trainer(max_epochs=1, accelerator='cpu', devices=2, strategy='ddp', logger=MLFlowLogger(experiment_name='ddp'),\n"
        "                         callbacks=[GeometryCallback(build_datasets(_cfg()).val, preset='smoke', device='cpu')],\n"
        "                         enable_progress_bar=False, enable_model_summary=False)\n"
        "    trainer.fit(_lightning_module(), train)\n"
    )
    uri = sqlite_store(tmp_path)
    done = subprocess.run([sys.executable, str(script)], env=subprocess_env(uri), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.data.tags["tgo.kind"] == "probe"
    mlflow.set_tracking_uri(uri)
    try:
        assert _steps(run.info.run_id) == [0, 1]
        _assert_same(_logged(run.info.run_id, 0), _reference(_model().state_dict()))
    finally:
        mlflow.set_tracking_uri(None)


def test_normalize_model_takes_the_models_own_data_config(store, tmp_path):
    """--normalize model: the probe images normalised with timm's resolve_data_config of the model
    (ViT-Tiny's mean and std 0.5) instead of the image folder's ImageNet statistics."""
    from mlflow.tracking import MlflowClient
    from timm.data import create_transform

    from tests.helpers import image_tree
    from tgo.config import resolve
    from tgo.data import ClassFolder
    from tgo.probe import probe_model
    from tgo.probeset import ProbeSet
    from tgo.series import probe_checkpoints

    image_tree(tmp_path / "images", classes=("a", "b", "c", "d"), per_class=8, size=40)
    state = _model().state_dict()
    torch.save(state, tmp_path / "vit.pth")
    options = dict(SMOKE, dataset="imagefolder", data_dir=str(tmp_path / "images"), probe_size=24)
    by_data = probe_checkpoints(str(tmp_path / "vit.pth"), **options)
    by_model = probe_checkpoints(str(tmp_path / "vit.pth"), normalize="model", **options)
    assert by_model.run_id != by_data.run_id  # another probe set (its images' values differ)
    assert "normalised as the model was trained" in MlflowClient().get_run(by_model.run_id).data.tags["tgo.data_notes"]
    cfg = resolve("smoke", **{k: v for k, v in options.items() if k != "preset"})
    transform = create_transform(input_size=32, is_training=False, interpolation="bicubic", crop_pct=0.9, mean=(0.5,) * 3, std=(0.5,) * 3)
    val = ClassFolder(str(tmp_path / "images" / "val"), transform=transform)
    model = _model()
    model.load_state_dict(state)
    probe_set = ProbeSet.from_dataset(val, 24, cfg.probe_seed, folds=cfg.probe_folds)
    expected = probe_model(model, probe_set.loader(cfg.probe_batch_size), cfg, "cpu")
    _assert_same(_logged(by_model.run_id, 0), {**expected.metrics(), **expected.stderr_metrics()})
    assert _logged(by_data.run_id, 0)["geom/final/cls/effective_rank"] != _logged(by_model.run_id, 0)["geom/final/cls/effective_rank"]


# --------------------------------------------------------------------------------------------------
# alarms: the same rules as tgo train's, in tgo probe (incremental, --follow), GeometryMonitor and
# the Lightning callback, on a collapse built for the purpose
# --------------------------------------------------------------------------------------------------

# The final norm's weight zeroed but for one channel, and its bias zeroed, puts every final token on
# one axis: the final/cls representation has rank 1, so its effective rank is exactly 1 (and so in
# every fold: no standard error), far below half the full-rank value of a random ViT.
COLLAPSE = "collapse: final/cls/effective_rank < 0.5*init"


def _collapse(model) -> None:
    with torch.no_grad():
        model.norm.weight[1:] = 0.0
        model.norm.bias.zero_()


def _collapsing_series(folder: Path, steps=(0, 1, 2, 3), collapse_from: int = 2) -> None:
    """Bare weight files vit_<step>.pt: the initialisation, then a little training per step, and the
    final norm collapsed from step `collapse_from` on."""
    folder.mkdir(parents=True, exist_ok=True)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in steps:
        if step > 0:
            _train_a_little(model, opt, step)
        if step == collapse_from:
            _collapse(model)
        torch.save(model.state_dict(), folder / f"vit_{step}.pt")


def _history(run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient().get_metric_history(run_id, key)}


def _probe_run(experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


@pytest.mark.slow
def test_probe_alarm_warns_from_the_step_of_the_collapse(store, tmp_path):
    """`tgo probe --alarms RULE` in a process of its own: alarm/collapse 0 at the healthy steps and 1
    from the collapse on, one warning line, the tag tgo.alarm at step 2, every step probed."""
    _collapsing_series(tmp_path / "series")
    done = subprocess.run(
        [sys.executable, "-m", "tgo", "probe", "--checkpoints", str(tmp_path / "series"), "--preset", "smoke", "--device", "cpu",
         "--alarms", COLLAPSE, "--experiment", "warn"],
        env=subprocess_env(store), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "alarms (warn when one fires; each breach tested against its standard error" in done.stdout
    assert done.stdout.count("alarm collapse at epoch 2: final/cls/effective_rank 1 ") == 1, done.stdout
    run = _probe_run("warn")
    rank = _history(run.info.run_id, "geom/final/cls/effective_rank")
    assert rank[2] == pytest.approx(1.0) and min(rank[0], rank[1]) > 2.0  # the constructed values
    assert _history(run.info.run_id, "alarm/collapse") == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}
    (fired,) = json.loads(run.data.tags["tgo.alarm"])
    assert fired["alarm"] == "collapse" and fired["epoch"] == 2 and fired["where"] == "final/cls/effective_rank"
    assert "tgo.stopped_by" not in run.data.tags and run.info.status == "FINISHED"


def test_probe_alarm_stop_ends_the_probe_and_the_next_probe_goes_on(store, tmp_path, capsys):
    """--alarm_action stop: the probe ends after step 2's record (FINISHED, tgo.stopped_by, step 3
    unprobed, one line saying so); `tgo probe` of the same checkpoints again continues the run with
    the alarms' state of step 2 (init from step 0: still in alarm at step 3, and the alarm that fired
    does not stop it again)."""
    from mlflow.tracking import MlflowClient

    from tgo import cli

    _collapsing_series(tmp_path / "series")
    argv = ["probe", "--checkpoints", str(tmp_path / "series"), "--preset", "smoke", "--device", "cpu",
            "--alarms", COLLAPSE, "--alarm_action", "stop"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "probed steps [0, 1, 2]; stopped at step 2 by alarm collapse (alarm_action=stop), steps [3] not probed" in out, out
    (run,) = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    rid = run.info.run_id
    assert run.info.status == "FINISHED" and _steps(rid) == [0, 1, 2]
    assert json.loads(run.data.tags["tgo.stopped_by"]) == {"alarms": ["collapse"], "epoch": 2, "of": 3}
    assert _history(rid, "alarm/collapse") == {0: 0.0, 1: 0.0, 2: 1.0}
    assert cli.main(argv) == 0  # again: the rest, in the same run, not stopped again
    out = capsys.readouterr().out
    assert "probed steps [3]; steps [0, 1, 2] were already in the run" in out and "stopped" not in out, out
    (again,) = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    assert again.info.run_id == rid and again.info.status == "FINISHED" and _steps(rid) == [0, 1, 2, 3]
    assert _history(rid, "alarm/collapse") == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}  # 0.5 x step 0's rank: the state went on
    assert "tgo.stopped_by" not in again.data.tags and json.loads(again.data.tags["tgo.alarm"])[0]["epoch"] == 2


def test_probe_follow_stops_following_at_a_stop_alarm(store, tmp_path):
    """--follow with a stop rule: the collapsed checkpoints another thread writes while it follows
    end the probe at the first of them, long before follow_timeout."""
    import threading

    from tgo.series import probe_checkpoints

    folder = tmp_path / "train"
    _collapsing_series(folder, steps=(0, 1))
    later = tmp_path / "later"
    _collapsing_series(later)

    def write_once_followed() -> None:  # once the first scan's steps are recorded: it follows now
        from mlflow.tracking import MlflowClient

        client, deadline = MlflowClient(), time.time() + 60
        while time.time() < deadline:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and 1 in [m.step for m in client.get_metric_history(runs[0].info.run_id, "time/probe_s")]:
                break
            time.sleep(0.2)
        for step in (2, 3):  # what the training writes next: the collapse
            (later / f"vit_{step}.pt").rename(folder / f"vit_{step}.pt")

    writer = threading.Thread(target=write_once_followed)
    writer.start()
    start = time.monotonic()
    result = probe_checkpoints(str(folder), follow=True, follow_timeout=60, poll_s=0.2, alarms=COLLAPSE, alarm_action="stop", **SMOKE)
    writer.join()
    assert len(result.series.checkpoints) == 4  # steps 2 and 3 were found by following, not by the first scan
    assert result.probed == [0, 1, 2] and result.stopped_by == "collapse" and result.stopped_at == 2
    assert time.monotonic() - start < 45  # it stopped following, it did not wait out the timeout
    run = _probe_run("Default")
    assert run.info.status == "FINISHED" and json.loads(run.data.tags["tgo.stopped_by"])["epoch"] == 2


def test_probe_bad_alarm_rules_are_one_message_and_no_run(store, tmp_path, capsys):
    from tgo import cli

    _collapsing_series(tmp_path / "series", steps=(0,))
    cases = {
        "final/cls/nope < 3": "unknown observable 'nope'",
        "block_99/cls/rankme < 3": "names the site 'block_99', which this model does not have",  # after the fit
        "final/cls/rankme = 3": "use < or >",
    }
    for rule, message in cases.items():
        argv = ["probe", "--checkpoints", str(tmp_path / "series"), "--preset", "smoke", "--device", "cpu", "--alarms", rule]
        assert cli.main(argv) == 2, rule
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (rule, err)
    assert _runs(store) == 0


def test_geometry_monitor_should_stop_at_the_collapse(store):
    import tgo
    from tgo.data import build_datasets

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    monitor = tgo.GeometryMonitor(model, build_datasets(_cfg()).val, preset="smoke", device="cpu", alarms=COLLAPSE, alarm_action="stop")
    seen = {}
    for epoch in range(5):
        if epoch > 0:
            _train_a_little(model, opt, epoch)
        if epoch == 2:
            _collapse(model)
        m = monitor.measure(epoch)
        seen[epoch] = (monitor.should_stop, m.alarms.metrics["alarm/collapse"])
        if monitor.should_stop:
            break
    monitor.close()
    assert seen == {0: (False, 0.0), 1: (False, 0.0), 2: (True, 1.0)}
    assert [f.alarm for f in monitor.stopped_by.fired] == ["collapse"]
    run = tgo.tracking.get_run(monitor.run_id)
    assert run.info.status == "FINISHED" and json.loads(run.data.tags["tgo.stopped_by"])["epoch"] == 2
    assert run.data.params["config.alarm_action"] == "stop"


def test_lightning_callback_stop_alarm_stops_the_trainer(store, tmp_path):
    pytest.importorskip("lightning")
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient
    from torch.utils.data import DataLoader, TensorDataset

    from tgo.data import build_datasets
    from tgo.integrations.lightning import GeometryCallback

    class Collapsing(pl.LightningModule):
        """No update (lr 0) but the second epoch's: the final norm collapsed, as a diverging run's."""

        def __init__(self):
            super().__init__()
            self.vit = _model()

        def training_step(self, batch, _):
            if self.current_epoch == 1:
                _collapse(self.vit)
            x, y = batch
            return torch.nn.functional.cross_entropy(self.vit(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    torch.manual_seed(0)
    train = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))), batch_size=8)
    logger = MLFlowLogger(experiment_name="lightning-alarm", tracking_uri=store)
    trainer = pl.Trainer(
        max_epochs=5,
        accelerator="cpu",
        logger=logger,
        callbacks=[GeometryCallback(build_datasets(_cfg()).val, preset="smoke", alarms=COLLAPSE, alarm_action="stop")],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Collapsing(), train)
    assert trainer.current_epoch == 2 < trainer.max_epochs  # stopped after the epoch that collapsed it
    assert _steps(logger.run_id) == [0, 1, 2] and _history(logger.run_id, "alarm/collapse") == {0: 0.0, 1: 0.0, 2: 1.0}
    run = MlflowClient().get_run(logger.run_id)
    assert run.info.status == "FINISHED" and json.loads(run.data.tags["tgo.stopped_by"])["epoch"] == 2
