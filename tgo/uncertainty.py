"""Probe-sampling uncertainty of the observables: the delete-one-fold jackknife (pure functions).

The probe set is a finite sample of N images, so every observable it reports is an estimate with a
sampling error. The probe splits its images into K folds (`fold_ids`: fixed by the probe seed and
each image's place in the probe set, whatever the batch size, worker count or number of ranks),
keeps one moment accumulator per fold (`tgo.accumulate.MomentAccumulator`), and recomputes every
observable K times, each time leaving one fold out. With theta_(k) the estimate without fold k and
theta_(.) their mean, the jackknife standard error (Quenouille 1956, Tukey 1958; grouped form in
Efron & Tibshirani 1993, sec. 11.5) is

    se = sqrt( (K - 1) / K * sum_k (theta_(k) - theta_(.))^2 ),

and a 95% interval is theta_hat +- t_{K-1, 0.975} se (Student's t with K - 1 degrees of freedom,
because se itself is estimated from K replicates).

Why the jackknife, and why K = 5 (`DEFAULT_FOLDS`):
- It needs no stored activations and no second pass: the replicates are the totals less one fold.
  The bootstrap would need a new accumulation (or a Poisson-weighted accumulator) per replicate.
- It covers every observable alike, including those with no closed-form variance (alpha's fit,
  flatness, n_components), and differences: the same images are probed every epoch and at every
  site, so the change between two epochs (or two sites) has the replicates theta_b,(k) -
  theta_a,(k), and `paired_se` gives its standard error with the shared sampling noise removed.
- Each fold costs two eigendecompositions per site and view (covariance and second moment), the
  largest fixed cost of the probe on a CPU (ViT-S/16: 44 site/views, about 5 ms each). K = 5 keeps
  the probe with uncertainty within 1.6 x bare inference at 224 px on a 2-core CPU
  (benchmarks/probe.py); K = 10 would double that cost for a standard error whose own relative
  noise only falls from about 35% to 24%, noise the t quantile with K - 1 degrees of freedom
  already accounts for.
- Calibration, measured in tests/test_uncertainty.py: over 200 independent probe draws from known
  population covariances (isotropic, power law, low rank plus noise), the 95% interval covers the
  mean of the estimator at that N in 90% to 99% of draws for effective rank, participation ratio,
  spectral entropy, anisotropy, flatness and alpha. The jackknife is conservative (intervals too
  wide, coverage near 99%) where a representation is close to isotropic with many more images than
  dimensions: there the observables sit at their maximum and vary only to second order.
- Integer-valued observables (n_components_*) have step-like replicates: their standard error is
  reported but is a poor guide (coverage about 50-80%); no verdict uses them.

Quenouille, M. H. (1956). Notes on bias in estimation. Biometrika 43. Tukey, J. W. (1958). Bias and
confidence in not-quite large samples. Ann. Math. Statist. 29. Efron, B. & Tibshirani, R. J. (1993).
An Introduction to the Bootstrap. Chapman & Hall.
"""

from __future__ import annotations

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike

DEFAULT_FOLDS = 5


def fold_ids(n_images: int, folds: int, seed: int) -> np.ndarray:
    """The fold of each of n_images probe images, by their place in the probe set: 0..folds-1, or
    `folds` for the n_images mod folds images that stay in every replicate.

    A seeded permutation dealt round-robin into folds of exactly n_images // folds images each; the
    remainder is left out of no replicate. Equal folds matter: where N < D the rank-like observables
    grow with the number of images, so replicates of unequal size would differ by their size alone
    and inflate the standard error (by 40% or more at N = 32, D = 48). The assignment depends only
    on (n_images, folds, seed), never on batches, workers or ranks.
    """
    if folds < 1:
        raise ValueError(f"folds must be at least 1, got {folds}.")
    order = np.random.default_rng([int(seed), 0x7467_6F]).permutation(n_images)
    size = n_images // folds
    dealt = np.arange(n_images)
    out = np.empty(n_images, dtype=np.int64)
    out[order] = np.where(dealt < size * folds, dealt % folds, folds)
    return out


def jackknife_se(replicates: ArrayLike, axis: int = 0) -> np.ndarray | np.float64:
    """Delete-one-group jackknife standard error over the K leave-one-fold-out replicates:
    sqrt((K - 1) / K * sum_k (theta_(k) - theta_(.))^2), along `axis` (the fold axis): an array
    over the other axes, a numpy scalar for 1-d replicates. NaN when K < 2."""
    reps = np.asarray(replicates, dtype=np.float64)
    k = reps.shape[axis]
    if k < 2:
        return np.full(np.delete(reps.shape, axis), np.nan) if reps.ndim > 1 else np.float64(np.nan)
    dev = reps - reps.mean(axis=axis, keepdims=True)
    return np.sqrt((k - 1) / k * np.sum(dev**2, axis=axis))


def paired_se(replicates_a: ArrayLike, replicates_b: ArrayLike, axis: int = 0) -> np.ndarray | np.float64:
    """Standard error of theta_b - theta_a when both were measured on the same images (the same
    folds): the jackknife of the replicate differences theta_b,(k) - theta_a,(k)."""
    return jackknife_se(np.asarray(replicates_b, float) - np.asarray(replicates_a, float), axis=axis)


def t_quantile(folds: int, level: float = 0.95) -> float:
    """Two-sided Student t quantile with folds - 1 degrees of freedom."""
    return float(scipy.stats.t.ppf(0.5 + level / 2, max(int(folds) - 1, 1)))


def interval(estimate: ArrayLike, se: ArrayLike, folds: int, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The `level` interval estimate +- t_{K-1} se."""
    half = t_quantile(folds, level) * np.asarray(se, float)
    return np.asarray(estimate, float) - half, np.asarray(estimate, float) + half


def half_width(se: ArrayLike, folds: ArrayLike, level: float = 0.95) -> np.ndarray:
    """Half-width t_{K-1} se of each estimate's `level` interval, with K (`folds`) one count for all
    or one per estimate (tables mix runs and sites probed with different K). NaN where K is
    unknown (NaN) or below 2: without a jackknife there is no interval, however se reads."""
    se = np.asarray(se, float)
    k = np.broadcast_to(np.asarray(folds, float), se.shape)
    known = np.isfinite(k) & (k >= 2)
    quantile = np.full(se.shape, np.nan)
    for value in np.unique(k[known]):  # a handful of distinct K: t_quantile stays the one definition
        quantile[k == value] = t_quantile(int(value), level)
    return quantile * se


def t_test(difference: ArrayLike, se: ArrayLike, folds: int) -> np.ndarray:
    """Two-sided p-value of difference / se against Student's t with folds - 1 degrees of freedom
    (H0: no difference). A zero se gives p = 1 for a zero difference and 0 otherwise."""
    d, s = np.asarray(difference, float), np.asarray(se, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(s > 0, d / np.where(s > 0, s, 1.0), np.where(d == 0, 0.0, np.inf))
    p = 2 * scipy.stats.t.sf(np.abs(t), max(int(folds) - 1, 1))
    return np.where(np.isfinite(d) & np.isfinite(s), p, np.nan)
