"""Streaming, mergeable moment accumulator: the stateful half of the geometry probe.

It keeps, on the model's device, what every observable of docs/METRICS.md needs from a stream of
rows x_i (D features), split into K folds (and, with K > 1, one more group: the images that stay
in every replicate when the probe set does not divide into K equal folds): per group k the count N_k, the sum and Gram matrix of the
rows about one fixed shift s (the first row seen), and the sum and count of the unit-normalised
non-zero rows (cosine anisotropy). Memory is O(K D^2) whatever the number of rows. The totals over
all folds give the spectra of every row; the totals less one fold give the delete-one-fold
jackknife replicates (`tgo.uncertainty`), so the probe's standard errors cost no second pass and no
stored activations. The spectra and observables are then computed in float64 by the pure functions
of `tgo.spectral` (the functional core); this class only feeds them, and `spectra_of` takes their
eigenvalues from numpy on the host or, on a GPU, from one batched torch.linalg.eigvalsh call.

Folds. Rows arrive in fold order within a batch (`update(rows, counts)`: counts[k] rows of fold k,
one after the other); the probe sorts each batch's images by fold before its forward pass, so every
site's rows are contiguous per fold and nothing is copied. A fold is a set of images, never of
tokens: the patch tokens of one image are correlated and must leave the sample together.

Precision. The totals are float64. Shifting by a row of the data first removes the mean before any
product is formed, so the covariance C = (G - S S^T / N) / (N - 1) suffers no cancellation. Each
batch's Gram matrix is computed in float64 (`precision="float64"`, the default, as docs/METRICS.md asks)
or in float32 on the shifted rows and added to the float64 total (`precision="float32"`, cheaper on
a CPU). float32 holds the leading eigenvalues to 1e-6 relative and the spectral flatness to 1e-4
against a float64 batch computation on ViT activations (tests/test_probe.py, benchmarks/probe.py),
except where the representation has an exactly null direction: a LayerNorm output (the `final`
site) lies in a hyperplane, and float32 products read its zero eigenvalue as about 1e-7 lambda_1
instead of 0, which moves spectral_flatness (floored at 1e-12 lambda_1) by tens of percent. TF32 is
never used for these products: where the process enables TF32 matmuls on CUDA, a float32 batch
product is formed in float64 instead (`_gram`); the process's settings are read, never changed.

Per-image values. `FoldSums` keeps the same folds for one number per image (the probe's token
interaction): per fold the sum of the values and the image count, whose totals give the mean over
all images and whose totals less one fold give its jackknife replicates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from tgo import spectral

Precision = Literal["float32", "float64"]


class MomentAccumulator:
    """Sufficient statistics of a stream of D-dimensional rows in K folds; `update`, `merge`,
    `all_reduce`, `spectra` (all rows) and `jackknife_spectra` (all rows less one fold, per fold).

    Merging two accumulators (batches, workers, DDP ranks) equals accumulating all their rows in one,
    within float64 round-off: the other's moments are re-expressed about this one's shift exactly.
    """

    def __init__(
        self,
        dim: int,
        device: torch.device | str = "cpu",
        precision: Precision = "float64",
        folds: int = 1,
    ) -> None:
        if precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}.")
        if int(folds) < 1:
            raise ValueError(f"folds must be at least 1, got {folds}.")
        self.dim = int(dim)
        self.folds = int(folds)
        self.device = torch.device(device)
        self.precision: Precision = precision
        # K folds, and with K > 1 one more group that no replicate leaves out (tgo.uncertainty.fold_ids)
        self.groups = self.folds + 1 if self.folds > 1 else 1
        k, d = self.groups, self.dim
        self.counts = np.zeros(k, dtype=np.int64)  # N_k, on the host: counts never need the device
        self.shift: torch.Tensor | None = None  # (D,) float64, the first row seen
        f64, dev = torch.float64, self.device
        self.sum = torch.zeros(k, d, dtype=f64, device=dev)  # (K, D)    sum over fold k of (x_i - s)
        self.gram = torch.zeros(k, d, d, dtype=f64, device=dev)  # (K, D, D) sum over fold k of (x_i - s)(x_i - s)^T
        self.unit_sum = torch.zeros(k, d, dtype=f64, device=dev)  # (K, D) sum of x_i / ||x_i|| over non-zero rows
        self.n_nonzero = torch.zeros(k, dtype=f64, device=dev)  # kept as a tensor: no device sync per batch

    @property
    def n(self) -> int:
        """Rows seen, all folds together."""
        return int(self.counts.sum())

    @torch.no_grad()
    def update(self, rows: torch.Tensor, counts: Sequence[int] | None = None) -> None:
        """Add a batch of rows, shape (n, D) (any float dtype; promoted as the precision says).

        counts: rows per group, in group order (rows[:counts[0]] are fold 0, and so on; entry K, if
        given, the rows kept in every replicate); None puts every row in fold 0.
        """
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (n, {self.dim}), got {tuple(rows.shape)}.")
        counts = [rows.shape[0]] if counts is None else [int(c) for c in counts]
        if len(counts) > self.groups or sum(counts) != rows.shape[0]:
            raise ValueError(f"counts {counts} do not split {rows.shape[0]} rows into at most {self.groups} groups ({self.folds} folds).")
        if rows.shape[0] == 0:
            return
        rows = rows.to(self.device)
        if self.shift is None:
            self.shift = rows[0].detach().to(torch.float64).clone()
        work = torch.float64 if self.precision == "float64" else torch.float32
        # (n, D) about the shift, converted then subtracted in place (one pass): small, so the
        # products below lose nothing to cancellation.
        y = rows.to(work, copy=True).sub_(self.shift.to(work))
        # sum_i x_i / ||x_i|| = w^T y + (sum_i w_i) s with w_i = 1 / ||x_i|| (0 for a zero row):
        # a matrix-vector product instead of an (n, D) division.
        norms = torch.linalg.vector_norm(rows, dim=1).to(torch.float64)  # (n,)
        nonzero = norms > 0
        w = torch.where(nonzero, 1.0 / norms.clamp_min(1e-300), 0.0)
        start = 0
        for k, c in enumerate(counts):
            if c == 0:
                continue
            yk, wk = y[start : start + c], w[start : start + c]  # views, no copy
            self.sum[k] += yk.sum(dim=0, dtype=torch.float64)
            if work == torch.float64 and not yk.is_cuda:
                self.gram[k].addmm_(yk.T, yk)  # in place into the float64 total
            else:
                self.gram[k] += _gram(yk).to(torch.float64)
            self.unit_sum[k] += wk @ yk.to(torch.float64) + wk.sum() * self.shift
            self.n_nonzero[k] += nonzero[start : start + c].sum()
            self.counts[k] += c
            start += c

    def _moments_about(self, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, Gram) per fold re-expressed about another shift s': with d = s - s' and
        y' = y + d, sum y' = S + N d and sum y' y'^T = G + d S^T + S d^T + N d d^T (exact algebra)."""
        if self.shift is None:
            return self.sum.clone(), self.gram.clone()
        d = self.shift - shift.to(self.shift)
        n = torch.as_tensor(self.counts, dtype=torch.float64, device=self.sum.device)  # (K,)
        s_new = self.sum + n[:, None] * d
        g_new = (
            self.gram
            + d[None, :, None] * self.sum[:, None, :]
            + self.sum[:, :, None] * d[None, None, :]
            + n[:, None, None] * torch.outer(d, d)
        )
        return s_new, g_new

    def merge(self, other: MomentAccumulator) -> MomentAccumulator:
        """Add another accumulator's rows to this one, fold by fold (in place; returns self)."""
        if other.dim != self.dim or other.folds != self.folds:
            raise ValueError(f"cannot merge accumulators of dimension/folds {self.dim}/{self.folds} and {other.dim}/{other.folds}.")
        if other.n == 0:
            return self
        assert other.shift is not None  # set by the first row it saw
        if self.shift is None:
            self.shift = other.shift.to(self.device).clone()
        s, g = other._moments_about(self.shift.to(other.device))
        self.sum += s.to(self.device)
        self.gram += g.to(self.device)
        self.unit_sum += other.unit_sum.to(self.device)
        self.n_nonzero += other.n_nonzero.to(self.device)
        self.counts += other.counts
        return self

    def all_reduce(self, group=None) -> MomentAccumulator:
        """Sum this accumulator over all ranks of a torch.distributed process group (in place).

        Every rank re-expresses its moments about the shift of the lowest rank that saw rows, then
        the totals are all-reduced: afterwards every rank holds the accumulator of all ranks' rows.
        """
        import torch.distributed as dist

        f64, dev = torch.float64, self.device
        world = dist.get_world_size(group)
        counts = [torch.zeros(self.groups, dtype=f64, device=dev) for _ in range(world)]
        dist.all_gather(counts, torch.as_tensor(self.counts, dtype=f64, device=dev), group=group)
        owners = [i for i, c in enumerate(counts) if c.sum().item() > 0]
        if not owners:
            return self
        src = owners[0] if group is None else dist.get_global_rank(group, owners[0])
        shift = self.shift.clone() if self.shift is not None else torch.zeros(self.dim, dtype=f64, device=dev)
        dist.broadcast(shift, src=src, group=group)
        self.sum, self.gram = self._moments_about(shift)
        self.shift = shift
        for total in (self.sum, self.gram, self.unit_sum, self.n_nonzero):
            dist.all_reduce(total, group=group)
        self.counts = np.rint(torch.stack(counts).sum(0).cpu().numpy()).astype(np.int64)
        return self

    def _moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-group (N, sum, Gram, unit sum, non-zero count) as float64 numpy arrays on the host."""
        return (
            self.counts.astype(np.float64),
            self.sum.cpu().numpy(),
            self.gram.cpu().numpy(),
            self.unit_sum.cpu().numpy(),
            self.n_nonzero.cpu().numpy(),
        )

    def _matrices(self, n, s, g, u, nz) -> spectral.MomentMatrices:
        shift = self.shift.cpu().numpy() if self.shift is not None else np.zeros(self.dim)
        return spectral.moment_matrices(
            n_samples=int(round(n)), shift=shift, shifted_sum=s, shifted_gram=g, unit_sum=u, n_nonzero=int(round(nz))
        )

    def moment_matrices(self, replicates: bool = True) -> list[spectral.MomentMatrices]:
        """The matrices of all rows seen, then (with `replicates` and folds > 1), for each fold k,
        those of all rows but fold k's: the totals less fold k's moments (all groups share one
        shift, so this is exact algebra). `spectra_of` turns them into spectra, on the host or in
        one batch on a device."""
        per_group = self._moments()
        totals = [m.sum(axis=0) for m in per_group]
        out = [self._matrices(*totals)]
        if replicates and self.folds > 1:
            out += [self._matrices(*(t - m[k] for t, m in zip(totals, per_group))) for k in range(self.folds)]
        return out

    def spectra(self) -> spectral.Spectra:
        """The spectra of all rows seen (float64 numpy eigenvalues on the host)."""
        return spectra_of(self.moment_matrices(replicates=False))[0]

    def jackknife_spectra(self) -> list[spectral.Spectra]:
        """For each fold k, the spectra of all rows but fold k's (empty when folds == 1)."""
        return spectra_of(self.moment_matrices()[1:])


Eigensolver = Literal["auto", "numpy", "torch"]


def eigensolver_for(solver: Eigensolver, device: torch.device | str) -> Literal["numpy", "torch"]:
    """The eigensolver that `solver` means on `device`: "auto" is torch's on a CUDA device (the
    matrices go to the GPU, which does a batch of them in one call while the host's LAPACK does
    one at a time: 88 per probe, 528 with the jackknife's five folds) and numpy's elsewhere."""
    if solver not in ("auto", "numpy", "torch"):
        raise ValueError(f"eigensolver must be 'auto', 'numpy' or 'torch', got {solver!r}.")
    if solver == "auto":
        return "torch" if torch.device(device).type == "cuda" else "numpy"
    return solver


def spectra_of(
    matrices: Sequence[spectral.MomentMatrices], solver: Literal["numpy", "torch"] = "numpy", device: torch.device | str = "cpu"
) -> list[spectral.Spectra]:
    """The spectra of each of `matrices` (`MomentMatrices`), their eigenvalues in float64 from:

      numpy  numpy's eigvalsh, one matrix at a time on the host (what `spectral.spectra_from_moments` does)
      torch  torch.linalg.eigvalsh on `device`, every matrix of one shape in one stacked call

    Both read each matrix's lower triangle, in float64: the observables' round-off floors (1e3 eps
    of the largest eigenvalue) and the spectral flatness of a LayerNorm output, whose null direction
    float32 reads as 1e-7 lambda_1, need it. Both give the same observables to round-off
    (tests/test_probe.py runs both on the CPU). The formulas before and after the eigenvalues are
    `tgo.spectral`'s (`moment_matrices`, `spectra_from_eigenvalues`), the same for both."""
    problems = [p for m in matrices for p in m.eigenproblems()]
    values = [np.linalg.eigvalsh(p) for p in problems] if solver == "numpy" else batched_eigvalsh(problems, device)
    it = iter(values)
    return [spectral.spectra_from_eigenvalues(m, [next(it) for _ in m.eigenproblems()]) for m in matrices]


def batched_eigvalsh(matrices: Sequence[np.ndarray], device: torch.device | str) -> list[np.ndarray]:
    """The eigenvalues (float64, ascending) of each symmetric matrix, from its lower triangle:
    matrices of one shape are stacked and sent to `device` together, decomposed by one
    torch.linalg.eigvalsh call, and only their eigenvalues come back."""
    out: list[np.ndarray] = [np.zeros(0)] * len(matrices)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(m.shape, []).append(i)
    for indices in by_shape.values():
        stack = torch.from_numpy(np.stack([matrices[i] for i in indices])).to(device, torch.float64)
        values = torch.linalg.eigvalsh(stack).cpu().numpy()
        for i, v in zip(indices, values):
            out[i] = v
    return out


class FoldSums:
    """Per-fold sums of one value per image, and the images per fold: the streaming state of a mean
    over the probe images and of its delete-one-fold jackknife replicates (the probe's token
    interaction). K + 1 bins whatever K: bins 0..K-1 are the folds, bin K the images kept in every
    replicate (`tgo.uncertainty.fold_ids`); with K = 1 every image is in bin 0.

        value          v   = sum_i v_i / N
        replicate k    v_k = (sum_i v_i - sum_{i in fold k} v_i) / (N - N_k),   k = 0..K-1

    (a denominator of 0 counts as 1). Memory O(K); `all_reduce` sums the bins over ranks.
    """

    def __init__(self, folds: int = 1, device: torch.device | str = "cpu") -> None:
        if int(folds) < 1:
            raise ValueError(f"folds must be at least 1, got {folds}.")
        self.folds = int(folds)
        device = torch.device(device)
        self.sum = torch.zeros(self.folds + 1, dtype=torch.float64, device=device)  # (K + 1,) each bin's sum of values
        self.images = torch.zeros(self.folds + 1, dtype=torch.float64, device=device)  # (K + 1,) N_k, float64 as the sums

    @torch.no_grad()
    def update(self, values: torch.Tensor, folds: torch.Tensor) -> None:
        """Add one value per image: values (B,) and each image's bin, folds (B,) int64 in 0..K
        (on this accumulator's device; not checked, so that no batch waits on the device)."""
        if values.shape != folds.shape or values.ndim != 1:
            raise ValueError(f"expected values and folds of one shape (B,), got {tuple(values.shape)} and {tuple(folds.shape)}.")
        self.sum.index_add_(0, folds, values.to(self.sum))
        self.images.index_add_(0, folds, torch.ones_like(folds, dtype=torch.float64))

    def all_reduce(self, group=None) -> FoldSums:
        """Sum the bins over all ranks of a torch.distributed process group (in place)."""
        import torch.distributed as dist

        dist.all_reduce(self.sum, group=group)
        dist.all_reduce(self.images, group=group)
        return self

    def value(self) -> float:
        """The mean over every image seen, sum_i v_i / N (0 before any image)."""
        return float(self.sum.sum() / self.images.sum().clamp(min=1))

    def replicates(self) -> np.ndarray | None:
        """(K,) float64: the mean without fold k, (total - fold k) / (images - images of fold k),
        for each fold; None when folds == 1 (no jackknife)."""
        if self.folds == 1:
            return None
        k = self.folds
        return ((self.sum.sum() - self.sum[:k]) / (self.images.sum() - self.images[:k]).clamp(min=1)).cpu().numpy()


def _tf32_matmuls() -> bool:
    """Whether float32 matmuls on CUDA may run in TF32 under the process's current settings: torch's
    `torch.backends.cuda.matmul.fp32_precision == "tf32"` where it exists (recent torch; it also
    reflects the legacy flag, `torch.set_float32_matmul_precision` and an inherited
    `torch.backends.fp32_precision`, and reading it never raises where the legacy flag's getter
    does after the new API was used), else the legacy `torch.backends.cuda.matmul.allow_tf32`.
    Only read, never written."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:  # older torch: the legacy flag only
        return bool(matmul.allow_tf32)
    return precision == "tf32"


def _gram(y: torch.Tensor) -> torch.Tensor:
    """y^T y for y of shape (n, D), never in TF32: its 10-bit mantissa would cost the covariance
    three decimal digits. Where the process enables TF32 matmuls on CUDA (`_tf32_matmuls`), a float32
    y is promoted and the product formed in float64 instead, rather than switching TF32 off around
    the product: that would change a setting the rest of the process (the training around the
    probe, other threads) relies on, and race with them. The float64 product is exact per term (a
    product of two float32 numbers fits a float64 mantissa) and at least as accurate as the IEEE
    float32 one it replaces. The cost: an (n, D) float64 copy of the batch and n D^2 float64
    multiply-adds, within a factor 2 of float32 on data-centre GPUs (A100, H100) but 32-64 times
    slower on consumer ones; `precision="float64"` (the default) pays it anyway."""
    if y.is_cuda and y.dtype == torch.float32 and _tf32_matmuls():
        y = y.to(torch.float64)
    return y.T @ y
