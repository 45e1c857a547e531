"""What runs differently on a GPU, checked on the CPU: the probe's batched eigensolver, the weight
spectra's batched SVD (each forced onto CPU tensors and compared with the host path), and the
checkpoint written by a background thread while the loop goes on."""

import threading
import time
import warnings

import numpy as np
import pytest
import torch

from helpers import tiny_vit
from tgo import spectral, tracking, weights
from tgo.accumulate import eigensolver_for
from tgo.probe import probe
from tgo.probeset import ProbeSet
from tgo.recording import EpochCommitter


def test_the_batched_torch_eigensolver_gives_the_observables_of_numpys(monkeypatch):
    vit = tiny_vit()
    images = torch.randn(43, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    ps = ProbeSet.from_dataset(torch.utils.data.TensorDataset(images, torch.zeros(43)), 43, seed=1, folds=5)
    numpy_calls, torch_calls = [], []
    real_np, real_torch = np.linalg.eigvalsh, torch.linalg.eigvalsh
    monkeypatch.setattr(np.linalg, "eigvalsh", lambda a, *args, **kw: numpy_calls.append(a.shape) or real_np(a, *args, **kw))
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda a, *args, **kw: torch_calls.append(a.shape) or real_torch(a, *args, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spectral.DegenerateGeometryWarning)
        host = probe(vit, ps.loader(16), folds=5, eigensolver="numpy")
        assert torch_calls == [] and len(numpy_calls) == 14 * 6 * 2  # 14 site/views x (estimate + 5 replicates) x (C, N M)
        numpy_calls.clear()
        device = probe(vit, ps.loader(16), folds=5, eigensolver="torch")
    # the GPU's path: no host eigensolver, every matrix of the probe in one stacked float64 call
    assert numpy_calls == [] and torch_calls == [(14 * 6 * 2, 32, 32)]
    assert set(device.geometry) == set(host.geometry)
    for key, want in host.geometry.items():
        got = device.geometry[key]
        scale = max(want.eigenvalues.max(initial=0.0), 1e-300)
        np.testing.assert_allclose(got.eigenvalues, want.eigenvalues, rtol=1e-9, atol=1e-12 * scale, err_msg=str(key))
        np.testing.assert_allclose(got.uncentered_singular_values, want.uncentered_singular_values, rtol=1e-9, atol=1e-9)
        for name in spectral.OBSERVABLE_NAMES:
            assert got.observables[name] == pytest.approx(want.observables[name], rel=1e-9, abs=1e-12), (key, name)
        np.testing.assert_allclose(got.replicates, want.replicates, rtol=1e-9, atol=1e-12, err_msg=str(key))
        assert got.degenerate == want.degenerate
    # "auto": the device's eigensolver on a GPU, the host's on the CPU (where the probe above ran)
    assert eigensolver_for("auto", "cuda:0") == "torch" and eigensolver_for("auto", torch.device("cpu")) == "numpy"


def test_batched_weight_svds_equal_the_host_path_and_the_cpu_keeps_the_host_path(monkeypatch):
    model = tiny_vit(embed_dim=64, num_heads=2, num_classes=10)
    mats = weights.matrices(model)
    host, batched = weights.singular_values(mats), weights.singular_values(mats, batched=True)
    assert list(batched) == list(host)  # forward order, as the metrics and the saved file list them
    for name, want in host.items():
        np.testing.assert_allclose(batched[name], want, rtol=1e-12, atol=1e-13 * want[0], err_msg=name)
    chosen = []
    real = weights.singular_values
    monkeypatch.setattr(weights, "singular_values", lambda m, batched=False: chosen.append(batched) or real(m, batched))
    monkeypatch.setattr(weights, "weightwatcher_alphas", lambda model: {})
    spectra = weights.weight_spectra(model)  # weights on the CPU: the host path, as before
    assert chosen == [False] and spectra.singular_values.keys() == host.keys()


@pytest.mark.parametrize("background", [True, False])
def test_a_background_checkpoint_write_does_not_hold_up_the_loop(store, tmp_path, monkeypatch, background):
    run_id = tracking.start_run("committer").info.run_id
    write_s = 0.6
    real_save = tracking.save_torch
    writers = []

    def slow_save(*args, **kwargs):  # a slow disk or artifact store
        writers.append(threading.current_thread() is threading.main_thread())
        time.sleep(write_s)
        real_save(*args, **kwargs)

    monkeypatch.setattr(tracking, "save_torch", slow_save)
    committer = EpochCommitter(run_id, str(tmp_path / "scratch"), background=background)
    (tmp_path / "scratch").mkdir()
    checkpoint = {"epoch": 1, "model": {"w": torch.arange(6.0)}}
    start = time.perf_counter()
    committer.submit(1, 2, checkpoint, None, None, {"train/loss": 1.0})
    returned = time.perf_counter() - start
    if not background:  # the CPU's choice: written in line, the loop waits for it
        assert returned >= write_s and writers == [True]
        tracking.end_run("FINISHED")
        return
    assert returned < write_s / 3  # the loop goes on: the next epoch trains while the thread writes
    assert committer.recorded == -1  # metrics only after their checkpoint: not yet
    start = time.perf_counter()
    committer.submit(2, 2, {"epoch": 2, "model": {"w": torch.ones(6)}}, None, None, {"train/loss": 0.5})
    joined = time.perf_counter() - start
    assert write_s / 3 < joined < 2 * write_s  # the next submit joins the previous write first
    committer.wait()
    assert writers == [False, False] and committer.recorded == 2
    saved = torch.load(tracking.local_artifact_dir(run_id) / "checkpoints" / "last.pt", weights_only=True)
    assert saved["epoch"] == 2 and torch.equal(saved["model"]["w"], torch.ones(6))
    history = tracking.MlflowClient().get_metric_history(run_id, "time/checkpoint_s")
    assert sorted(m.step for m in history) == [1, 2] and min(m.value for m in history) >= write_s
    tracking.end_run("FINISHED")
