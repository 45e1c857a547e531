"""Representation similarity and intrinsic dimension (TGO-II): pure functions of feature matrices.

Every function takes features as arrays of shape (N, D): N images (the probe's), D features (a
site's width); two representations compared must have the same N, in the same image order. numpy
only, except `twonn`, which calls scikit-dimension (a maintained implementation; not written here).

Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited"):

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),   K = X X^T, L = Y Y^T (linear kernels)

With the biased HSIC (tr(K H L H) / (N-1)^2, H the centering matrix) this is
||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F) on centred features, and at small N it is far
from 0 even for independent features. The debiased CKA uses the unbiased HSIC estimator of Song et
al. 2012 ("Feature Selection via Dependence Maximization", JMLR 13, eq. 5), with K~, L~ the Gram
matrices with their diagonals set to 0:

    HSIC_u(K, L) = [ tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((N-1)(N-2)) - 2/(N-2) 1^T K~ L~ 1 ] / (N (N-3))

which has expectation 0 for independent X and Y (Kornblith et al. 2019, section 3 and Nguyen et al.
2021 use it for the same reason). Both are invariant to orthogonal transforms and isotropic scaling
of either representation, and equal 1 for a representation with itself.

SVCCA (Raghu et al. 2017, "SVCCA: Singular Vector Canonical Correlation Analysis for Deep Learning
Dynamics and Interpretability"): each representation is reduced to the top singular directions of
its centred features that keep `keep` (99%) of its variance, then CCA between the two reduced
representations; SVCCA is the mean of the canonical correlations. The canonical correlations are
the singular values of Q_x^T Q_y, with Q_x, Q_y orthonormal bases of the reduced centred features
(Bjorck and Golub 1973).

TwoNN (Facco et al. 2017, "Estimating the intrinsic dimension of datasets by a minimal neighborhood
information", Sci. Rep. 7): from the ratio mu = r2 / r1 of each point's second to first nearest
neighbour distance, which follows a Pareto law with exponent d.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


def _as_pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features must be (N, D) arrays over the same N images; got {x.shape} and {y.shape}.")
    return x, y


def _hsic_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. 2012, eq. 5 (see the module docstring) for the linear kernels K = X X^T and
    L = Y Y^T, from the features (N, Dx) and (N, Dy) without forming an N x N matrix (N >= 4).
    With a_i = ||x_i||^2, b_i = ||y_i||^2 (the Gram diagonals) and s_x = sum_i x_i:
    tr(K~ L~) = ||X^T Y||_F^2 - sum_i a_i b_i, 1^T K~ 1 = ||s_x||^2 - sum_i a_i and
    (K~ 1)_i = x_i . s_x - a_i. O(N Dx Dy) instead of O(N^2 (Dx + Dy))."""
    n = x.shape[0]
    a, b = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    sx, sy = x.sum(axis=0), y.sum(axis=0)
    trace = float(np.sum((x.T @ y) ** 2) - a @ b)
    ones_k, ones_l = float(sx @ sx - a.sum()), float(sy @ sy - b.sum())
    k1, l1 = x @ sx - a, y @ sy - b  # K~ 1, L~ 1: (N,)
    term = trace + ones_k * ones_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(k1 @ l1)
    return term / (n * (n - 3))


def _centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0)


def linear_cka(x: np.ndarray, y: np.ndarray, debiased: bool = True) -> float:
    """Linear CKA between features x (N, Dx) and y (N, Dy) of the same N images; debiased (the
    unbiased HSIC, for the probe's small N) or not. NaN when either representation is constant.

    Both forms are invariant to a shift of either representation, so the features are centred
    first (which keeps float64 sums small)."""
    x, y = _as_pair(x, y)
    x, y = _centred(x), _centred(y)
    if debiased:
        if x.shape[0] < 4:
            raise ValueError("the debiased CKA needs at least 4 images.")
        xy, xx, yy = _hsic_unbiased(x, y), _hsic_unbiased(x, x), _hsic_unbiased(y, y)
    else:
        xy = float(np.linalg.norm(y.T @ x) ** 2)  # ||Y_c^T X_c||_F^2
        xx, yy = float(np.linalg.norm(x.T @ x) ** 2), float(np.linalg.norm(y.T @ y) ** 2)
    if xx <= 0 or yy <= 0:
        return float("nan")
    return float(xy / np.sqrt(xx * yy))


@dataclass
class Representation:
    """Features prepared once for many comparisons (debiased CKA and SVCCA with several others):
    centred float64 features (N, D), their own unbiased HSIC and, when first asked for, their SVCCA
    basis (the directions that keep `keep` of the variance)."""

    centred: np.ndarray
    hsic: float
    keep: float = 0.99

    @classmethod
    def of(cls, x: np.ndarray, keep: float = 0.99) -> Representation:
        xc = _centred(np.asarray(x, dtype=np.float64))
        if xc.ndim != 2:
            raise ValueError(f"features must be an (N, D) array; got shape {xc.shape}.")
        own = _hsic_unbiased(xc, xc) if xc.shape[0] >= 4 else float("nan")  # the debiased CKA needs 4 images: NaN below
        return cls(xc, own, keep)

    @functools.cached_property
    def basis(self) -> np.ndarray | None:
        return _top_directions(self.centred, self.keep)


def cka_between(a: Representation, b: Representation) -> float:
    """Debiased linear CKA of two prepared representations of the same images (= linear_cka)."""
    if a.centred.shape[0] != b.centred.shape[0]:
        raise ValueError(f"features must share their N images; got {a.centred.shape} and {b.centred.shape}.")
    if not (a.hsic > 0 and b.hsic > 0):  # no variance, or fewer than 4 images (NaN)
        return float("nan")
    if a is b:
        return 1.0
    return float(_hsic_unbiased(a.centred, b.centred) / np.sqrt(a.hsic * b.hsic))


def pairwise(reps: list[Representation], measure=cka_between) -> np.ndarray:
    """`measure` (cka_between or svcca_between) between every pair of prepared representations of
    the same images: (S, S), symmetric, each pair computed once."""
    out = np.full((len(reps), len(reps)), np.nan)
    for i in range(len(reps)):
        for j in range(i, len(reps)):
            out[i, j] = out[j, i] = measure(reps[i], reps[j])
    return out


def svcca_between(a: Representation, b: Representation) -> float:
    """SVCCA of two prepared representations of the same images (= svcca)."""
    return _mean_correlation(a.basis, b.basis)


def cka_matrix(features: list[np.ndarray], debiased: bool = True) -> np.ndarray:
    """Linear CKA between every pair of representations of the same N images: (S, S), symmetric,
    1 on the diagonal (NaN rows for a representation without variance). Each representation's own
    HSIC is computed once, so S representations cost S (S + 1) / 2 products X^T Y."""
    xs = [np.asarray(x, dtype=np.float64) for x in features]
    if len({x.shape[0] for x in xs}) > 1:
        raise ValueError(f"features must share their N images; got {[x.shape for x in xs]}.")
    if debiased:
        if xs and xs[0].shape[0] < 4:
            raise ValueError("the debiased CKA needs at least 4 images.")
        return pairwise([Representation.of(x) for x in xs])
    xs = [_centred(x) for x in xs]
    own = np.array([np.linalg.norm(x.T @ x) ** 2 for x in xs])  # the biased HSIC of each with itself
    out = np.full((len(xs), len(xs)), np.nan)
    for i in range(len(xs)):
        for j in range(i, len(xs)):
            if own[i] > 0 and own[j] > 0:
                out[i, j] = out[j, i] = 1.0 if i == j else np.linalg.norm(xs[j].T @ xs[i]) ** 2 / np.sqrt(own[i] * own[j])
    return out


def jackknife(statistic, fold: np.ndarray, folds: int, *features: np.ndarray) -> tuple[float, np.ndarray | None]:
    """A statistic of features over N images, and its K leave-one-fold-out replicates.

    statistic(*features) -> float on (N, D) arrays; fold (N,) each image's fold, 0..K-1, or K for
    the images kept in every replicate (`tgo.uncertainty.fold_ids`). Returns (the statistic on all
    images, (K,) replicates), replicates None when K < 2. The replicates pair with those of any
    other statistic of the same images (`tgo.uncertainty.paired_se`). A replicate the statistic
    cannot be computed on (it raises ValueError, e.g. too few images) is NaN."""
    full = float(statistic(*features))
    if folds < 2:
        return full, None
    fold = np.asarray(fold)

    def without(k: int) -> float:
        try:
            return statistic(*(f[fold != k] for f in features))
        except ValueError:  # too few images left in a replicate (a tiny probe set): no replicate, no error
            return float("nan")

    return full, np.array([without(k) for k in range(folds)], dtype=np.float64)


def _top_directions(x: np.ndarray, keep: float) -> np.ndarray | None:
    """An orthonormal basis (N, k) of the top singular directions of the centred features that keep
    `keep` of the variance (their left singular vectors); None for features without variance.

    From the eigendecomposition of the smaller of the two Gram matrices (X X^T when N <= D, else
    X^T X, whose eigenvectors V give U = X V / sigma, re-orthonormalised): several times faster
    than an SVD of X, and the same span."""
    xc = _centred(np.asarray(x, dtype=np.float64))
    n, d = xc.shape
    lam, vec = np.linalg.eigh(xc @ xc.T if n <= d else xc.T @ xc)  # ascending
    lam, vec = np.clip(lam[::-1], 0.0, None), vec[:, ::-1]
    total = lam.sum()
    if total <= 0:
        return None
    k = int(np.searchsorted(np.cumsum(lam) / total, keep - 1e-12) + 1)
    k = min(k, int(np.count_nonzero(lam > lam[0] * 1e-12)))
    if n <= d:
        return vec[:, :k]
    q, _ = np.linalg.qr(xc @ vec[:, :k])  # X v_i = sigma_i u_i: the same span, made orthonormal
    return q


def _mean_correlation(qx: np.ndarray | None, qy: np.ndarray | None) -> float:
    """The mean canonical correlation between two orthonormal bases (singular values of Q_x^T Q_y)."""
    if qx is None or qy is None:
        return float("nan")
    return float(np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0).mean())


def canonical_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The canonical correlations between centred x (N, Dx) and y (N, Dy), in decreasing order:
    the singular values of Q_x^T Q_y (orthonormal bases of their column spaces), at most
    min(rank x, rank y) of them."""
    x, y = _as_pair(x, y)
    qx, rx = np.linalg.qr(x - x.mean(axis=0))
    qy, ry = np.linalg.qr(y - y.mean(axis=0))
    tol = 1e-10 * max(abs(rx).max(initial=0.0), abs(ry).max(initial=0.0), 1.0)
    qx = qx[:, np.abs(np.diag(rx)) > tol]  # drop directions the features do not span
    qy = qy[:, np.abs(np.diag(ry)) > tol]
    return np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0)


def svcca(x: np.ndarray, y: np.ndarray, keep: float = 0.99) -> float:
    """SVCCA (Raghu et al. 2017): the mean canonical correlation between the top singular
    directions of x and of y that keep `keep` of each one's variance. Where k_x + k_y > N the
    reduced representations share directions by dimension count alone (their canonical
    correlations tend to 1): keep N well above the directions kept. NaN for features without
    variance."""
    x, y = _as_pair(x, y)
    return _mean_correlation(_top_directions(x, keep), _top_directions(y, keep))


def feature_metrics(
    features: dict[tuple[str, str], np.ndarray], previous: dict[tuple[str, str], np.ndarray] | None = None
) -> dict[str, float]:
    """What training logs at an epoch whose probe features are kept (keys in tgo.keys): for each
    site, the debiased CKA of its mean features with the final site's and with its own at the
    previous kept epoch, and the TwoNN intrinsic dimension of its cls and mean features. A value
    that cannot be measured (features without variance, as pos_embed/cls) is left out, not logged
    as NaN."""
    from tgo.keys import intrinsic_dim_key, similarity_key

    out: dict[str, float] = {}
    means = {site: Representation.of(x) for (site, view), x in features.items() if view == "mean"}  # each prepared once
    final = means.get("final")
    for (site, view), x in features.items():
        if view == "mean" and final is not None:
            out[similarity_key(site, "final")] = cka_between(means[site], final)
            if previous is not None and (site, view) in previous:
                out[similarity_key(site, "previous")] = cka_between(means[site], Representation.of(previous[(site, view)]))
        out[intrinsic_dim_key(site, view)] = twonn_or_nan(x.astype(np.float64))
    return {key: value for key, value in out.items() if np.isfinite(value)}


def twonn(x: np.ndarray, discard_fraction: float = 0.1) -> float:
    """TwoNN intrinsic dimension of the points x (N, D) (Facco et al. 2017), by scikit-dimension's
    TwoNN with the largest `discard_fraction` of the ratios r2/r1 left out of the fit, as Facco et
    al. advise. Duplicate points (r1 = 0) are removed first."""
    import skdim

    x = np.unique(np.asarray(x, dtype=np.float64), axis=0)
    if x.shape[0] < 3:
        raise ValueError("TwoNN needs at least 3 distinct points.")
    return float(skdim.id.TwoNN(discard_fraction=discard_fraction).fit(x).dimension_)


def twonn_or_nan(x: np.ndarray) -> float:
    """`twonn`, NaN where there is no dimension to measure (fewer than 3 distinct points)."""
    try:
        return twonn(x)
    except ValueError:
        return float("nan")
