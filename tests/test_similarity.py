"""tgo.similarity against closed forms, invariances and independent computations (numpy/scipy)."""

import itertools

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial

from tgo.similarity import canonical_correlations, cka_matrix, jackknife, linear_cka, svcca, twonn


def _orthogonal(d: int, rng) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_1_for_itself_a_rotation_and_an_isotropic_rescaling(debiased):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 20)) @ np.diag(np.linspace(0.2, 3, 20))
    assert linear_cka(x, x, debiased) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ _orthogonal(20, rng), debiased) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, 3.7 * x, debiased) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, -0.2 * x @ _orthogonal(20, rng) + 5.0, debiased) == pytest.approx(1.0, abs=1e-10)  # + a shift


def test_debiased_cka_of_independent_features_is_near_0_where_the_biased_one_is_not():
    rng = np.random.default_rng(1)
    biased, debiased = [], []
    for _ in range(30):
        x, y = rng.normal(size=(32, 256)), rng.normal(size=(32, 256))  # N << D, as in a small probe
        biased.append(linear_cka(x, y, debiased=False))
        debiased.append(linear_cka(x, y, debiased=True))
    assert np.mean(biased) > 0.7  # the biased estimator sees structure in pure noise at this N
    assert abs(np.mean(debiased)) < 3 * np.std(debiased) / np.sqrt(30) + 0.01


def _hsic_u_statistic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. 2012's unbiased HSIC as its defining U-statistic: the mean over ordered tuples of
    4 distinct indices of K_ij L_ij + K_ij L_qr - 2 K_ij L_iq (independent of the closed form)."""
    n = k.shape[0]
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
    return total / (n * (n - 1) * (n - 2) * (n - 3))


def test_cka_matches_its_definitions_computed_independently():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 3))
    y[:, 0] += x[:, 0]  # some shared structure
    k, l = x @ x.T, y @ y.T
    u = [_hsic_u_statistic(a, b) for a, b in ((k, l), (k, k), (l, l))]
    assert linear_cka(x, y, debiased=True) == pytest.approx(u[0] / np.sqrt(u[1] * u[2]), rel=1e-10)
    h = np.eye(7) - 1 / 7  # the centering matrix: biased HSIC = tr(K H L H)
    b = [np.trace(a @ h @ c @ h) for a, c in ((k, l), (k, k), (l, l))]
    assert linear_cka(x, y, debiased=False) == pytest.approx(b[0] / np.sqrt(b[1] * b[2]), rel=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_is_every_pair_of_linear_cka(debiased):
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(40, d)) for d in (6, 9, 4)]
    xs[1][:, :6] += xs[0]  # some shared structure
    xs.append(np.ones((40, 5)))  # no variance: NaN row and column
    got = cka_matrix(xs, debiased)
    for i, j in itertools.product(range(3), range(3)):
        assert got[i, j] == pytest.approx(linear_cka(xs[i], xs[j], debiased), rel=1e-10, abs=1e-12)
    assert np.isnan(got[3]).all() and np.isnan(got[:, 3]).all()


def test_jackknife_replicates_leave_out_one_fold_each():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(23, 5)), rng.normal(size=(23, 5))
    fold = np.array([0, 1, 2, 3] * 5 + [4, 4, 4])  # 4 folds of 5, 3 images in every replicate
    full, reps = jackknife(linear_cka, fold, 4, x, y)
    assert full == linear_cka(x, y)
    np.testing.assert_allclose(reps, [linear_cka(x[fold != k], y[fold != k]) for k in range(4)], rtol=1e-12)
    assert jackknife(linear_cka, fold, 1, x, y)[1] is None


def test_canonical_correlations_match_the_covariance_eigenproblem():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(500, 3))
    x = np.hstack([z, rng.normal(size=(500, 4))]) @ rng.normal(size=(7, 7))
    y = np.hstack([z[:, :2] + 0.5 * rng.normal(size=(500, 2)), rng.normal(size=(500, 3))]) @ rng.normal(size=(5, 5))
    xc, yc = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
    # rho^2 are the eigenvalues of Sxx^-1 Sxy Syy^-1 Syx (Hotelling 1936)
    rho2 = np.sort(np.real(scipy.linalg.eigvals(np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T))))[::-1][:5]
    assert canonical_correlations(x, y) == pytest.approx(np.sqrt(np.clip(rho2, 0, 1)), abs=1e-8)


def test_svcca_of_a_linear_map_of_x_with_x_is_1():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 50))  # 5 directions in 50 features
    assert svcca(x, x @ rng.normal(size=(50, 30))) == pytest.approx(1.0, abs=1e-8)
    assert svcca(x, rng.normal(size=(300, 50))) < 0.5  # unrelated features


def _twonn_mle(x: np.ndarray) -> float:
    """Facco et al. 2017's maximum-likelihood TwoNN, d = N / sum(log(r2 / r1)), with scipy's k-d tree."""
    dist, _ = scipy.spatial.cKDTree(x).query(x, k=3)
    return len(x) / np.sum(np.log(dist[:, 2] / dist[:, 1]))


def test_twonn_finds_5_dimensions_of_a_gaussian_embedded_in_50():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1000, 5)) @ rng.normal(size=(5, 50))
    d = twonn(x)
    assert d == pytest.approx(5, rel=0.10)
    assert d == pytest.approx(_twonn_mle(x), rel=0.10)  # scikit-dimension's fit against the closed-form MLE


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="same N"):
        linear_cka(np.zeros((5, 3)), np.zeros((6, 3)))
    assert np.isnan(linear_cka(np.ones((8, 3)), np.random.default_rng(0).normal(size=(8, 3))))


@pytest.mark.slow
def test_a_training_run_keeps_features_and_logs_similarity_and_intrinsic_dimension(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from tgo import tracking
    from tgo.probe import ProbeResult
    from tgo.train import run

    result = run(preset="smoke", epochs=3, feature_epochs="0,2,last", probe_size=48)
    client = MlflowClient()
    run_id = result.run_id
    names = {a.path for a in client.list_artifacts(run_id, "geometry/features")}
    assert names == {f"geometry/features/epoch_{e:04d}.npz" for e in (0, 2, 3)}
    kept = {e: ProbeResult.load_features(tracking.download(run_id, f"geometry/features/epoch_{e:04d}.npz", tmp_path / str(e))) for e in (2, 3)}
    x = kept[3][("block_00", "mean")]
    assert x.dtype == np.float16 and x.shape == (48, 192)
    # The logged numbers are those of the kept features, recomputed here.
    metrics = client.get_run(run_id).data.metrics
    assert metrics["similarity/block_00/cka_final"] == pytest.approx(linear_cka(x.astype(float), kept[3][("final", "mean")].astype(float)), rel=1e-9)
    assert metrics["similarity/block_00/cka_previous"] == pytest.approx(
        linear_cka(x.astype(float), kept[2][("block_00", "mean")].astype(float)), rel=1e-9)
    assert metrics["intrinsic_dim/final/cls"] == pytest.approx(twonn(kept[3][("final", "cls")].astype(float)), rel=1e-9)
    steps = sorted(m.step for m in client.get_metric_history(run_id, "intrinsic_dim/final/mean"))
    assert steps == [0, 2, 3]  # only at the kept epochs
    # The kept features reload to the probe's own observables (the covariance spectrum of final/mean).
    from tgo.spectral import observables

    spectra = ProbeResult.load(tracking.download(run_id, "geometry/spectra/epoch_0003.npz", tmp_path / "s"))
    assert observables(kept[3][("final", "mean")].astype(float))["effective_rank"] == pytest.approx(
        spectra[("final", "mean")].observables["effective_rank"], rel=1e-2)  # float16 storage


@pytest.mark.slow
def test_a_resumed_run_compares_with_the_features_kept_before_it_stopped(store):
    """cka_previous at the first kept epoch after a resume uses the features the run kept before it
    stopped (read back from its artifacts), as an uninterrupted run does."""
    from helpers import interrupted_and_resumed

    whole, resumed = interrupted_and_resumed(preset="smoke", epochs=3, feature_epochs="all", experiment="features")
    for key in ("similarity/block_00/cka_previous", "similarity/final/cka_previous", "intrinsic_dim/block_01/mean"):
        assert resumed.history[2][key] == pytest.approx(whole.history[2][key], rel=1e-9), key


def test_feature_metrics_leave_out_what_cannot_be_measured():
    from tgo.similarity import feature_metrics

    rng = np.random.default_rng(6)
    features = {("final", "mean"): rng.normal(size=(40, 8)), ("pos_embed", "cls"): np.ones((40, 8)),  # no variance
                ("block_00", "mean"): rng.normal(size=(40, 8))}
    out = feature_metrics(features)
    assert all(np.isfinite(v) for v in out.values())
    assert "intrinsic_dim/pos_embed/cls" not in out and "intrinsic_dim/block_00/mean" in out
    assert out["similarity/final/cka_final"] == pytest.approx(1.0)
