"""Weight spectra (TGO-II): the singular values of every weight matrix of a timm ViT, with their
stable rank, effective rank and WeightWatcher's power-law exponent alpha.

Matrices, named <site>/<kind> as the probe names sites: patch_embed/patch_embed (the patch
projection, a convolution), block_XX/<kind> for each linear layer of a block's attention and MLP,
named as timm names it, and final/head (the classifier). The kinds: qkv and proj (attention; EVA's
unfused attention has q_proj, k_proj, v_proj instead of qkv), fc1 and fc2 (MLP; EVA's SwiGLU has
fc1_g, the gate, and fc1_x in place of fc1). Each is one matrix as the model holds it, as
WeightWatcher sees it: EVA's q, k and v are three matrices, not stacked into a qkv that is not
there. For a weight W (out x in; a convolution as out x in*k*k):

    sigma_i            singular values of W, in decreasing order
    stable_rank        sum_i sigma_i^2 / sigma_1^2           (= ||W||_F^2 / ||W||_2^2, as WeightWatcher's)
    effective_rank     exp(H(p)), p_i = sigma_i / sum_j sigma_j   (Roy and Vetterli 2007; tgo.spectral)
    alpha              the exponent of a power law fitted to the tail of the empirical spectral
                       density of W^T W, xmin chosen by the Kolmogorov-Smirnov distance (Martin and
                       Mahoney 2021, "Implicit self-regularization in deep neural networks", JMLR 22),
                       computed by the `weightwatcher` package itself (its conventions for
                       convolutions and its fit), not re-implemented here.

Metric keys: weights/<kind>/<site>/<observable>, e.g. weights/qkv/block_03/alpha.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from tgo import spectral
from tgo.keys import weight_key

BLOCK_KINDS: tuple[str, ...] = ("qkv", "q_proj", "k_proj", "v_proj", "proj", "fc1", "fc1_g", "fc1_x", "fc2")
KINDS: tuple[str, ...] = ("patch_embed", *BLOCK_KINDS, "head")
OBSERVABLES: tuple[str, ...] = ("alpha", "stable_rank", "effective_rank")
_PARAMETER = re.compile(rf"(?:blocks\.(\d+)\.(?:attn|mlp)\.({'|'.join(BLOCK_KINDS)})|(patch_embed)\.proj|(head))\.weight")


def matrix_name(parameter: str) -> str | None:
    """ "blocks.3.attn.qkv.weight" -> "block_03/qkv", "blocks.0.attn.q_proj.weight" -> "block_00/q_proj";
    None for parameters that are not tracked."""
    match = _PARAMETER.fullmatch(parameter)
    if not match:
        return None
    block, kind, patch, head = match.groups()
    if patch:
        return "patch_embed/patch_embed"
    if head:
        return "final/head"
    return f"block_{int(block):02d}/{kind}"


def matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tracked weight matrices of a timm ViT, {<site>/<kind>: W (out, in)}, in forward order."""
    out = {}
    for parameter, weight in model.named_parameters():
        name = matrix_name(parameter)
        if name is not None and weight.ndim >= 2:
            out[name] = weight.detach().reshape(weight.shape[0], -1)  # a convolution: out x (in k k)
    return out


def metric_key(name: str, observable: str) -> str:
    site, kind = name.split("/")
    return weight_key(kind, site, observable)


def matrix_observables(singular_values: np.ndarray) -> dict[str, float]:
    """Stable rank and effective rank of a matrix with these singular values."""
    s = np.asarray(singular_values, dtype=np.float64)
    return {"stable_rank": spectral.stable_rank(s**2), "effective_rank": spectral.effective_rank(s)}


def weightwatcher_alphas(model: torch.nn.Module) -> dict[str, float]:
    """WeightWatcher's alpha of each tracked matrix ({<site>/<kind>: alpha}; NaN where its fit
    failed), from weightwatcher.WeightWatcher(model).analyze()."""
    with contextlib.redirect_stdout(io.StringIO()):  # its import prints which SVD backend it found
        import weightwatcher

    quiet = logging.getLogger("weightwatcher")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs every layer it reads
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it prints fit notes ("SMALL N PL FIT")
            warnings.simplefilter("ignore")
            details = weightwatcher.WeightWatcher(model=model).analyze(plot=False, randomize=False, mp_fit=False)
    finally:
        quiet.setLevel(level)
    out = {}
    for row in details.itertuples():
        name = matrix_name(f"{row.longname}.weight")
        if name is not None:
            out[name] = float(row.alpha) if np.isfinite(row.alpha) and row.alpha > 0 else float("nan")
    return out


@dataclass
class WeightSpectra:
    singular_values: dict[str, np.ndarray]  # <site>/<kind> -> sigma, decreasing
    observables: dict[str, dict[str, float]]  # <site>/<kind> -> {alpha, stable_rank, effective_rank}

    def metrics(self) -> dict[str, float]:
        """The MLflow metrics; a value that could not be measured (WeightWatcher's alpha where its
        fit fails, as for a small head) is left out rather than logged as NaN."""
        return {metric_key(name, o): value for name, obs in self.observables.items() for o, value in obs.items() if np.isfinite(value)}

    def save(self, path) -> None:
        # allow_pickle: numpy's default, named so that no array's key is taken for it
        np.savez_compressed(path, allow_pickle=True, **{name.replace("/", "__"): s for name, s in self.singular_values.items()})


def singular_values(weights: dict[str, torch.Tensor], batched: bool = False) -> dict[str, np.ndarray]:
    """The singular values (float64, decreasing) of each matrix, {name: sigma}.

    batched=False: each matrix copied to the host in float64 and decomposed there, one at a time
    (the CPU's path). batched=True: the matrices stay where they are (the GPU, during training),
    those of one shape are stacked (ViT-S: 12 each of qkv, proj, fc1 and fc2) and decomposed by one
    torch.linalg.svdvals call in float64, and only the singular values come to the host: no copy
    of the weights, no host LAPACK time taken from the cores that feed the data loaders, and 6
    calls instead of 50. Both are SVDs in float64: the same values to round-off
    (tests/test_weights.py runs both on the CPU)."""
    if not batched:
        return {name: torch.linalg.svdvals(w.to("cpu", torch.float64)).numpy() for name, w in weights.items()}
    by_shape: dict[tuple[tuple[int, ...], torch.device], list[str]] = {}
    for name, w in weights.items():
        by_shape.setdefault((tuple(w.shape), w.device), []).append(name)
    values: dict[str, np.ndarray] = {}
    for names in by_shape.values():
        stack = torch.stack([weights[name].to(torch.float64) for name in names])
        for name, s in zip(names, torch.linalg.svdvals(stack).cpu().numpy()):
            values[name] = s
    return {name: values[name] for name in weights}  # forward order


def weight_spectra(model: torch.nn.Module, batched: bool | None = None) -> WeightSpectra:
    """Singular values (float64), stable rank, effective rank and alpha of every tracked matrix.

    batched: `singular_values`' choice; None (default) batches on the device where the weights are
    on a GPU and decomposes on the host where they are on the CPU."""
    alphas = weightwatcher_alphas(model)
    mats = matrices(model)
    if batched is None:
        batched = any(w.is_cuda for w in mats.values())
    values = singular_values(mats, batched)
    observables = {name: {"alpha": alphas.get(name, float("nan")), **matrix_observables(s)} for name, s in values.items()}
    return WeightSpectra(values, observables)
