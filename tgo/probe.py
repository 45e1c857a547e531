"""The geometry probe: one no-grad pass of a timm VisionTransformer over a probe loader, filling one
streaming accumulator per site and token view, then the spectra and observables of each.

Any timm model of the ViT token layout is probed alike, whichever module defines it (ViTs and
DeiTs, DINOv2's models with register tokens, EVA and EVA-02): `tgo.model` says what the layout is
and checks a model for it.

Sites (forward order, docs/METRICS.md), and the norm each is taken after:
  patch_embed  output of `model.patch_embed` (the patch projection, and its `norm` if the model has
               one; patch tokens only, so no `cls` view)
  pos_embed    output of `model._pos_embed`: class/register tokens prepended and the position
               embedding added, before `norm_pre` (identity in ViT-S/16); EVA's also returns its
               rotary embedding, which the blocks take and the site leaves out
  block_00 ..  output of each transformer block: the residual stream, *no* norm applied
  final        output of `model.norm`, the final LayerNorm; its `cls` view is what feeds the head.
               In a model pooled by average (timm's `global_pool="avg"`, e.g. the `_gap` models,
               where timm moves the final norm after pooling, to `fc_norm`), `model.norm` is the
               identity and the `mean` view of `final` is what feeds the head instead:
               `model.forward_head(tokens, pre_logits=True)`, fc_norm of the pooled patch tokens.
               `head_view(model)` names the view; TGO-I's finding 5 is judged there.
Views: `cls` (the class token, N rows; none in a model without one, even if it has registers),
`patch` (every patch token of every image, N x T rows, register tokens excluded) and `mean`
(per-image mean of the patch tokens, N rows).

Uncertainty: the probe images are split into K folds (`tgo.uncertainty.fold_ids`, fixed by the probe
seed and each image's place in the probe set; a `ProbeSet` loader yields each image's fold) and the
accumulators keep one set of moments per fold, so every observable also gets its delete-one-fold
jackknife replicates and standard error at no extra pass (`SiteViewGeometry.replicates`, `.stderr`).
Definitions of every observable: docs/METRICS.md.

The forward is timm's own: `forward_intermediates(..., output_fmt="NLC", return_prefix_tokens=True)`
gives the block outputs and the final-normed tokens; a forward hook on `model.patch_embed` gives its
output, from which `model._pos_embed` gives the pos_embed site (a concat and an add, no re-run of the
patch projection).

`probe_model` runs the probe with a `TrainConfig`'s probe settings, as training does every epoch
and the analysis does when it re-probes saved weights.
"""

from __future__ import annotations

import contextlib
import random
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from tgo import keys, spectral, uncertainty
from tgo.accumulate import Eigensolver, FoldSums, MomentAccumulator, Precision, eigensolver_for, spectra_of
from tgo.alarms import Observation
from tgo.errors import ArtifactError
from tgo.keys import SE_PREFIX, VIEWS, metric_key
from tgo.model import pooling_gap, probe_gaps

if TYPE_CHECKING:
    from tgo.config import TrainConfig


class _ViT(Protocol):
    """What the probe uses of a timm VisionTransformer (`_check_model` checks for it). torch types
    every attribute of an nn.Module it does not declare as Tensor | Module, so the probe reads these
    through this view of the model."""

    patch_embed: torch.nn.Module
    blocks: torch.nn.Sequential | torch.nn.ModuleList  # EVA's is a ModuleList
    embed_dim: int
    num_prefix_tokens: int  # the class token (if any) first, then the registers

    # the tokens with the prefix tokens prepended; EVA's: (those tokens, its rotary embedding)
    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]: ...

    # with return_prefix_tokens=True: the final-normed tokens, and per block (spatial, prefix) tokens
    # (bare spatial tokens in a model without prefix tokens; `_pairs`)
    def forward_intermediates(
        self, x: torch.Tensor, *, output_fmt: str, return_prefix_tokens: bool
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor] | torch.Tensor]]: ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...


def _vit(model: torch.nn.Module) -> _ViT:
    """`model` as the timm VisionTransformer it is (a static view: nothing is checked or converted)."""
    return cast(_ViT, model)


def site_names(model: torch.nn.Module) -> list[str]:
    """The probe's sites for this model, in forward order: patch_embed, pos_embed, block_XX, final."""
    return keys.site_names(len(_vit(model).blocks))


def head_view(model: torch.nn.Module) -> tuple[str, str]:
    """The (site, view) that feeds the classifier head: ("final", "cls") for a class-token model,
    ("final", "mean") for one pooled by average (timm's global_pool="avg")."""
    return keys.POOLED_HEAD_VIEW if getattr(model, "global_pool", "token") == "avg" else keys.HEAD_VIEW


@dataclass
class SiteViewGeometry:
    """The geometry of one site and view: spectra (float64), observables, sample count."""

    site: str
    view: str
    eigenvalues: np.ndarray  # lambda of the covariance, decreasing, length r = min(D, N - 1)
    singular_values: np.ndarray  # sigma of the centered matrix Xc = sqrt((N - 1) lambda)
    uncentered_singular_values: np.ndarray  # of X, for RankMe
    observables: dict[str, float]
    n_samples: int
    degenerate: bool = False
    covariance: np.ndarray | None = None  # C (D x D), only where probe(keep_covariance=...) asked
    # (K, n_observables): observable k without fold k, columns in spectral.OBSERVABLE_NAMES order;
    # None when the probe ran without folds (K = 1) or the result predates them.
    replicates: np.ndarray | None = None

    @property
    def stderr(self) -> dict[str, float]:
        """Jackknife standard error of each observable (NaN without replicates)."""
        if self.replicates is None:
            return {name: float("nan") for name in self.observables}
        se = np.asarray(uncertainty.jackknife_se(self.replicates, axis=0))  # (n_observables,): replicates are 2-d
        return dict(zip(spectral.OBSERVABLE_NAMES, map(float, se)))


@dataclass
class FeatureRows:
    """Which image each row of the kept features is: its place in the probe set (so that two epochs
    or two runs probed on the same set can be lined up image by image) and its jackknife fold
    (`tgo.uncertainty.fold_ids`; K for the images kept in every replicate)."""

    position: np.ndarray  # (N,) int64
    fold: np.ndarray  # (N,) int64, 0..folds (folds: in every replicate)
    folds: int  # K, the probe's folds (1: no jackknife)


@dataclass
class ProbeResult:
    """Per site and view geometry of one probe pass; `metrics()` gives the MLflow keys."""

    geometry: dict[tuple[str, str], SiteViewGeometry] = field(default_factory=dict)
    head: tuple[str, str] = keys.HEAD_VIEW  # the view that feeds the classifier head
    token_interaction: dict[str, float] = field(default_factory=dict)  # site -> mean cosine of its distinct patch tokens
    # site -> (K,) token interaction without fold k (None: no folds), for its jackknife standard error
    token_interaction_replicates: dict[str, np.ndarray] = field(default_factory=dict)
    features: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (site, cls|mean) -> (N, D) float16, keep_features
    # keep_features: for each feature row, the image's place in the probe set and its jackknife fold
    feature_rows: FeatureRows | None = None

    def save_features(self, path: str | Path) -> Path:
        """The kept per-image features, "<site>/<view>" -> (N, D) float16, rows in the order the probe
        saw the images (the probe set's order; rank after rank under torchrun), in one .npz, with
        "_position" (each row's place in the probe set), "_fold" (its jackknife fold) and "_folds" (K)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"{site}/{view}": x for (site, view), x in self.features.items()}
        if self.feature_rows is not None:
            rows = self.feature_rows
            arrays |= {"_position": rows.position, "_fold": rows.fold, "_folds": np.array(rows.folds)}
        with open(path, "wb") as fh:
            np.savez_compressed(fh, allow_pickle=True, **arrays)  # numpy's default, named so that no array's key is taken for it
        return path

    @staticmethod
    def load_features(path: str | Path) -> dict[tuple[str, str], np.ndarray]:
        """The features a `save_features` file holds, (site, view) -> (N, D) float16."""
        with _npz(path) as data:
            return {tuple(k.split("/")): data[k] for k in data.files if "/" in k}

    @staticmethod
    def load_feature_rows(path: str | Path) -> FeatureRows | None:
        """Each feature row's place in the probe set and fold (None for files saved without them)."""
        with _npz(path) as data:
            if "_position" not in data.files:
                return None
            return FeatureRows(data["_position"], data["_fold"], int(data["_folds"]))

    def __getitem__(self, site_view: tuple[str, str]) -> SiteViewGeometry:
        return self.geometry[site_view]

    def __iter__(self):
        return iter(self.geometry.values())

    def __len__(self) -> int:
        return len(self.geometry)

    @property
    def sites(self) -> list[str]:
        return list(dict.fromkeys(site for site, _ in self.geometry))

    def metrics(self) -> dict[str, float]:
        """{"geom/<site>/<view>/<name>": value} for every site, view and observable."""
        return {metric_key(g.site, g.view, name): float(value) for g in self.geometry.values() for name, value in g.observables.items()}

    def token_interaction_metrics(self) -> dict[str, float]:
        """{"tokens/<site>/mean_cosine": value}: each site's token interaction."""
        return {keys.token_key(site): value for site, value in self.token_interaction.items()}

    def stderr_metrics(self) -> dict[str, float]:
        """{"geom_se/<site>/<view>/<name>": se} for the view that feeds the head (the one TGO-I's
        findings single out), so the MLflow UI shows them beside the estimates without doubling
        the number of metrics. Empty without folds."""
        g = self.geometry.get(self.head)
        if g is None or g.replicates is None:
            return {}
        return {metric_key(g.site, g.view, name, SE_PREFIX): se for name, se in g.stderr.items()}

    def observations(self, epoch: int = -1) -> dict[tuple[str, str, str], Observation]:
        """(site, view, name) -> the observable's value, jackknife standard error and folds K, at every
        site and view (what alarm rules test, `tgo.alarms`); K = 1 without folds. Views without
        variance (`degenerate`, e.g. the class token before the first block, the same for every
        image) have no geometry to watch and are left out."""
        out = {}
        for g in self.geometry.values():
            if g.degenerate:
                continue
            folds = g.replicates.shape[0] if g.replicates is not None else 1
            se = g.stderr
            for name, value in g.observables.items():
                out[(g.site, g.view, name)] = Observation(float(value), se.get(name, float("nan")), folds, epoch)
        return out

    def degenerate(self) -> list[str]:
        """The "<site>/<view>" pairs whose representation had no variance."""
        return [f"{g.site}/{g.view}" for g in self.geometry.values() if g.degenerate]

    def save(self, path: str | Path) -> Path:
        """Write every spectrum and observable to one compressed .npz file.

        Arrays are keyed "<site>/<view>/<field>" with fields eigenvalues, singular_values,
        uncentered_singular_values, observables (in `spectral.OBSERVABLE_NAMES` order), n_samples,
        degenerate, and where the probe had folds `replicates` (K x observables, each observable
        without fold k) and `stderr` (their jackknife standard error); "observable_names" lists the
        observable order and "head_view" names the site/view that feeds the head;
        "token_similarity/<site>" holds each site's token interaction and, where the probe had folds,
        "token_similarity_replicates/<site>" its K leave-one-fold-out values.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "observable_names": np.array(spectral.OBSERVABLE_NAMES),
            "head_view": np.array("/".join(self.head)),
        }
        for g in self.geometry.values():
            key = f"{g.site}/{g.view}"
            arrays[f"{key}/eigenvalues"] = g.eigenvalues
            arrays[f"{key}/singular_values"] = g.singular_values
            arrays[f"{key}/uncentered_singular_values"] = g.uncentered_singular_values
            arrays[f"{key}/observables"] = np.array([g.observables[n] for n in spectral.OBSERVABLE_NAMES])
            arrays[f"{key}/n_samples"] = np.array(g.n_samples)
            arrays[f"{key}/degenerate"] = np.array(g.degenerate)
            if g.replicates is not None:
                arrays[f"{key}/replicates"] = g.replicates
                arrays[f"{key}/stderr"] = np.asarray(uncertainty.jackknife_se(g.replicates, axis=0))  # OBSERVABLE_NAMES order
        for site, value in self.token_interaction.items():
            arrays[f"{keys.TOKEN_FILE_KEY}/{site}"] = np.array(value)
        for site, reps in self.token_interaction_replicates.items():
            arrays[f"{keys.TOKEN_FILE_KEY}_replicates/{site}"] = reps
        with open(path, "wb") as fh:
            np.savez_compressed(fh, allow_pickle=True, **arrays)  # numpy's default, named so that no array's key is taken for it
        return path

    @classmethod
    def load(cls, path: str | Path) -> ProbeResult:
        """Read a file written by `save` (no pickles: allow_pickle=False)."""
        with _npz(path) as data:
            names = [str(n) for n in data["observable_names"]]
            head = keys.parse_head(str(data["head_view"])) if "head_view" in data.files else keys.HEAD_VIEW
            pairs = dict.fromkeys(tuple(k.split("/")[:2]) for k in data.files if k.count("/") == 2)
            geometry = {}
            for site, view in pairs:
                key = f"{site}/{view}"
                replicates = None
                if f"{key}/replicates" in data.files:
                    # Columns by name, so files written before an observable was added still load.
                    stored = dict(zip(names, data[f"{key}/replicates"].T))
                    replicates = np.stack(
                        [stored.get(n, np.full(len(data[f"{key}/replicates"]), np.nan)) for n in spectral.OBSERVABLE_NAMES], axis=1
                    )
                geometry[(site, view)] = SiteViewGeometry(
                    site=site,
                    view=view,
                    eigenvalues=data[f"{key}/eigenvalues"],
                    singular_values=data[f"{key}/singular_values"],
                    uncentered_singular_values=data[f"{key}/uncentered_singular_values"],
                    observables=dict(zip(names, map(float, data[f"{key}/observables"]))),
                    n_samples=int(data[f"{key}/n_samples"]),
                    degenerate=bool(data[f"{key}/degenerate"]),
                    replicates=replicates,
                )
            tokens = {k.split("/", 1)[1]: float(data[k]) for k in data.files if k.startswith(f"{keys.TOKEN_FILE_KEY}/")}
            token_reps = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{keys.TOKEN_FILE_KEY}_replicates/")}
        return cls(geometry, head, tokens, token_reps)


@contextlib.contextmanager
def _npz(path: str | Path):
    """A geometry file tgo wrote (spectra or kept features), opened without unpickling anything;
    ArtifactError naming it when it is damaged, cut short or not tgo's (an object array, garbage,
    a missing entry), instead of numpy's traceback about pickled data."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            yield data
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as err:
        text = str(err).splitlines()[0][:200] if str(err) else ""
        # numpy's own text for an object array advises allow_pickle=True: the advice that would run a planted file
        detail = "it holds Python objects, which only unpickling could read" if "pickle" in text else f"{type(err).__name__}: {text}"
        raise ArtifactError(
            f"{path.parent.name}/{path.name} is not a geometry file tgo wrote: it is damaged, cut short or foreign "
            f"({detail}). tgo reads these files without "
            "unpickling anything; the run's other epochs are intact. Replace or delete that artifact, or probe the epoch "
            "again (tgo analyze --probe_size N re-probes saved weights)."
        ) from None


def _check_model(model: torch.nn.Module) -> None:
    """A TypeError naming what the probe needs and `model` lacks (`tgo.model.probe_gaps`), or a
    ValueError when its head is pooled in a way the probe does not measure (`tgo.model.pooling_gap`).
    `tgo.model.create_model` also checks the shapes in one forward (`layout_gaps`)."""
    gaps = probe_gaps(model)
    if gaps:
        raise TypeError(
            f"probe() needs a timm VisionTransformer or a model of its token layout (timm.create_model('vit_...'), "
            f"'eva02_...'); {type(model).__name__} has {'; '.join(gaps)}."
        )
    pooling = pooling_gap(model)
    if pooling:
        raise ValueError(f"probe(): {type(model).__name__}: {pooling}.")


def _images_and_folds(batch, seen: int, folds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader may yield images, (images, targets) tuples as torchvision datasets do, or (images,
    targets, folds) as a `ProbeSet` loader does. Without fold ids, image i of the stream (in loader
    order) goes to fold i mod K."""
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(batch, (tuple, list)) and len(batch) >= 3:
        fold = torch.as_tensor(batch[2]).long().cpu()
    else:
        fold = torch.arange(seen, seen + images.shape[0]) % folds
    if folds == 1:
        fold = torch.zeros_like(fold)
    elif fold.numel() and int(fold.max()) > folds:
        raise ValueError(f"the loader yields fold ids up to {int(fold.max())}, but probe(folds={folds}).")
    return images, fold


class _RestoreState:
    """Puts back every module's train/eval flag and the global RNG states (torch, CUDA, numpy,
    random) on exit, so a probe in the middle of training never perturbs it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.np_rng = np.random.get_state()
        self.py_rng = random.getstate()
        self.model.eval()
        return self

    def __exit__(self, *exc) -> None:
        for module, mode in self.modes:
            module.training = mode
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        np.random.set_state(self.np_rng)
        random.setstate(self.py_rng)


@torch.no_grad()
def probe(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    precision: Precision = "float64",
    patch_tokens_per_image: int | None = None,
    sites: Sequence[str] | None = None,
    views: Sequence[str] = VIEWS,
    seed: int = 0,
    distributed: bool | None = None,
    progress: bool | None = None,
    keep_covariance: Sequence[tuple[str, str]] = (),
    folds: int = uncertainty.DEFAULT_FOLDS,
    keep_features: bool = False,
    eigensolver: Eigensolver = "auto",
) -> ProbeResult:
    """Measure the spectral geometry of a timm ViT at every site and token view over a probe loader.

    Args:
        model: a timm `VisionTransformer` (any size; ViT-S/16 is tgo's target) or another timm model
            of its token layout (EVA, DINOv2 with registers; `tgo.model` says which fit).
        loader: yields image batches (B, 3, H, W), or tuples whose first item is that.
        device: where to run; default the model's device. Accumulators live there too.
        precision: "float64" (default) throughout, or "float32" per-batch products about a shift
            with float64 totals (cheaper on a CPU; see `tgo.accumulate` for where it falls short).
        patch_tokens_per_image: None (default) uses every patch token of every image for the
            `patch` view (N x T rows). An int k keeps k random tokens per image (drawn with `seed`,
            the same positions at every site): the patch view then has N x k rows, its rank
            measures are bounded by min(D, N k - 1) instead of min(D, N T - 1), and its Gram cost
            falls by T / k. The cls and mean views are unaffected.
        sites, views: restrict the measurement (default: every site, every view).
        seed: seeds the patch-token subsampling only.
        distributed: sum the accumulators across torch.distributed ranks before the spectra (each
            rank passes its own shard of the probe set). Default: when a process group is running.
        progress: a tqdm bar over batches (default: on a terminal only).
        keep_covariance: (site, view) pairs whose covariance matrix C (D x D, float64) the result
            keeps, for figures of the covariance structure (not saved by `ProbeResult.save`).
        folds: K, the folds of the delete-one-fold jackknife that gives every observable its
            standard error (`tgo.uncertainty`); each image's fold comes from the loader (a
            `ProbeSet` loader yields it) or else from its place in the stream. 1: no uncertainty.
        keep_features: keep every image's cls and mean features of every site (float16, N x D)
            in `ProbeResult.features`, for similarity and intrinsic dimension (tgo.similarity).
        eigensolver: where the eigenvalues of the accumulated covariances and second moments (2 per
            site/view, and 2 per fold for the jackknife) come from: "numpy" (LAPACK on the host, one
            matrix at a time), "torch" (torch.linalg.eigvalsh on `device`, a stack of them per call),
            or "auto" (default: torch's on a CUDA device, numpy's elsewhere). float64 either way,
            and the same observables to round-off (`tgo.accumulate.spectra_of`).

    Returns:
        A `ProbeResult`: eigenvalues, singular values, observables and sample count per site/view.
    """
    _check_model(model)
    sites = _checked_sites(model, sites, views, folds, patch_tokens_per_image)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    solver = eigensolver_for(eigensolver, device)
    dtype = next(model.parameters()).dtype  # the probe runs the model as it is (float32, or float64 in tests)
    dim, head = int(_vit(model).embed_dim), head_view(model)
    accs = _moment_accumulators(model, sites, views, dim, device=device, precision=precision, folds=folds)
    interaction = {site: FoldSums(folds, device=device) for site in sites}  # token interaction, per fold
    kept = _KeptFeatures(sites, getattr(model, "cls_token", None) is not None, folds, device) if keep_features else None
    needed = list(dict.fromkeys([*accs, *(kept.pairs if kept else [])]))  # the (site, view) rows a batch forms
    generator = torch.Generator().manual_seed(seed)  # the patch-token subsampling's draws

    with _RestoreState(model), torch.autocast(device.type, enabled=False):
        seen = 0
        for batch in tqdm(loader, desc="probe", unit="batch", leave=False, disable=None if progress is None else not progress):
            images, fold = _images_and_folds(batch, seen, folds)  # (B, 3, H, W), (B,) each image's fold 0..K
            seen += images.shape[0]
            order, counts = _fold_order(fold, folds)  # images sorted by fold: counts[k] of fold k, in order
            images = images[order.to(images.device)].to(device, dtype=dtype, non_blocking=True)
            tokens, head_input = _site_tokens(model, images, pooled=head == keys.POOLED_HEAD_VIEW)
            # the same k random patch tokens of an image at every site (None: all T of them)
            keep = _token_subset(patch_tokens_per_image, tokens["final"][1], generator)
            rows = _view_rows(tokens, head_input, needed, keep)  # each view's rows, formed once
            sorted_fold = fold[order].to(device)
            for site, sums in interaction.items():  # per image, over all T patch tokens
                sums.update(token_interaction(tokens[site][1]), sorted_fold)
            if kept is not None:
                kept.add(rows, order, fold)
            for key, acc in accs.items():
                x = rows[key]  # (B, D), or (B, T or k, D) for the patch view: an image's tokens share its fold
                if x.ndim == 2:
                    acc.update(x, counts)
                else:
                    acc.update(x.reshape(-1, dim), [c * x.shape[1] for c in counts])

    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    result = ProbeResult(head=head)
    if kept is not None:  # every rank's rows, rank after rank
        result.features, result.feature_rows = kept.gather(distributed)
    result.token_interaction, result.token_interaction_replicates = _token_results(interaction, distributed)
    result.geometry = _geometry(accs, keep_covariance, distributed, solver, device)
    return result


def probe_model(
    model: torch.nn.Module,
    loader,
    cfg: TrainConfig,
    device: torch.device | str,
    *,
    distributed: bool = False,
    progress: bool | None = False,
    keep_covariance=(),
    keep_features: bool = False,
    eigensolver: Eigensolver = "auto",
) -> ProbeResult:
    """The geometry probe of `model` with the probe settings of `cfg` (precision, patch tokens, seed,
    folds): what training measures every epoch, and what the analysis's re-probe of saved weights
    measures again. `eigensolver`: as `probe`'s (default: on the GPU where the probe runs on one)."""
    return probe(
        model,
        loader,
        device=device,
        precision=cfg.probe_precision,
        patch_tokens_per_image=cfg.probe_patch_tokens or None,
        seed=cfg.probe_seed,
        distributed=distributed,
        progress=progress,
        folds=cfg.probe_folds,
        keep_covariance=keep_covariance,
        keep_features=keep_features,
        eigensolver=eigensolver,
    )


def _checked_sites(
    model: torch.nn.Module, sites: Sequence[str] | None, views: Sequence[str], folds: int, patch_tokens_per_image: int | None
) -> list[str]:
    """The sites `probe` measures (default: every site of the model), once its arguments are checked."""
    all_sites = site_names(model)
    sites = list(all_sites if sites is None else sites)
    unknown = sorted(set(sites) - set(all_sites)) + sorted(set(views) - set(VIEWS))
    if unknown:
        raise ValueError(f"unknown site or view {unknown}; sites are {all_sites}, views {list(VIEWS)}.")
    if folds < 1:
        raise ValueError(f"folds must be a positive int (1: no uncertainty), got {folds}.")
    if patch_tokens_per_image is not None and patch_tokens_per_image < 1:
        raise ValueError(f"patch_tokens_per_image must be a positive int or None, got {patch_tokens_per_image}.")
    return sites


def _fold_order(fold: torch.Tensor, folds: int) -> tuple[torch.Tensor, list[int]]:
    """The order that sorts a batch's images by fold (stable), and the images per group in that
    order: counts[k] of fold k and, with K > 1, counts[K] kept in every replicate. A ViT in eval
    treats each image alone, so the probe runs the batch in this order, and every site's rows come
    contiguous per fold, as `MomentAccumulator.update` takes them."""
    order = torch.argsort(fold, stable=True)
    return order, torch.bincount(fold, minlength=folds + 1).tolist()[: folds + 1 if folds > 1 else 1]


def _moment_accumulators(
    model: torch.nn.Module, sites: Sequence[str], views: Sequence[str], dim: int, **options
) -> dict[tuple[str, str], MomentAccumulator]:
    """One `MomentAccumulator(dim, **options)` per site and view measured: every pair but the cls
    view where there is no class token (at patch_embed, before `_pos_embed` prepends it, and in a
    model without one)."""
    has_cls = getattr(model, "cls_token", None) is not None
    return {
        (site, view): MomentAccumulator(dim, **options)
        for site in sites
        for view in views
        if view != "cls" or (has_cls and site != "patch_embed")
    }


Tokens = dict[str, tuple[torch.Tensor | None, torch.Tensor]]  # site -> (prefix tokens (B, P, D) or None, patch tokens (B, T, D))


def _site_tokens(model: torch.nn.Module, images: torch.Tensor, pooled: bool) -> tuple[Tokens, torch.Tensor | None]:
    """One forward pass of `images` (B, 3, H, W) as every site's tokens, {site: (prefix tokens
    (B, P, D), patch tokens (B, T, D))} in forward order (P = `model.num_prefix_tokens`, the class
    and register tokens; None at patch_embed, before `_pos_embed` prepends them), and, for a model
    pooled by average (`pooled`), the input of its head, fc_norm of the mean patch token (B, D);
    else None. The pos_embed site is `model._pos_embed` of the patch_embed output that a forward
    hook captures (a concat and an add, no second patch projection)."""
    vit = _vit(model)
    captured: list[torch.Tensor] = []
    hook = vit.patch_embed.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        final, blocks = vit.forward_intermediates(images, output_fmt="NLC", return_prefix_tokens=True)
    finally:
        hook.remove()
    patch_out, dim, n_prefix = captured[-1], int(vit.embed_dim), int(vit.num_prefix_tokens)
    pos = vit._pos_embed(patch_out)
    if isinstance(pos, tuple):  # EVA's: (tokens, rotary embedding)
        pos = pos[0]
    tokens: Tokens = {
        "patch_embed": (None, patch_out.reshape(patch_out.shape[0], -1, dim)),
        "pos_embed": (pos[:, :n_prefix], pos[:, n_prefix:]),
    }
    for i, (spatial, prefix) in enumerate(_pairs(blocks)):
        tokens[f"block_{i:02d}"] = (prefix, spatial)
    tokens["final"] = (final[:, :n_prefix], final[:, n_prefix:])
    return tokens, vit.forward_head(final, pre_logits=True) if pooled else None


def _token_subset(k: int | None, patches: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
    """(B, min(k, T)) random patch-token positions of each image of `patches` (B, T, D), on their
    device, drawn on the host from `generator` (the same draws on any device); None when k is None
    (every token kept)."""
    if k is None:
        return None
    b, t = patches.shape[:2]
    return torch.rand(b, t, generator=generator).argsort(dim=1)[:, : min(k, t)].to(patches.device)


def _view_rows(
    tokens: Tokens, head_input: torch.Tensor | None, pairs: Iterable[tuple[str, str]], keep: torch.Tensor | None
) -> dict[tuple[str, str], torch.Tensor]:
    """Each (site, view) of `pairs` as per-image rows, formed once per batch for both the moment
    accumulators and the kept features:

        cls    (B, D)     the first prefix token (the class token)
        mean   (B, D)     the mean of the T patch tokens; at final, `head_input` where it is given
                          (a model pooled by average: fc_norm of that mean, what feeds its head)
        patch  (B, T, D)  the patch tokens; (B, k, D) those at the positions `keep` (B, k) names
    """
    rows = {}
    for site, view in pairs:
        prefix, patches = tokens[site]
        if view == "cls":
            assert prefix is not None, f"{site} has no prefix tokens"
            rows[(site, view)] = prefix[:, 0]
        elif view == "mean":
            rows[(site, view)] = head_input if (head_input is not None and site == "final") else patches.mean(dim=1)
        elif keep is None:
            rows[(site, view)] = patches
        else:
            rows[(site, view)] = torch.gather(patches, 1, keep[:, :, None].expand(-1, -1, patches.shape[-1]))
    return rows


class _KeptFeatures:
    """keep_features: every image's cls and mean rows at every site, float16 on the host in the
    loader's order, and each row's place in this rank's stream and its fold; `gather` joins every
    rank's shard, rank after rank, into `ProbeResult.features` and `ProbeResult.feature_rows`."""

    def __init__(self, sites: Sequence[str], has_cls: bool, folds: int, device: torch.device) -> None:
        # cls: the class token, in a model that has one (a register is no class token), after patch_embed
        self.pairs = [(site, view) for site in sites for view in ("cls", "mean") if view == "mean" or (has_cls and site != "patch_embed")]
        self.folds, self.device = folds, device
        self.parts: dict[tuple[str, str], list[torch.Tensor]] = {pair: [] for pair in self.pairs}  # per batch (B, D)
        self.places: list[torch.Tensor] = []  # per batch (B,): each image's place in this rank's stream
        self.fold_ids: list[torch.Tensor] = []  # per batch (B,): each image's fold
        self.seen = 0

    def add(self, rows: dict[tuple[str, str], torch.Tensor], order: torch.Tensor, fold: torch.Tensor) -> None:
        """The loader's next batch: `rows` of its images sorted by fold (`order`, as the forward saw
        them), put back in the loader's order; `fold` (B,), each image's fold in the loader's order."""
        unsort = torch.argsort(order).to(self.device)
        for pair, parts in self.parts.items():
            parts.append(rows[pair][unsort].to("cpu", torch.float16))
        self.places.append(torch.arange(self.seen, self.seen + fold.shape[0]))
        self.fold_ids.append(fold.clone())
        self.seen += fold.shape[0]

    def gather(self, distributed: bool) -> tuple[dict[tuple[str, str], np.ndarray], FeatureRows]:
        """Every rank's rows, rank after rank: (site, view) -> (N, D) float16, and each row's place
        in the probe set and fold. A rank's i-th image is image i * world + rank of the probe set
        (`ProbeSet.loader`'s shards)."""
        features = {pair: _gathered(torch.cat(parts).numpy(), distributed) for pair, parts in self.parts.items() if parts}
        world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)
        place = np.concatenate([p.numpy() for p in self.places] or [np.zeros(0)]).astype(np.int64) * world + rank
        fold = np.concatenate([f.numpy() for f in self.fold_ids] or [np.zeros(0)]).astype(np.int64)
        return features, FeatureRows(_gathered(place, distributed), _gathered(fold, distributed), self.folds)


def _gathered(rows: np.ndarray, distributed: bool) -> np.ndarray:
    """Every rank's `rows`, concatenated rank after rank (this rank's alone when not distributed)."""
    if not distributed:
        return rows
    shards: list[np.ndarray | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shards, rows)
    return np.concatenate(cast(list[np.ndarray], shards))  # all_gather_object filled every rank's place


def _token_results(interaction: dict[str, FoldSums], distributed: bool) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Each site's token interaction over every rank's images, and its K values without fold k
    (`ProbeResult.token_interaction` and `.token_interaction_replicates`; no replicates without folds)."""
    tokens, replicates = {}, {}
    for site, sums in interaction.items():
        if distributed:
            sums.all_reduce()
        tokens[site] = sums.value()
        if (reps := sums.replicates()) is not None:
            replicates[site] = reps
    return tokens, replicates


# Matrices sent to a device eigensolver in one go (`_geometry`): 256 MiB of float64, 227 matrices
# of 384 x 384 (ViT-S: 528 in three calls), so that the batch stays small beside what training holds.
EIGEN_BATCH_BYTES = 256 * 2**20


def _geometry(
    accs: dict[tuple[str, str], MomentAccumulator],
    keep_covariance: Sequence[tuple[str, str]],
    distributed: bool,
    solver: Literal["numpy", "torch"] = "numpy",
    device: torch.device | str = "cpu",
) -> dict[tuple[str, str], SiteViewGeometry]:
    """Each accumulator's spectra and observables (over every rank's rows when distributed), with
    its jackknife replicates, and its covariance matrix where `keep_covariance` names the pair.

    The eigenvalues come from `solver` ("numpy": each site/view's matrices as they are formed, so
    that the host holds one site/view's at a time, as before; "torch": the matrices of several
    site/views, up to EIGEN_BATCH_BYTES, in one stacked call on `device`)."""
    keep = set(map(tuple, keep_covariance))
    geometry: dict[tuple[str, str], SiteViewGeometry] = {}
    pending: list[tuple[tuple[str, str], list[spectral.MomentMatrices]]] = []

    def solve() -> None:
        spectra = iter(spectra_of([m for _, ms in pending for m in ms], solver, device))
        for (site, view), ms in pending:
            spec, *jack = [next(spectra) for _ in ms]
            geometry[(site, view)] = SiteViewGeometry(
                site=site,
                view=view,
                eigenvalues=spec.eigenvalues,
                singular_values=spec.singular_values,
                uncentered_singular_values=spec.uncentered_singular_values,
                observables=spectral.observables_from_spectra(spec, label=f"{site}/{view}"),
                n_samples=spec.n_samples,
                degenerate=spec.degenerate,
                covariance=spec.covariance if (site, view) in keep else None,
                replicates=_replicates(jack, f"{site}/{view}"),
            )
        pending.clear()

    size = 0
    for (site, view), acc in accs.items():
        if distributed:
            acc.all_reduce()
        try:
            matrices = acc.moment_matrices()
        except ValueError as err:
            raise ValueError(f"probe site {site}, view {view}: {err}") from None
        pending.append(((site, view), matrices))
        size += sum(p.nbytes for m in matrices for p in m.eigenproblems())
        if solver != "torch" or size >= EIGEN_BATCH_BYTES:
            solve()
            size = 0
    solve()
    return {key: geometry[key] for key in accs}  # the accumulators' order


def token_interaction(patches: torch.Tensor) -> torch.Tensor:
    """Per image, the mean cosine similarity between its distinct patch tokens (TGO-II's token
    interaction: near 1 when the tokens of an image have smoothed into one direction, near 0 when
    they stay distinct). patches: (B, T, D) -> (B,), in float64.

        mean_{i != j} cos(t_i, t_j) = (||sum_i t_i/||t_i|| ||^2 - T) / (T (T - 1))

    one pass over the tokens, no T x T matrix. A zero token counts as orthogonal to every other."""
    x = patches.to(torch.float64)
    t = x.shape[1]
    if t < 2:
        return torch.full((x.shape[0],), float("nan"), dtype=torch.float64, device=x.device)
    unit = x / x.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    nonzero = (x.norm(dim=-1) > 0).sum(dim=1).to(torch.float64)  # ||t/||t|| ||^2 is 1 for these, 0 for zero tokens
    total = unit.sum(dim=1)  # (B, D)
    return ((total * total).sum(dim=-1) - nonzero) / (t * (t - 1))


def _replicates(jack: Sequence[spectral.Spectra], label: str) -> np.ndarray | None:
    """(K, n_observables): every observable without fold k, from the K replicates' spectra (None
    when K = 1: no replicates). A view that is degenerate as a whole warns once, from the full
    estimate, not K times more."""
    if not jack:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spectral.DegenerateGeometryWarning)
        rows = [spectral.observables_from_spectra(s, label=label) for s in jack]
    return np.array([[r[n] for n in spectral.OBSERVABLE_NAMES] for r in rows])


def _pairs(blocks):
    """forward_intermediates yields (spatial, prefix) pairs when the model has prefix tokens, and
    bare spatial tensors when it has none."""
    for item in blocks:
        if isinstance(item, tuple):
            yield item
        else:
            yield item, item[:, :0]
