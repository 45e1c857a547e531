"""Jackknife standard errors: closed forms, calibration on known populations, pairing."""

import warnings

import numpy as np
import pytest
import scipy.stats
import torch

from tgo import spectral, uncertainty
from tgo.accumulate import MomentAccumulator

CALIBRATED = ("effective_rank", "participation_ratio", "spectral_entropy", "spectral_anisotropy", "spectral_flatness", "alpha")
K = uncertainty.DEFAULT_FOLDS


def test_jackknife_se_of_the_mean_is_the_textbook_standard_error():
    # For the mean, the delete-one-group jackknife with equal groups equals s_g / sqrt(K), where s_g
    # is the standard deviation of the K group means (a closed form, computed here with numpy).
    x = np.random.default_rng(0).normal(size=100)
    groups = x.reshape(K, -1)
    loo = np.array([np.delete(groups, k, axis=0).mean() for k in range(K)])
    expected = groups.mean(axis=1).std(ddof=1) / np.sqrt(K)
    assert uncertainty.jackknife_se(loo) == pytest.approx(expected, rel=1e-12)
    # The delete-one-observation jackknife of the mean is the usual s / sqrt(n).
    loo1 = np.array([np.delete(x, i).mean() for i in range(len(x))])
    assert uncertainty.jackknife_se(loo1) == pytest.approx(x.std(ddof=1) / np.sqrt(len(x)), rel=1e-12)


def test_t_test_and_interval_match_scipy():
    assert uncertainty.t_quantile(5) == pytest.approx(scipy.stats.t.ppf(0.975, 4))
    lo, hi = uncertainty.interval(10.0, 2.0, 5)
    assert (lo, hi) == pytest.approx((10 - 2 * scipy.stats.t.ppf(0.975, 4), 10 + 2 * scipy.stats.t.ppf(0.975, 4)))
    assert uncertainty.t_test(3.0, 1.5, 5) == pytest.approx(2 * scipy.stats.t.sf(2.0, 4))
    assert uncertainty.t_test(0.0, 0.0, 5) == 1.0 and uncertainty.t_test(1.0, 0.0, 5) == 0.0


def test_half_width_takes_one_k_or_one_per_estimate_and_none_without_a_jackknife():
    se = np.array([1.0, 2.0, 0.5, 1.0, 3.0])
    folds = np.array([5, 4, 10, np.nan, 1])  # K unknown, and K = 1 (no jackknife): no interval
    half = uncertainty.half_width(se, folds)
    assert half[:3] == pytest.approx([scipy.stats.t.ppf(0.975, 4), 2 * scipy.stats.t.ppf(0.975, 3), 0.5 * scipy.stats.t.ppf(0.975, 9)])
    assert np.isnan(half[3:]).all()
    assert uncertainty.half_width(se, 5) == pytest.approx(se * scipy.stats.t.ppf(0.975, 4))
    assert uncertainty.half_width(se, 5, level=0.9) == pytest.approx(se * scipy.stats.t.ppf(0.95, 4))


def test_folds_are_balanced_and_fixed_by_seed():
    a = uncertainty.fold_ids(103, 5, seed=3)
    assert np.array_equal(a, uncertainty.fold_ids(103, 5, seed=3))
    assert not np.array_equal(a, uncertainty.fold_ids(103, 5, seed=4))
    # K folds of exactly 103 // 5 images; the 3 left over stay in every replicate (id K).
    assert np.bincount(a).tolist() == [20, 20, 20, 20, 20, 3]


def _population(kind: str, d: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A population covariance's square root (rotated) and mean."""
    i = np.arange(1, d + 1)
    lam = {"isotropic": np.ones(d), "power law": 1.0 / i, "low rank plus noise": np.r_[np.full(4, 10.0), np.full(d - 4, 0.1)]}[kind]
    q = scipy.stats.ortho_group.rvs(d, random_state=rng)
    return (q * np.sqrt(lam)) @ q.T, rng.normal(size=d)


def _probe_draw(X: np.ndarray, folds: np.ndarray, batch: int = 7) -> tuple[dict, np.ndarray]:
    """Estimate and jackknife replicates through the streaming accumulator, as the probe does:
    each batch sorted by fold."""
    acc = MomentAccumulator(X.shape[1], folds=K)
    for s in range(0, len(X), batch):
        f = folds[s : s + batch]
        order = np.argsort(f, kind="stable")
        acc.update(torch.from_numpy(X[s : s + batch][order]), np.bincount(f, minlength=K + 1).tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spectral.DegenerateGeometryWarning)
        est = spectral.observables_from_spectra(acc.spectra())
        reps = np.array([[o[n] for n in spectral.OBSERVABLE_NAMES] for o in map(spectral.observables_from_spectra, acc.jackknife_spectra())])
    return est, reps


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["isotropic", "power law", "low rank plus noise"])
def test_95_percent_intervals_cover_the_mean_estimate_in_90_to_99_percent_of_draws(kind):
    # The probe's regime: fewer images than dimensions (256 images, D = 384 for ViT-S/16's cls and
    # mean views), here scaled down to N = 128 images of D = 192: as there, every replicate keeps
    # more than 100 eigenvalues, so alpha is fitted over the same ranks (10..100) in each.
    rng = np.random.default_rng({"isotropic": 1, "power law": 2, "low rank plus noise": 3}[kind])
    n, d, draws = 128, 192, 200
    root, mu = _population(kind, d, rng)
    folds = uncertainty.fold_ids(n, K, seed=0)
    estimates, errors = [], []
    for _ in range(draws):
        X = rng.normal(size=(n, d)) @ root + mu
        est, reps = _probe_draw(X, folds)
        estimates.append([est[name] for name in CALIBRATED])
        se = uncertainty.jackknife_se(reps)
        errors.append([se[spectral.OBSERVABLE_NAMES.index(name)] for name in CALIBRATED])
    estimates, errors = np.array(estimates), np.array(errors)
    target = estimates.mean(axis=0)  # the mean of the estimator at this N (Monte Carlo)
    covered = np.abs(estimates - target) <= uncertainty.t_quantile(K) * errors
    coverage = dict(zip(CALIBRATED, covered.mean(axis=0).round(3)))
    # 90% to 99%, up to the Monte Carlo error of a share over 200 draws (two binomial standard
    # errors at the band's edge: 0.042 at 90%, 0.014 at 99%). Anisotropy and alpha of an isotropic
    # population sit near the top (0.984 and 0.982 over 500 draws): the jackknife is conservative
    # where an observable is at its extreme.
    mc = {edge: 2 * np.sqrt(edge * (1 - edge) / draws) for edge in (0.90, 0.99)}
    assert all(0.90 - mc[0.90] <= c <= 0.99 + mc[0.99] for c in coverage.values()), coverage
    assert all(c >= 0.90 for c in coverage.values()) and np.mean(list(coverage.values())) <= 0.99, coverage
    # And the standard error is the right size: its mean against the spread of the estimates.
    ratio = dict(zip(CALIBRATED, (errors.mean(axis=0) / estimates.std(axis=0, ddof=1)).round(2)))
    assert all(0.7 <= r <= 2.0 for r in ratio.values()), ratio


def test_a_paired_change_has_a_smaller_standard_error_than_an_unpaired_one():
    # Two "epochs" probed on the same images: the second is the first plus a small perturbation,
    # as a network changes between epochs. The paired error of the change removes the image noise
    # both share, and is still the right size: close to the Monte Carlo spread of the change.
    rng = np.random.default_rng(7)
    n, d = 60, 24
    root, mu = _population("power law", d, rng)
    folds = uncertainty.fold_ids(n, K, seed=0)
    idx = spectral.OBSERVABLE_NAMES.index("effective_rank")
    changes, paired, unpaired = [], [], []
    for _ in range(120):
        X = rng.normal(size=(n, d)) @ root + mu
        Y = X + 0.15 * rng.normal(size=(n, d)) @ root
        (ea, ra), (eb, rb) = _probe_draw(X, folds), _probe_draw(Y, folds)
        changes.append(eb["effective_rank"] - ea["effective_rank"])
        paired.append(uncertainty.paired_se(ra, rb)[idx])
        unpaired.append(np.hypot(uncertainty.jackknife_se(ra)[idx], uncertainty.jackknife_se(rb)[idx]))
    paired, unpaired = np.array(paired), np.array(unpaired)
    assert np.median(paired / unpaired) < 0.5
    assert 0.6 < np.mean(paired) / np.std(changes, ddof=1) < 1.7
