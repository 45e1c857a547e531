"""tgo.spectral against closed forms and independent references (numpy, scipy, scikit-learn)."""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ortho_group
from sklearn.decomposition import PCA
from sklearn.metrics.pairwise import cosine_similarity

from tgo import spectral
from tgo.spectral import DegenerateGeometryWarning, observables

RANKS = ("effective_rank", "rankme", "stable_rank", "participation_ratio")


def test_keys_are_the_metrics_md_names():
    out = observables(np.random.default_rng(0).normal(size=(50, 8)))
    assert tuple(out) == (
        "effective_rank", "effective_rank_eig", "rankme", "stable_rank", "participation_ratio", "spectral_entropy",
        "spectral_entropy_norm", "spectral_flatness", "spectral_anisotropy", "cosine_anisotropy",
        "alpha", "alpha_r2", "n_components_90", "n_components_95", "n_components_99",
        "mean_abs_correlation",
    )
    assert all(type(v) is float for v in out.values())


def test_eigenvalue_effective_rank_is_tgo1s_and_differs_from_roy_vetterli():
    # TGO-I's effective rank: exp of the Shannon entropy of p = lambda / sum(lambda), by hand.
    lam = 1.0 / np.arange(1, 385)
    p = lam / lam.sum()
    expected = math.exp(-float(np.sum(p * np.log(p))))
    assert spectral.effective_rank_eig(lam) == pytest.approx(expected, rel=1e-12)
    assert spectral.effective_rank_eig(lam) == pytest.approx(97.32, abs=0.01)
    # Roy & Vetterli's over the singular values sigma ~ sqrt(lambda) is another, larger number.
    q = np.sqrt(lam) / np.sqrt(lam).sum()
    assert spectral.effective_rank(np.sqrt(lam)) == pytest.approx(math.exp(-float(np.sum(q * np.log(q)))), rel=1e-12)
    assert spectral.effective_rank(np.sqrt(lam)) > 3 * spectral.effective_rank_eig(lam)
    X = np.random.default_rng(5).normal(size=(300, 12)) * np.linspace(1, 4, 12)
    out = observables(X)
    assert out["effective_rank_eig"] == pytest.approx(math.exp(out["spectral_entropy"]), rel=1e-12)
    assert spectral.effective_rank_eig(np.zeros(4)) == 0.0


def test_isotropic_gaussian_is_full_rank_flat_and_isotropic():
    d, n = 32, 40_000
    X = np.random.default_rng(1).normal(size=(n, d))
    out = observables(X)
    # Marchenko-Pastur: eigenvalues of the sample covariance lie within (1 +- sqrt(d/n))^2 = 1 +- 0.06.
    assert out["effective_rank"] == pytest.approx(d, rel=0.01)
    assert out["participation_ratio"] == pytest.approx(d, rel=0.01)
    assert out["stable_rank"] == pytest.approx(d, rel=0.08)
    assert out["spectral_anisotropy"] == pytest.approx(1 / d, rel=0.08)
    assert out["spectral_flatness"] > 0.995
    assert out["spectral_entropy"] == pytest.approx(math.log(d), rel=1e-3)
    assert out["spectral_entropy_norm"] == pytest.approx(1.0, abs=1e-3)
    assert abs(out["cosine_anisotropy"]) < 1e-3  # directions are uniform on the sphere
    assert out["mean_abs_correlation"] < 0.01
    assert out["n_components_99"] >= d - 1


def test_exact_rank_k_bounds_every_rank_measure():
    rng = np.random.default_rng(2)
    k, d, n = 5, 40, 500
    X = rng.normal(size=(n, k)) @ rng.normal(size=(k, d)) + 3.0  # rank k after centering
    out = observables(X)
    for name in ("effective_rank", "stable_rank", "participation_ratio", "n_components_90",
                 "n_components_95", "n_components_99"):
        assert 1 <= out[name] <= k + 1e-9, name
    # The uncentered matrix has rank k + 1 (the offset adds a direction); RankMe's +1e-7 adds < 1e-3.
    assert out["rankme"] <= k + 1 + 1e-3
    assert out["spectral_entropy"] <= math.log(k) + 1e-9
    assert out["spectral_flatness"] < 1e-6  # most of the r eigenvalues are (floored) zeros


def test_references_from_independent_computations():
    rng = np.random.default_rng(3)
    n, d = 300, 24
    X = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
    out = observables(X)
    xc = X - X.mean(0)
    sigma = np.linalg.svd(xc, compute_uv=False)
    lam = np.linalg.eigvalsh(np.cov(X, rowvar=False))[::-1]
    q = sigma / sigma.sum()
    assert out["effective_rank"] == pytest.approx(math.exp(-(q * np.log(q)).sum()), rel=1e-10)
    sv = np.linalg.svd(X, compute_uv=False)
    s = sv / sv.sum() + 1e-7
    assert out["rankme"] == pytest.approx(math.exp(-(s * np.log(s)).sum()), rel=1e-10)
    assert out["stable_rank"] == pytest.approx(lam.sum() / lam[0], rel=1e-10)
    assert out["participation_ratio"] == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-10)
    p = lam / lam.sum()
    assert out["spectral_entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-10)
    assert out["spectral_entropy_norm"] == pytest.approx(-(p * np.log(p)).sum() / math.log(d), rel=1e-10)
    assert out["spectral_flatness"] == pytest.approx(math.exp(np.log(lam).mean()) / lam.mean(), rel=1e-10)
    assert out["spectral_anisotropy"] == pytest.approx(lam[0] / lam.sum(), rel=1e-10)
    cos = cosine_similarity(X)
    assert out["cosine_anisotropy"] == pytest.approx(cos[~np.eye(n, dtype=bool)].mean(), rel=1e-9)
    corr = np.corrcoef(X, rowvar=False)
    assert out["mean_abs_correlation"] == pytest.approx(np.abs(corr[~np.eye(d, dtype=bool)]).mean(), rel=1e-10)
    for tau, name in ((0.90, "n_components_90"), (0.95, "n_components_95"), (0.99, "n_components_99")):
        # scikit-learn picks the smallest k whose explained variance exceeds tau (ties have measure 0).
        assert out[name] == PCA(n_components=tau, svd_solver="full").fit(X).n_components_


def test_alpha_recovers_a_power_law_and_matches_a_weighted_lstsq():
    i = np.arange(1, 201, dtype=float)
    a, r2 = spectral.alpha(3.0 * i**-1.7)
    assert a == pytest.approx(1.7, rel=1e-10) and r2 == pytest.approx(1.0, abs=1e-12)
    lam = np.sort(np.random.default_rng(4).lognormal(size=150))[::-1]
    a, r2 = spectral.alpha(lam)
    ranks = np.arange(10, 101)
    w = np.sqrt(1.0 / ranks)
    design = np.stack([np.ones_like(ranks, dtype=float), -np.log(ranks)], axis=1)
    coef, *_ = np.linalg.lstsq(design * w[:, None], np.log(lam[9:100]) * w, rcond=None)
    assert a == pytest.approx(coef[1], rel=1e-9)
    assert 0.0 <= r2 <= 1.0


def test_invariant_to_rotation_and_to_scale():
    rng = np.random.default_rng(5)
    n, d = 400, 16
    X = rng.normal(size=(n, d)) * np.linspace(0.2, 3.0, d) + 1.0
    base = observables(X)
    rotated = observables(X @ ortho_group.rvs(d, random_state=6))
    scaled = observables(X * 7.5)
    for name, value in base.items():
        assert scaled[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
        if name != "mean_abs_correlation":  # correlations depend on the feature axes
            assert rotated[name] == pytest.approx(value, rel=1e-8, abs=1e-12), name


def test_fewer_samples_than_features_has_r_equal_n_minus_one():
    X = np.random.default_rng(7).normal(size=(10, 50))
    spectra = spectral.spectra_from_matrix(X)
    assert spectra.eigenvalues.size == 9
    out = observables(X)
    assert 1 <= out["effective_rank"] <= 9
    assert out["n_components_99"] <= 9
    assert out["spectral_entropy_norm"] <= 1.0


def _assert_finite(out):
    assert all(math.isfinite(v) for v in out.values()), out


@pytest.mark.parametrize(
    "X",
    [np.full((20, 6), 0.1), np.ones((1, 6)), np.zeros((20, 6)), np.zeros((0, 6))],
    ids=["constant", "one-sample", "all-zero", "empty"],
)
def test_degenerate_input_warns_and_reports_documented_values(X):
    with pytest.warns(DegenerateGeometryWarning):
        out = observables(X)
    _assert_finite(out)
    for name in ("effective_rank", "stable_rank", "participation_ratio", "spectral_entropy",
                 "spectral_entropy_norm", "spectral_flatness", "spectral_anisotropy", "alpha",
                 "n_components_90", "mean_abs_correlation"):
        assert out[name] == 0.0, name
    if len(X) >= 2 and np.any(X):  # constant non-zero rows: one shared direction
        assert out["cosine_anisotropy"] == pytest.approx(1.0)
        assert out["rankme"] == pytest.approx(1.0, abs=1e-4)


def test_all_zero_rows_are_left_out_of_cosine_anisotropy():
    rng = np.random.default_rng(8)
    X = rng.normal(size=(30, 5)) + 2.0
    X[::3] = 0.0
    out = observables(X)
    _assert_finite(out)
    live = X[np.any(X != 0, axis=1)]
    cos = cosine_similarity(live)
    assert out["cosine_anisotropy"] == pytest.approx(cos[~np.eye(len(live), dtype=bool)].mean(), rel=1e-9)


def test_one_constant_feature_among_varying_ones_is_not_degenerate():
    X = np.random.default_rng(9).normal(size=(100, 4))
    X[:, 2] = 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateGeometryWarning)
        out = observables(X)
    assert out["effective_rank"] <= 3 + 1e-9
    corr = np.corrcoef(X[:, [0, 1, 3]], rowvar=False)
    assert out["mean_abs_correlation"] == pytest.approx(np.abs(corr[~np.eye(3, dtype=bool)]).mean(), rel=1e-9)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_a_clear_error(bad):
    X = np.ones((5, 3))
    X[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        observables(X)


def test_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="N samples x D features"):
        observables(np.ones(5))


spectra_strategy = st.lists(
    st.floats(min_value=1e-6, max_value=1e6, allow_nan=False), min_size=2, max_size=60
).map(lambda v: np.sort(np.array(v))[::-1])


@settings(max_examples=200, deadline=None)
@given(spectra_strategy)
def test_ranges_hold_for_random_spectra(lam):
    r = lam.size
    tol = 1e-9
    sigma = np.sqrt(lam)
    assert 1 - tol <= spectral.effective_rank(sigma) <= r + tol
    assert 1 - tol <= spectral.stable_rank(lam) <= r + tol
    assert 1 - tol <= spectral.participation_ratio(lam) <= r + tol
    assert -tol <= spectral.spectral_entropy(lam) <= math.log(r) + tol
    assert 0 <= spectral.spectral_entropy_norm(lam) <= 1
    assert 0 < spectral.spectral_flatness(lam) <= 1
    assert 1 / r - tol <= spectral.spectral_anisotropy(lam) <= 1
    for tau in (0.9, 0.95, 0.99):
        assert 1 <= spectral.n_components(lam, tau) <= r
    assert 1 - tol <= spectral.rankme(sigma) <= r * (1 + 1e-6) + tol


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 40),
    st.integers(1, 12),
    st.floats(-5, 5),
    st.integers(0, 2**31 - 1),
)
def test_ranges_hold_for_random_matrices(n, d, offset, seed):
    X = np.random.default_rng(seed).normal(size=(n, d)) + offset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateGeometryWarning)
        out = observables(X)
    _assert_finite(out)
    r = min(d, n - 1)
    assert 0 <= out["effective_rank"] <= r + 1e-9
    assert -1 / (n - 1) - 1e-12 <= out["cosine_anisotropy"] <= 1
    assert 0 <= out["mean_abs_correlation"] <= 1
    assert 0 <= out["n_components_99"] <= r


def test_entropy_and_flatness_match_scipy():
    import scipy.stats

    lam = np.sort(np.random.default_rng(9).gamma(0.5, size=200))[::-1]
    assert spectral.spectral_entropy(lam) == pytest.approx(scipy.stats.entropy(lam), rel=1e-12)
    sv = np.sqrt(lam)
    assert spectral.effective_rank(sv) == pytest.approx(math.exp(scipy.stats.entropy(sv)), rel=1e-12)
    floored = np.maximum(lam, spectral.FLATNESS_FLOOR * lam.max())
    assert spectral.spectral_flatness(lam) == pytest.approx(scipy.stats.gmean(floored) / floored.mean(), rel=1e-12)
