"""Streaming, mergeable moment accumulator: the stateful half of the geometry probe.

It keeps, on the model's device, what every observable of METRICS.md needs from a stream of rows
x_i (D features): the count N, the sum and Gram matrix of the rows about a fixed shift s (the first
row seen), and the sum and count of the unit-normalised non-zero rows (cosine anisotropy). Memory is
O(D^2) whatever the number of rows. The spectra and observables are then computed once, in float64,
by the pure functions of `tgo.spectral` (the functional core); this class only feeds them.

Precision. The totals are float64. Shifting by a row of the data first removes the mean before any
product is formed, so the covariance C = (G - S S^T / N) / (N - 1) suffers no cancellation. Each
batch's Gram matrix is computed in float64 (`precision="float64"`, the default, as METRICS.md asks)
or in float32 on the shifted rows and added to the float64 total (`precision="float32"`, cheaper on
a CPU). float32 holds the leading eigenvalues to 1e-6 relative and the spectral flatness to 1e-4
against a float64 batch computation on ViT activations (tests/test_probe.py, benchmarks/probe.py),
except where the representation has an exactly null direction: a LayerNorm output (the `final`
site) lies in a hyperplane, and float32 products read its zero eigenvalue as about 1e-7 lambda_1
instead of 0, which moves spectral_flatness (floored at 1e-12 lambda_1) by tens of percent. TF32 is
never used for these products.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from tgo import spectral

Precision = Literal["float32", "float64"]


class MomentAccumulator:
    """Sufficient statistics of a stream of D-dimensional rows; `update`, `merge`, `all_reduce`.

    Merging two accumulators (batches, workers, DDP ranks) equals accumulating all their rows in one,
    within float64 round-off: the other's moments are re-expressed about this one's shift exactly.
    """

    def __init__(
        self,
        dim: int,
        device: torch.device | str = "cpu",
        precision: Precision = "float64",
    ) -> None:
        if precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}.")
        self.dim = int(dim)
        self.device = torch.device(device)
        self.precision: Precision = precision
        f64 = dict(dtype=torch.float64, device=self.device)
        self.n = 0
        self.shift: torch.Tensor | None = None  # (D,) float64, the first row seen
        self.sum = torch.zeros(self.dim, **f64)  # (D,)   sum (x_i - s)
        self.gram = torch.zeros(self.dim, self.dim, **f64)  # (D, D) sum (x_i - s)(x_i - s)^T
        self.unit_sum = torch.zeros(self.dim, **f64)  # (D,) sum x_i / ||x_i|| over non-zero rows
        self.n_nonzero = torch.zeros((), **f64)  # kept as a tensor: no device sync per batch

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        """Add a batch of rows, shape (n, D) (any float dtype; promoted as the precision says)."""
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (n, {self.dim}), got {tuple(rows.shape)}.")
        if rows.shape[0] == 0:
            return
        rows = rows.to(self.device)
        if self.shift is None:
            self.shift = rows[0].detach().to(torch.float64).clone()
        work = torch.float64 if self.precision == "float64" else torch.float32
        # (n, D) about the shift, subtracted in the finer of the rows' and the work precision:
        # small, so the products below lose nothing to cancellation.
        sub = torch.promote_types(rows.dtype, work)
        y = (rows.to(sub) - self.shift.to(sub)).to(work)
        self.sum += y.sum(dim=0, dtype=torch.float64)
        self.gram += _gram(y).to(torch.float64)
        x = rows.to(work)
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # (n, 1)
        nonzero = norms > 0
        self.unit_sum += torch.where(nonzero, x / norms.clamp_min(1e-30), 0).sum(0, dtype=torch.float64)
        self.n_nonzero += nonzero.sum()
        self.n += rows.shape[0]

    def _moments_about(self, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, Gram) re-expressed about another shift s': with d = s - s' and y' = y + d,
        sum y' = S + N d and sum y' y'^T = G + d S^T + S d^T + N d d^T (exact algebra)."""
        if self.shift is None:
            return self.sum.clone(), self.gram.clone()
        d = self.shift - shift.to(self.shift)
        s_new = self.sum + self.n * d
        g_new = self.gram + torch.outer(d, self.sum) + torch.outer(self.sum, d) + self.n * torch.outer(d, d)
        return s_new, g_new

    def merge(self, other: "MomentAccumulator") -> "MomentAccumulator":
        """Add another accumulator's rows to this one (in place; returns self)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge accumulators of dimension {self.dim} and {other.dim}.")
        if other.n == 0:
            return self
        if self.shift is None:
            self.shift = other.shift.to(self.device).clone()
        s, g = other._moments_about(self.shift.to(other.device))
        self.sum += s.to(self.device)
        self.gram += g.to(self.device)
        self.unit_sum += other.unit_sum.to(self.device)
        self.n_nonzero += other.n_nonzero.to(self.device)
        self.n += other.n
        return self

    def all_reduce(self, group=None) -> "MomentAccumulator":
        """Sum this accumulator over all ranks of a torch.distributed process group (in place).

        Every rank re-expresses its moments about the shift of the lowest rank that saw rows, then
        the totals are all-reduced: afterwards every rank holds the accumulator of all ranks' rows.
        """
        import torch.distributed as dist

        f64 = dict(dtype=torch.float64, device=self.device)
        world = dist.get_world_size(group)
        counts = [torch.zeros(1, **f64) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([float(self.n)], **f64), group=group)
        owners = [i for i, c in enumerate(counts) if c.item() > 0]
        if not owners:
            return self
        src = owners[0] if group is None else dist.get_global_rank(group, owners[0])
        shift = self.shift.clone() if self.shift is not None else torch.zeros(self.dim, **f64)
        dist.broadcast(shift, src=src, group=group)
        self.sum, self.gram = self._moments_about(shift)
        self.shift = shift
        for total in (self.sum, self.gram, self.unit_sum, self.n_nonzero):
            dist.all_reduce(total, group=group)
        self.n = int(round(sum(c.item() for c in counts)))
        return self

    def spectra(self) -> spectral.Spectra:
        """The spectra of all rows seen (float64 numpy, via `tgo.spectral.spectra_from_moments`)."""
        shift = self.shift if self.shift is not None else torch.zeros(self.dim, dtype=torch.float64)
        return spectral.spectra_from_moments(
            n_samples=self.n,
            shift=shift.cpu().numpy(),
            shifted_sum=self.sum.cpu().numpy(),
            shifted_gram=self.gram.cpu().numpy(),
            unit_sum=self.unit_sum.cpu().numpy(),
            n_nonzero=int(round(self.n_nonzero.item())),
        )


def _gram(y: torch.Tensor) -> torch.Tensor:
    """y^T y for y of shape (n, D), with TF32 off on CUDA (its 10-bit mantissa would cost the
    covariance three decimal digits)."""
    if y.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return y.T @ y
        finally:
            torch.backends.cuda.matmul.allow_tf32 = True
    return y.T @ y

