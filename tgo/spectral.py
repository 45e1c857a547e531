"""Spectral observables of a representation: pure functions over a spectrum (numpy/scipy only).

Notation (docs/METRICS.md). X is N samples x D features taken at one site and token view.
  Xc = X - 1 mu^T                        centered matrix
  C  = Xc^T Xc / (N - 1)                  covariance, float64
  lambda_1 >= ... >= lambda_r >= 0        eigenvalues of C, r = min(D, N - 1)
  sigma_i = sqrt((N - 1) lambda_i)        singular values of Xc
  p_i = lambda_i / sum(lambda)            variance distribution
  q_i = sigma_i / sum(sigma)              singular value distribution
  M  = X^T X / N                          uncentered second moment (RankMe)

Every observable function takes the spectrum its docstring names (already sorted in decreasing order,
float64, non-negative) and returns a Python float. Degenerate spectra (sum == 0: constant features,
all-zero rows, fewer than 2 samples) return the documented value without NaN, inf or exception;
`observables_from_spectra` warns once for them (DegenerateGeometryWarning).

Two ways reach the same numbers:
- `observables(X)`: the reference path for notebooks; a direct SVD of Xc and of X.
- `observables_from_moments(...)`: the streaming path; eigenvalues of the covariance accumulated by
  `tgo.accumulate.MomentAccumulator` (N, sum and Gram matrix). It is split in two
  (`moment_matrices`, then `spectra_from_eigenvalues`) so that the eigenvalues between the halves
  may come from numpy on the host or from a batched eigensolver on a GPU.
Both end in `observables_from_spectra`, so every observable has exactly one definition.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "OBSERVABLE_NAMES",
    "DegenerateGeometryWarning",
    "MomentMatrices",
    "Spectra",
    "alpha",
    "cosine_anisotropy",
    "effective_rank",
    "effective_rank_eig",
    "mean_abs_correlation",
    "moment_matrices",
    "n_components",
    "observables",
    "observables_from_moments",
    "observables_from_spectra",
    "participation_ratio",
    "rankme",
    "spectra_from_eigenvalues",
    "spectra_from_matrix",
    "spectra_from_moments",
    "spectral_anisotropy",
    "spectral_entropy",
    "spectral_entropy_norm",
    "spectral_flatness",
    "stable_rank",
]

# The keys of `observables()`, in docs/METRICS.md order. MLflow keys are geom/<site>/<view>/<name>.
OBSERVABLE_NAMES: tuple[str, ...] = (
    "effective_rank",
    "effective_rank_eig",
    "rankme",
    "stable_rank",
    "participation_ratio",
    "spectral_entropy",
    "spectral_entropy_norm",
    "spectral_flatness",
    "spectral_anisotropy",
    "cosine_anisotropy",
    "alpha",
    "alpha_r2",
    "n_components_90",
    "n_components_95",
    "n_components_99",
    "mean_abs_correlation",
)

RANKME_EPS = 1e-7  # Garrido et al. 2023, eq. 1: p_k = sigma_k / ||sigma||_1 + eps
FLATNESS_FLOOR = 1e-12  # spectral_flatness floors lambda_i at 1e-12 * lambda_1 (docs/METRICS.md)
ALPHA_RANKS = (10, 100)  # alpha fits ranks 10..100, clipped to r (docs/METRICS.md)
_EPS64 = np.finfo(np.float64).eps


class DegenerateGeometryWarning(UserWarning):
    """A representation with no variance (or < 2 samples): observables take their documented
    degenerate values (0 for ranks, entropy, flatness, anisotropy, alpha and counts)."""


# --------------------------------------------------------------------------------------------------
# Pure observables over a spectrum
# --------------------------------------------------------------------------------------------------


def _entropy(values: np.ndarray) -> float:
    """Shannon entropy (nats) of values / sum(values) over positive values: scipy.stats.entropy's
    formula, written out because its argument checking costs more than the sum on these short
    vectors (the probe computes it thousands of times per epoch for its jackknife replicates;
    tests/test_spectral.py checks it against scipy)."""
    p = values / values.sum()
    return float(-np.sum(p * np.log(p)))


def _as_spectrum(values: np.ndarray) -> np.ndarray:
    s = np.asarray(values, dtype=np.float64).ravel()
    return s[s > 0]  # zero entries contribute 0 ln 0 = 0 to every sum below


def effective_rank(singular_values: np.ndarray) -> float:
    """Effective rank of Roy & Vetterli (2007).

    erank = exp(-sum_i q_i ln q_i),  q_i = sigma_i / sum_j sigma_j,
    over the singular values sigma of the centered matrix Xc (not the eigenvalues of C).
    Range [1, r]; 0 for an all-zero spectrum (degenerate).

    Roy, O. & Vetterli, M. (2007). The effective rank: a measure of effective dimensionality. EUSIPCO.
    """
    s = _as_spectrum(singular_values)
    if s.size == 0:
        return 0.0
    return float(np.exp(_entropy(s)))  # s > 0 here: zero entries contribute 0 ln 0 = 0


def effective_rank_eig(eigenvalues: np.ndarray) -> float:
    """Effective rank over the covariance eigenvalues, as TGO-I computes it: exp(spectral_entropy).

    erank_eig = exp(-sum_i p_i ln p_i),  p_i = lambda_i / sum_j lambda_j,  lambda = eigenvalues of C.
    Not the same number as `effective_rank` (Roy & Vetterli's, over singular values sigma_i ~
    sqrt(lambda_i)): squaring the spectrum concentrates it, so erank_eig <= effective_rank; on the
    spectrum lambda_i = 1/i, i = 1..384 (D of ViT-S/16), they are 97.3 and 309.7. Range [1, r]; 0 when
    sum(lambda) == 0.
    """
    lam = _as_spectrum(eigenvalues)
    if lam.size == 0:
        return 0.0
    return float(np.exp(_entropy(lam)))


def rankme(uncentered_singular_values: np.ndarray) -> float:
    """RankMe of Garrido et al. (2023), as in their reference code.

    rankme = exp(-sum_k s_k ln s_k),  s_k = sv_k / sum_j sv_j + 1e-7,
    over the singular values sv of the *uncentered* matrix X (sv_k^2 / N are the eigenvalues of
    M = X^T X / N). The 1e-7 is added after normalising and s is not renormalised, as in the paper.
    Range about [1, min(N, D)]; 0 for an all-zero spectrum (all-zero X).

    Garrido, Q., Balestriero, R., Najman, L. & LeCun, Y. (2023). RankMe: Assessing the downstream
    performance of pretrained self-supervised representations by their rank. ICML.
    """
    sv = np.asarray(uncentered_singular_values, dtype=np.float64).ravel()
    total = sv.sum()
    if not total > 0:
        return 0.0
    s = sv / total + RANKME_EPS
    return float(np.exp(-np.sum(s * np.log(s))))


def stable_rank(eigenvalues: np.ndarray) -> float:
    """Stable (numerical) rank of Rudelson & Vershynin (2007).

    srank = sum_i lambda_i / lambda_1 = ||Xc||_F^2 / ||Xc||_2^2,  lambda = eigenvalues of C.
    Range [1, r]; 0 when sum(lambda) == 0.

    Rudelson, M. & Vershynin, R. (2007). Sampling from large matrices: an approach through geometric
    functional analysis. Journal of the ACM 54(4).
    """
    lam = _as_spectrum(eigenvalues)
    if lam.size == 0:
        return 0.0
    return float(lam.sum() / lam.max())


def participation_ratio(eigenvalues: np.ndarray) -> float:
    """Participation ratio (Gao et al. 2017; skdim's lPCA(ver='participation_ratio')).

    PR = (sum_i lambda_i)^2 / sum_i lambda_i^2,  lambda = eigenvalues of C.
    Range [1, r]; 0 when sum(lambda) == 0.

    Gao, P. et al. (2017). A theory of multineuronal dimensionality, dynamics and measurement. bioRxiv.
    """
    lam = _as_spectrum(eigenvalues)
    if lam.size == 0:
        return 0.0
    lam = lam / lam.max()  # scale-free form, avoids overflow of the squares
    return float(lam.sum() ** 2 / np.sum(lam**2))


def spectral_entropy(eigenvalues: np.ndarray) -> float:
    """Shannon entropy (nats) of the variance distribution.

    H = -sum_i p_i ln p_i,  p_i = lambda_i / sum_j lambda_j,  lambda = eigenvalues of C.
    Range [0, ln r]; 0 when sum(lambda) == 0.
    """
    lam = _as_spectrum(eigenvalues)
    if lam.size == 0:
        return 0.0
    return float(_entropy(lam))


def spectral_entropy_norm(eigenvalues: np.ndarray, r: int | None = None) -> float:
    """Spectral entropy normalised by its maximum: H / ln r, as WeightWatcher's `entropy`
    normalises by ln(rank).

    r is the number of eigenvalues the spectrum can have, min(D, N - 1); by default the length of
    `eigenvalues` (which `spectra_from_*` truncate to r). Range [0, 1]; 0 when r < 2 (ln r = 0,
    a single direction carries no entropy) or when sum(lambda) == 0.
    """
    r = int(np.asarray(eigenvalues).size if r is None else r)
    if r < 2:
        return 0.0
    return float(min(spectral_entropy(eigenvalues) / math.log(r), 1.0))


def spectral_flatness(eigenvalues: np.ndarray) -> float:
    """Spectral flatness (Wiener entropy): geometric mean / arithmetic mean of the eigenvalues.

    SF = exp(mean_i ln lambda_i) / mean_i lambda_i over i = 1..r, lambda = eigenvalues of C, each
    floored at 1e-12 * lambda_1 so that a rank-deficient spectrum gives a small positive value
    rather than 0. Range (0, 1], 1 for an isotropic spectrum; 0 when sum(lambda) == 0.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64).ravel()
    if lam.size == 0 or not lam.max() > 0:
        return 0.0
    lam = np.maximum(lam, FLATNESS_FLOOR * lam.max())
    return float(min(np.exp(np.mean(np.log(lam))) / lam.mean(), 1.0))  # geometric / arithmetic mean


def spectral_anisotropy(eigenvalues: np.ndarray) -> float:
    """Share of the variance on the dominant direction: lambda_1 / sum_i lambda_i.

    lambda = eigenvalues of C. Range [1/r, 1]; 0 when sum(lambda) == 0.
    """
    lam = _as_spectrum(eigenvalues)
    if lam.size == 0:
        return 0.0
    return float(lam.max() / lam.sum())


def cosine_anisotropy(unit_sum: np.ndarray, n_nonzero: int) -> float:
    """Mean cosine similarity over all pairs i != j of uncentered rows (Ethayarajh 2019).

    With u_i = x_i / ||x_i|| over the n rows with ||x_i|| > 0 (an all-zero row has no direction and
    is left out), sum_{i != j} u_i . u_j = ||sum_i u_i||^2 - n, so
        cos_aniso = (||sum_i u_i||^2 - n) / (n (n - 1)).
    Takes the sum of unit rows (D,) and their count, which the streaming accumulator keeps.
    Range [-1/(n-1), 1]; 0 when fewer than 2 rows are non-zero.

    Ethayarajh, K. (2019). How contextual are contextualized word representations? EMNLP.
    """
    n = int(n_nonzero)
    if n < 2:
        return 0.0
    u = np.asarray(unit_sum, dtype=np.float64)
    value = (float(u @ u) - n) / (n * (n - 1))
    return float(np.clip(value, -1.0 / (n - 1), 1.0))


def alpha(eigenvalues: np.ndarray) -> tuple[float, float]:
    """Power-law decay exponent of the eigenspectrum and the fit's r2: lambda_i ~ i^(-alpha).

    Weighted least squares of ln lambda_i on -ln i with weights 1/i (so each octave of ranks
    weighs about the same), over ranks i = 10..100 clipped to r (docs/METRICS.md). When r < 12 the
    window 10..r is too short and the fit uses ranks 1..r. Zero eigenvalues (below the round-off
    floor) have no logarithm and are left out. r2 is the weighted coefficient of determination.
    Returns (alpha, r2); (0.0, 0.0) when fewer than 3 positive eigenvalues are in the window.

    Agrawal, K. K. et al. (2022). alpha-ReQ: Assessing representation quality in self-supervised
    learning by measuring eigenspectrum decay. NeurIPS. Stringer, C. et al. (2019). High-dimensional
    geometry of population responses in visual cortex. Nature.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64).ravel()
    r = lam.size
    lo, hi = ALPHA_RANKS
    lo, hi = (lo, min(hi, r)) if r >= lo + 2 else (1, r)
    ranks = np.arange(lo, hi + 1, dtype=np.float64)
    values = lam[lo - 1 : hi]
    keep = values > 0
    if keep.sum() < 3:
        return 0.0, 0.0
    x, y, w = -np.log(ranks[keep]), np.log(values[keep]), 1.0 / ranks[keep]
    # np.polyfit minimises sum (w_fit * residual)^2, so w_fit = sqrt(weight).
    slope, intercept = np.polyfit(x, y, 1, w=np.sqrt(w))
    fitted = intercept + slope * x
    y_bar = np.sum(w * y) / np.sum(w)
    ss_tot = np.sum(w * (y - y_bar) ** 2)
    ss_res = np.sum(w * (y - fitted) ** 2)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    return float(slope), float(r2)


def n_components(eigenvalues: np.ndarray, tau: float) -> float:
    """Smallest k with sum_{i<=k} lambda_i >= tau * sum_i lambda_i (PCA explained variance).

    lambda = eigenvalues of C in decreasing order, 0 < tau <= 1. Range [1, r]; 0 when
    sum(lambda) == 0. Returned as a float (an MLflow metric).
    """
    lam = np.asarray(eigenvalues, dtype=np.float64).ravel()
    total = lam.sum()
    if not total > 0:
        return 0.0
    explained = np.cumsum(lam) / total
    k = int(np.searchsorted(explained, tau * (1 - 4 * _EPS64), side="left")) + 1
    return float(min(k, lam.size))


def mean_abs_correlation(covariance: np.ndarray) -> float:
    """Mean absolute off-diagonal entry of the correlation matrix R_jk = C_jk / sqrt(C_jj C_kk).

    Describes the covariance structure: 0 for uncorrelated features, 1 when all features move
    together. Features with zero variance have no correlation and are left out. Range [0, 1];
    0 when fewer than 2 features vary.
    """
    c = np.asarray(covariance, dtype=np.float64)
    var = np.diag(c)
    live = var > 0
    d = int(live.sum())
    if d < 2:
        return 0.0
    if d < len(var):
        c = c[np.ix_(live, live)]
    inv_sd = 1.0 / np.sqrt(np.diag(c))
    corr = np.abs(c * inv_sd[:, None])  # |R_jk| = |C_jk| / (sd_j sd_k), clipped at 1 below
    corr *= inv_sd[None, :]
    np.minimum(corr, 1.0, out=corr)
    off_diagonal_sum = corr.sum() - np.trace(corr)
    return float(min(off_diagonal_sum / (d * (d - 1)), 1.0))  # a mean of values <= 1 can round to 1 + eps


# --------------------------------------------------------------------------------------------------
# Spectra: from a sample matrix (reference) or from streamed moments
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spectra:
    """Everything the observables need about one representation matrix X (N x D).

    eigenvalues:                lambda of C, decreasing, length r = min(D, N - 1) (0 if N < 2)
    singular_values:            sigma = sqrt((N - 1) lambda), singular values of Xc
    uncentered_singular_values: singular values of X, decreasing, length min(N, D)
    covariance:                 C (D x D), for the covariance structure
    unit_sum, n_nonzero:        sum of the unit-normalised non-zero rows, and their count
    n_samples:                  N
    """

    eigenvalues: np.ndarray
    singular_values: np.ndarray
    uncentered_singular_values: np.ndarray
    covariance: np.ndarray
    unit_sum: np.ndarray
    n_nonzero: int
    n_samples: int

    @property
    def degenerate(self) -> bool:
        return self.n_samples < 2 or not self.eigenvalues.sum() > 0


def _clean(eigenvalues: np.ndarray, length: int, noise_floor: float) -> np.ndarray:
    """Sort decreasing, keep `length`, and set round-off (negative, or <= noise_floor) to 0."""
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64).ravel())[::-1][:length]
    lam = np.concatenate([lam, np.zeros(max(0, length - lam.size))])
    if lam.size:
        noise_floor = max(noise_floor, 64 * _EPS64 * lam.size * max(lam[0], 0.0))
    lam[lam <= noise_floor] = 0.0
    return lam


def _drop_roundoff_features(cov: np.ndarray, floors: np.ndarray) -> np.ndarray:
    """Zero the rows and columns of features whose variance is round-off (<= floors): their
    correlation with anything is undefined, and `mean_abs_correlation` leaves them out."""
    dead = np.diag(cov) <= floors
    if dead.any():
        cov = cov.copy()
        cov[dead, :] = 0.0
        cov[:, dead] = 0.0
    return cov


def _check_finite(name: str, value: np.ndarray) -> None:
    if not np.all(np.isfinite(value)):
        raise ValueError(
            f"{name} contains NaN or inf: the observables are undefined. Check the model's "
            "activations (a diverged run, or an input that was not normalised)."
        )


def spectra_from_matrix(X: np.ndarray) -> Spectra:
    """Reference spectra of a sample matrix X (N x D) by direct SVD, in float64."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D matrix of N samples x D features, got shape {X.shape}.")
    _check_finite("X", X)
    n, d = X.shape
    r = max(0, min(d, n - 1))
    if n == 0:
        zeros = np.zeros(0)
        return Spectra(zeros, zeros, zeros, np.zeros((d, d)), np.zeros(d), 0, 0)
    xc = X - X.mean(axis=0)
    sigma = np.linalg.svd(xc, compute_uv=False) if r else np.zeros(0)
    # Centering leaves |mu| * eps of round-off in Xc: its squares are no variance.
    scale = float(np.max(np.mean(X**2, axis=0))) if d else 0.0
    floor = (1e3 * _EPS64) ** 2 * scale
    lam = _clean(sigma**2 / max(n - 1, 1), r, floor)
    sv_unc = np.linalg.svd(X, compute_uv=False)
    norms = np.linalg.norm(X, axis=1)
    nonzero = norms > 0
    unit_sum = (X[nonzero] / norms[nonzero, None]).sum(axis=0)
    cov = xc.T @ xc / (n - 1) if n > 1 else np.zeros((d, d))
    cov = _drop_roundoff_features(cov, (1e3 * _EPS64) ** 2 * np.mean(X**2, axis=0))
    return Spectra(
        eigenvalues=lam,
        singular_values=np.sqrt((n - 1) * lam),
        uncentered_singular_values=np.sqrt(_clean(sv_unc**2, min(n, d), 0.0)),
        covariance=cov,
        unit_sum=unit_sum,
        n_nonzero=int(nonzero.sum()),
        n_samples=n,
    )


@dataclass(frozen=True)
class MomentMatrices:
    """The symmetric matrices of streamed moments whose eigenvalues give their `Spectra`, and what
    else `spectra_from_eigenvalues` needs (made by `moment_matrices`).

    covariance:     C (D x D), features of round-off variance zeroed (zeros when N < 2)
    second_moment:  N M = sum_i x_i x_i^T (D x D; only its lower triangle is read), None when N = 0
    noise_floor:    eigenvalues of C at or below it are round-off of the moments and count as 0
    unit_sum, n_nonzero, n_samples: as in `Spectra`

    The eigenvalues may come from anywhere that gives float64 eigenvalues of a symmetric matrix
    from its lower triangle (numpy's eigvalsh on the host; torch.linalg.eigvalsh on a stack of
    many, on a GPU: `tgo.accumulate.spectra_of`): this split is what lets them, while the formulas
    stay here, once.
    """

    covariance: np.ndarray
    second_moment: np.ndarray | None
    noise_floor: float
    unit_sum: np.ndarray
    n_nonzero: int
    n_samples: int

    def eigenproblems(self) -> tuple[np.ndarray, ...]:
        """The matrices whose eigenvalues `spectra_from_eigenvalues` takes, in its order: C when
        N >= 2 (with fewer samples there is no variance to decompose), then N M when N >= 1."""
        cov = self.covariance if self.n_samples >= 2 else None
        return tuple(m for m in (cov, self.second_moment) if m is not None)


def moment_matrices(
    n_samples: int,
    shift: np.ndarray,
    shifted_sum: np.ndarray,
    shifted_gram: np.ndarray,
    unit_sum: np.ndarray,
    n_nonzero: int,
) -> MomentMatrices:
    """The covariance and second moment of streamed moments about a shift s (any fixed row, to
    avoid cancellation), and the round-off floor of the covariance's eigenvalues.

    With y_i = x_i - s:  S = sum y_i,  G = sum y_i y_i^T, so
      C = (G - S S^T / N) / (N - 1)                      (covariance, exact in exact arithmetic)
      N M = sum x_i x_i^T = G + s S^T + S s^T + N s s^T  (uncentered second moment)
    and the floor is the moments' round-off, a few eps of the shifted second moment per entry:
      floor = 1e3 eps D max_j G_jj / N.
    Raises ValueError when a moment holds NaN or inf.
    """
    n = int(n_samples)
    s = np.asarray(shift, dtype=np.float64)
    S = np.asarray(shifted_sum, dtype=np.float64)
    G = np.asarray(shifted_gram, dtype=np.float64)
    for name, value in (("sum", S), ("Gram matrix", G), ("unit sum", np.asarray(unit_sum))):
        _check_finite(f"The accumulated {name}", value)
    d = G.shape[0]
    floor = 0.0
    if n < 2:
        cov = np.zeros((d, d))
    else:
        cov = G - np.outer(S, S / n)
        cov += cov.T  # exactly symmetric (the accumulated Gram matrix is, up to round-off)
        cov /= 2 * (n - 1)
        cov = _drop_roundoff_features(cov, 1e3 * _EPS64 * np.diag(G) / n)
        floor = 1e3 * _EPS64 * d * max(float(np.max(np.diag(G))) / n, 0.0)
    gram_x = None
    if n > 0:
        # G + s S^T + S s^T + N s s^T, as two outer products; eigvalsh reads one triangle only.
        half = S + 0.5 * n * s
        gram_x = G + np.outer(s, half)
        gram_x += np.outer(half, s)
    return MomentMatrices(cov, gram_x, floor, np.asarray(unit_sum, dtype=np.float64), int(n_nonzero), n)


def spectra_from_eigenvalues(matrices: MomentMatrices, eigenvalues: Sequence[np.ndarray]) -> Spectra:
    """The `Spectra` of streamed moments from the eigenvalues of `matrices.eigenproblems()`, one
    array per matrix in that order (any order within an array):

      lambda = eigenvalues of C, decreasing, length r = min(D, N - 1), those <= the floor set to 0
      sigma  = sqrt((N - 1) lambda)
      sv     = sqrt(eigenvalues of N M), decreasing, length min(N, D)
    """
    m, n = matrices, matrices.n_samples
    if len(eigenvalues) != len(m.eigenproblems()):
        raise ValueError(f"expected {len(m.eigenproblems())} arrays of eigenvalues (N = {n}), got {len(eigenvalues)}.")
    values = iter(eigenvalues)
    d = m.covariance.shape[0]
    r = max(0, min(d, n - 1))
    lam = _clean(next(values), r, m.noise_floor) if n >= 2 else np.zeros(r)
    sv_unc = np.sqrt(_clean(next(values), min(n, d), 0.0)) if n > 0 else np.zeros(0)
    return Spectra(
        eigenvalues=lam,
        singular_values=np.sqrt(max(n - 1, 0) * lam),
        uncentered_singular_values=sv_unc,
        covariance=m.covariance,
        unit_sum=m.unit_sum,
        n_nonzero=m.n_nonzero,
        n_samples=n,
    )


def spectra_from_moments(
    n_samples: int,
    shift: np.ndarray,
    shifted_sum: np.ndarray,
    shifted_gram: np.ndarray,
    unit_sum: np.ndarray,
    n_nonzero: int,
) -> Spectra:
    """Spectra from streamed moments about a shift s: `moment_matrices`, numpy's eigvalsh (float64)
    of each, then `spectra_from_eigenvalues`."""
    m = moment_matrices(n_samples, shift, shifted_sum, shifted_gram, unit_sum, n_nonzero)
    return spectra_from_eigenvalues(m, [np.linalg.eigvalsh(p) for p in m.eigenproblems()])


def observables_from_spectra(spectra: Spectra, label: str = "X") -> dict[str, float]:
    """Every observable of docs/METRICS.md from one `Spectra`, keyed by OBSERVABLE_NAMES.

    Warns with DegenerateGeometryWarning (naming `label`) when the representation has no variance
    or fewer than 2 samples; the values are then the documented degenerate ones, never NaN.
    """
    lam, r = spectra.eigenvalues, spectra.eigenvalues.size
    if spectra.degenerate:
        warnings.warn(
            f"{label}: degenerate representation (N={spectra.n_samples} samples, total variance "
            f"{float(lam.sum()):.3g}); rank, entropy, flatness, anisotropy and alpha are reported "
            "as 0.",
            DegenerateGeometryWarning,
            stacklevel=2,
        )
    a, a_r2 = alpha(lam)
    out = {
        "effective_rank": effective_rank(spectra.singular_values),
        "effective_rank_eig": effective_rank_eig(lam),
        "rankme": rankme(spectra.uncentered_singular_values),
        "stable_rank": stable_rank(lam),
        "participation_ratio": participation_ratio(lam),
        "spectral_entropy": spectral_entropy(lam),
        "spectral_entropy_norm": spectral_entropy_norm(lam, r),
        "spectral_flatness": spectral_flatness(lam),
        "spectral_anisotropy": spectral_anisotropy(lam),
        "cosine_anisotropy": cosine_anisotropy(spectra.unit_sum, spectra.n_nonzero),
        "alpha": a,
        "alpha_r2": a_r2,
        "n_components_90": n_components(lam, 0.90),
        "n_components_95": n_components(lam, 0.95),
        "n_components_99": n_components(lam, 0.99),
        "mean_abs_correlation": mean_abs_correlation(spectra.covariance),
    }
    assert tuple(out) == OBSERVABLE_NAMES
    return out


def observables(X: np.ndarray) -> dict[str, float]:
    """Every observable of docs/METRICS.md for a sample matrix X (numpy, N samples x D features).

    The reference path: a direct SVD of Xc (and of X for RankMe) in float64. Returns Python floats
    keyed by OBSERVABLE_NAMES. N < D is ordinary input (r = N - 1). Raises ValueError for NaN/inf
    or a non-2-D input; warns (DegenerateGeometryWarning) for constant features, a single sample or
    an all-zero matrix, whose values are documented in each function.
    """
    return observables_from_spectra(spectra_from_matrix(X), label="X")


def observables_from_moments(**moments) -> dict[str, float]:
    """Every observable from streamed moments (the keyword arguments of `spectra_from_moments`)."""
    return observables_from_spectra(spectra_from_moments(**moments))
