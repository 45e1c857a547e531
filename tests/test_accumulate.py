"""The streaming accumulators against the float64 batch (reference) path on the same rows, and numpy on
the same per-image values."""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tgo import spectral
from tgo.accumulate import FoldSums, MomentAccumulator, _tf32_matmuls


def _rows(n=700, d=24, seed=0, offset=20.0):
    rng = np.random.default_rng(seed)
    # Correlated features with a large common offset: the case where a naive sum of squares cancels.
    return (rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + offset).astype(np.float32)


def _stream(X, precision, batch=64):
    acc = MomentAccumulator(X.shape[1], precision=precision)
    for i in range(0, len(X), batch):
        acc.update(torch.from_numpy(X[i : i + batch]))
    return acc


def _assert_observables_close(got, ref, rel):
    for name in spectral.OBSERVABLE_NAMES:
        assert got[name] == pytest.approx(ref[name], rel=rel, abs=1e-12), name


def test_float64_stream_equals_batch_path_to_1e8():
    X = _rows()
    ref = spectral.observables(X.astype(np.float64))
    got = spectral.observables_from_spectra(_stream(X, "float64").spectra())
    _assert_observables_close(got, ref, 1e-8)


def test_float32_stream_holds_leading_eigenvalues_and_flatness():
    X = _rows()
    ref = spectral.spectra_from_matrix(X.astype(np.float64))
    got = _stream(X, "float32").spectra()
    lead = slice(0, 5)
    np.testing.assert_allclose(got.eigenvalues[lead], ref.eigenvalues[lead], rtol=1e-6)
    f_ref = spectral.spectral_flatness(ref.eigenvalues)
    assert spectral.spectral_flatness(got.eigenvalues) == pytest.approx(f_ref, rel=1e-4)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_merge_equals_one_accumulator(precision):
    X = _rows(n=500, seed=1)
    whole = _stream(X, precision)
    # Different splits and batch sizes give different shifts: merging re-expresses them exactly.
    a, b, c = _stream(X[:123], precision, 50), _stream(X[123:400], precision, 7), _stream(X[400:], precision)
    merged = MomentAccumulator(X.shape[1], precision=precision).merge(a).merge(b).merge(c)
    assert merged.n == whole.n == 500
    cov = whole.spectra().covariance
    # Within float64 round-off; in float32 mode, within the float32 rounding of each batch's product.
    tol = (1e-11 if precision == "float64" else 1e-6) * np.abs(cov).max()
    np.testing.assert_allclose(merged.spectra().covariance, cov, rtol=0, atol=tol)
    np.testing.assert_allclose(merged.spectra().eigenvalues[:5], whole.spectra().eigenvalues[:5], rtol=1e-6)
    if precision == "float64":
        _assert_observables_close(
            spectral.observables_from_spectra(merged.spectra()),
            spectral.observables_from_spectra(whole.spectra()),
            1e-8,
        )


def test_update_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
        MomentAccumulator(8).update(torch.zeros(3, 5))


def test_non_finite_rows_are_reported_when_spectra_are_formed():
    acc = MomentAccumulator(3)
    acc.update(torch.tensor([[1.0, 2.0, float("nan")], [0.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        acc.spectra()


def _all_reduce_worker(rank, world, init_file, X, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        acc = MomentAccumulator(X.shape[1], precision="float64")
        shard = X[rank::world]
        for i in range(0, len(shard), 32):
            acc.update(torch.from_numpy(shard[i : i + 32]))
        acc.all_reduce()
        if rank == 0:
            torch.save({"n": acc.n, "cov": acc.spectra().covariance, "obs": spectral.observables_from_spectra(acc.spectra())}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_over_two_gloo_ranks_equals_one_process():
    X = _rows(n=301, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_all_reduce_worker, args=(2, os.path.join(tmp, "init"), X, out), nprocs=2, join=True)
        got = torch.load(out, weights_only=False)
    whole = _stream(X, "float64")
    assert got["n"] == 301
    np.testing.assert_allclose(got["cov"], whole.spectra().covariance, rtol=1e-9, atol=1e-9)
    _assert_observables_close(got["obs"], spectral.observables_from_spectra(whole.spectra()), 1e-8)


@pytest.mark.parametrize("folds, bins", [(1, [0]), (4, [0, 1, 2, 3, 4]), (5, [0, 1, 2, 4, 5])])
def test_fold_sums_match_numpy_per_fold_and_without_each_fold(folds, bins):
    """Per-fold sums of per-image values (the probe's token interaction), against numpy: bins 0..K-1
    are the folds, bin K the images kept in every replicate; fold 3 of the K = 5 case is empty."""
    rng = np.random.default_rng(7)
    values = rng.normal(size=53)
    fold = rng.choice(bins, size=53)
    sums = FoldSums(folds)
    assert sums.value() == 0.0  # no image yet
    for i in range(0, 53, 10):  # batches of 10, the last one shorter
        sums.update(torch.from_numpy(values[i : i + 10]), torch.from_numpy(fold[i : i + 10]))
    np.testing.assert_allclose(sums.sum.numpy(), np.bincount(fold, weights=values, minlength=folds + 1), rtol=1e-12)
    np.testing.assert_array_equal(sums.images.numpy(), np.bincount(fold, minlength=folds + 1))
    assert sums.value() == pytest.approx(values.mean(), rel=1e-12)
    if folds == 1:
        assert sums.replicates() is None
        return
    assert (fold == folds).sum() > 0  # some images are in every replicate
    want = [values[fold != k].mean() for k in range(folds)]  # the mean without fold k
    np.testing.assert_allclose(sums.replicates(), want, rtol=1e-12)


class _Matmul:
    """A stand-in for `torch.backends.cuda.matmul` with the given settings (an exception as a value:
    reading that setting raises it), recording every write."""

    def __init__(self, **settings) -> None:
        object.__setattr__(self, "settings", settings)
        object.__setattr__(self, "writes", [])

    def __getattr__(self, name):
        if name not in self.settings:
            raise AttributeError(name)
        if isinstance(self.settings[name], Exception):
            raise self.settings[name]
        return self.settings[name]

    def __setattr__(self, name, value) -> None:
        self.writes.append((name, value))


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: the accumulator's CUDA path, on a CPU."""

    @property
    def is_cuda(self) -> bool:
        return True


@pytest.mark.parametrize("settings, tf32", [
    ({"fp32_precision": "tf32", "allow_tf32": True}, True),
    ({"fp32_precision": "tf32", "allow_tf32": RuntimeError("mix of the legacy and new APIs")}, True),
    ({"fp32_precision": "ieee", "allow_tf32": False}, False),
    ({"fp32_precision": "none", "allow_tf32": False}, False),
    ({"allow_tf32": True}, True),  # a torch without fp32_precision: the legacy flag
    ({"allow_tf32": False}, False),
])
def test_tf32_is_read_from_the_settings_never_written(monkeypatch, settings, tf32):
    fake = _Matmul(**settings)
    monkeypatch.setattr(torch.backends.cuda, "matmul", fake)
    assert _tf32_matmuls() is tf32
    assert fake.writes == []


@pytest.mark.parametrize("tf32", [True, False])
def test_a_cuda_batch_under_tf32_is_multiplied_in_float64_without_touching_the_setting(monkeypatch, tf32):
    fake = _Matmul(fp32_precision="tf32" if tf32 else "ieee", allow_tf32=tf32)
    monkeypatch.setattr(torch.backends.cuda, "matmul", fake)
    X = torch.from_numpy(_rows(n=50, d=6))
    acc = MomentAccumulator(6, precision="float32")
    acc.update(X.as_subclass(_OnCuda))
    assert fake.writes == []  # the process's setting is never switched, not even for a moment
    y = X - X[0]  # float32 rows about the shift (the first row), as the accumulator forms them
    in_float64, in_float32 = y.double().T @ y.double(), (y.T @ y).double()
    assert not torch.equal(in_float64, in_float32)  # the two paths are told apart
    assert torch.equal(acc.gram[0].as_subclass(torch.Tensor), in_float64 if tf32 else in_float32)
