"""A run's kept probe features -> TGO-II's tables: CKA and SVCCA between sites and between epochs,
TwoNN intrinsic dimension, each with its jackknife replicates.

At its `feature_epochs` a training run keeps the per-image `cls` and `mean` features of every site
(`geometry/features/epoch_XXXX.npz`, float16, N x D each, with each row's place in the probe set
and jackknife fold). Everything here is computed from those files after the fact, for any pair of
sites, epochs or runs, with the estimators of `tgo.similarity`:

- `similarity_tables`: debiased linear CKA (and SVCCA) between every pair of sites at each kept
  epoch, per view (the site x site matrices); and for each site and view, the CKA (and SVCCA) of
  every kept epoch with the last kept epoch, with the previous kept epoch and with the first (how
  far training moved it).
- `specialisation`: each block's CKA between the first and last kept epoch, with replicates.
- `intrinsic_dimension`: TwoNN of each site's cls and mean features at each kept epoch.

Standard errors: the probe deals its images into K folds (`tgo.uncertainty.fold_ids`); a statistic
recomputed K times, each time without one fold, gives its jackknife standard error, and, since
every epoch and site is measured on the same images, the replicates of two such statistics pair
fold by fold (`tgo.uncertainty.paired_se`). Only the statistics that verdicts use are jackknifed
(`jackknifed`): the full matrices are point estimates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tgo import similarity, tracking, uncertainty
from tgo.keys import Tag, site_order
from tgo.probe import FeatureRows, ProbeResult

Features = dict[tuple[str, str], np.ndarray]  # (site, view) -> (N, D) float16


@dataclass
class KeptEpoch:
    """One kept epoch's features, rows in probe-set order, and each row's fold."""

    features: Features
    rows: FeatureRows | None  # None for files kept before tgo saved the rows' folds

    @property
    def sites(self) -> list[str]:
        return site_order({site for site, _ in self.features})


def shard_positions(n: int, world: int) -> np.ndarray:
    """The probe-set place of each of n feature rows saved rank after rank by `world` processes
    (rank r probes images r, r + world, ...: `ProbeSet.loader`), as files kept before tgo saved
    each row's place were."""
    return np.concatenate([np.arange(r, n, world) for r in range(world)]) if n else np.zeros(0, dtype=np.int64)


def read_kept(run_id: str, folder: str | Path) -> dict[int, KeptEpoch]:
    """Every kept epoch of a run (one download of geometry/features/), rows sorted by their place in
    the probe set, so that epochs, and runs probed on the same set, line up image by image (files
    from before tgo saved each row's place: by the run's world size, `shard_positions`). Empty when
    the run kept none. Memory: the files' size (float16), about 230 MB for a tgo1 run's auto epochs."""
    artifact_dir, _ = tracking.features_artifact(0)
    if not tracking.artifact_names(run_id, artifact_dir):
        return {}
    local = tracking.download(run_id, artifact_dir, Path(folder) / run_id)
    world = int(tracking.get_run(run_id).data.tags.get(Tag.WORLD_SIZE, "1") or 1)
    out = {}
    for path in sorted(local.glob("epoch_*.npz")):
        features, rows = ProbeResult.load_features(path), ProbeResult.load_feature_rows(path)
        if rows is not None:
            position = rows.position
        else:  # saved before the rows were
            position = shard_positions(len(next(iter(features.values()))) if features else 0, world)
        order = np.argsort(position, kind="stable")
        features = {key: x[order] for key, x in features.items()}
        if rows is not None:
            rows = FeatureRows(rows.position[order], rows.fold[order], rows.folds)
        out[int(path.stem.split("_")[1])] = KeptEpoch(features, rows)
    return out


def _blocks(sites: list[str]) -> list[str]:
    return [s for s in sites if s.startswith("block_")]


def _prepared(k: KeptEpoch, views: tuple[str, ...]) -> dict[tuple[str, str], similarity.Representation]:
    """(site, view) -> one epoch's features prepared once (centred, own HSIC, SVCCA basis)."""
    return {key: similarity.Representation.of(x) for key, x in k.features.items() if key[1] in views}


def similarity_tables(kept: dict[int, KeptEpoch], views: tuple[str, ...] = ("mean", "cls")) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both similarity tables of a run's kept features, each epoch prepared once and at most four
    epochs (this, the previous, the first and the last) held at a time:

    - site similarity: debiased linear CKA and SVCCA between every pair of sites at each kept epoch,
      per view; columns epoch, view, site_a, site_b, cka, svcca (both orders, so that a pivot gives
      the S x S matrix; NaN where a site has no variance, as pos_embed/cls);
    - epoch similarity: for each site and view at each kept epoch, debiased CKA with itself at the
      last kept epoch (cka_last, and svcca_last), at the previous (cka_previous) and at the first
      (cka_first); columns epoch, site, view, cka_last, svcca_last, cka_previous, cka_first.
    """
    site_rows, epoch_rows = [], []
    epochs = sorted(kept)
    if epochs:
        first, last = _prepared(kept[epochs[0]], views), _prepared(kept[epochs[-1]], views)
        previous: dict[tuple[str, str], similarity.Representation] | None = None
        for i, epoch in enumerate(epochs):
            here = first if i == 0 else last if i == len(epochs) - 1 else _prepared(kept[epoch], views)
            for view in views:
                sites = [s for s in kept[epoch].sites if (s, view) in here]
                reps = [here[(s, view)] for s in sites]
                cka, svcca = similarity.pairwise(reps), similarity.pairwise(reps, similarity.svcca_between)
                site_rows += [(epoch, view, a, b, cka[i, j], svcca[i, j]) for i, a in enumerate(sites) for j, b in enumerate(sites)]
            for (site, view), rep in here.items():
                epoch_rows.append(
                    (
                        epoch,
                        site,
                        view,
                        _against(rep, (site, view), last),
                        _against(rep, (site, view), last, similarity.svcca_between),
                        _against(rep, (site, view), previous),
                        _against(rep, (site, view), first),
                    )
                )
            previous = here
    return (
        pd.DataFrame(site_rows, columns=["epoch", "view", "site_a", "site_b", "cka", "svcca"]),
        pd.DataFrame(epoch_rows, columns=["epoch", "site", "view", "cka_last", "svcca_last", "cka_previous", "cka_first"]),
    )


def _against(
    rep: similarity.Representation,
    key: tuple[str, str],
    other: dict[tuple[str, str], similarity.Representation] | None,
    measure: Callable[[similarity.Representation, similarity.Representation], float] = similarity.cka_between,
) -> float:
    """`measure` between `rep` and the same (site, view) `key` of another epoch (NaN where that epoch
    lacks it, or has other images)."""
    there = other.get(key) if other is not None else None
    if there is None or there.centred.shape[0] != rep.centred.shape[0]:
        return np.nan
    return measure(rep, there)


@dataclass
class Jackknifed:
    """A statistic at several places (blocks, or epochs), its estimates and, where the features
    carried their folds, its (K,) leave-one-fold-out replicates at each place (paired fold by fold:
    the same images everywhere)."""

    places: list  # block names or epochs
    values: np.ndarray  # (P,)
    replicates: np.ndarray | None  # (P, K), or None without folds
    epochs: tuple[int, int] = (0, 0)  # specialisation: the two kept epochs compared

    @property
    def se(self) -> np.ndarray:
        if self.replicates is None:
            return np.full(len(self.values), np.nan)
        return np.asarray(uncertainty.jackknife_se(self.replicates, axis=1))  # (P,): replicates are 2-d


def _folds(*epochs: KeptEpoch) -> tuple[np.ndarray, int] | None:
    """The fold of each row, shared by these epochs (None if one lacks them or they differ)."""
    rows = [k.rows for k in epochs if k.rows is not None and k.rows.folds >= 2]
    if len(rows) < len(epochs) or any(not np.array_equal(r.fold, rows[0].fold) for r in rows):
        return None
    return rows[0].fold, rows[0].folds


def specialisation(kept: dict[int, KeptEpoch], view: str = "mean") -> Jackknifed:
    """For each block, the debiased CKA between its features at the first and at the last kept
    epoch (1: training left its representation where it started; lower: it moved further), with
    jackknife replicates. Empty with fewer than two kept epochs."""
    epochs = sorted(kept)
    if len(epochs) < 2:
        return Jackknifed([], np.zeros(0), None)
    first, last = kept[epochs[0]], kept[epochs[-1]]
    blocks = [b for b in _blocks(last.sites) if (b, view) in first.features and (b, view) in last.features]
    folds = _folds(first, last)
    values, reps = [], []
    for block in blocks:
        x, y = first.features[(block, view)].astype(np.float64), last.features[(block, view)].astype(np.float64)
        value, r = similarity.jackknife(similarity.linear_cka, folds[0], folds[1], x, y) if folds else (similarity.linear_cka(x, y), None)
        values.append(value)
        reps.append(r)
    return Jackknifed(blocks, np.array(values), np.array(reps) if folds and reps else None, (epochs[0], epochs[-1]))


def intrinsic_dimension(kept: dict[int, KeptEpoch], jackknife_at: tuple[str, str] | None = None) -> tuple[pd.DataFrame, Jackknifed | None]:
    """TwoNN intrinsic dimension of every site's cls and mean features at each kept epoch (columns
    epoch, site, view, intrinsic_dim; NaN where it cannot be measured), and, for the site/view
    `jackknife_at`, its values over the kept epochs with replicates (TwoNN is refitted K times per
    epoch, so only there)."""
    rows = [
        (epoch, site, view, similarity.twonn_or_nan(x.astype(np.float64)))
        for epoch, k in sorted(kept.items())
        for (site, view), x in k.features.items()
    ]
    table = pd.DataFrame(rows, columns=["epoch", "site", "view", "intrinsic_dim"])
    if jackknife_at is None:
        return table, None
    epochs = [e for e in sorted(kept) if jackknife_at in kept[e].features]
    folds = _folds(*(kept[e] for e in epochs)) if epochs else None
    values = [
        table[(table.epoch == e) & (table.site == jackknife_at[0]) & (table.view == jackknife_at[1])].intrinsic_dim.iloc[0] for e in epochs
    ]
    reps = None
    if folds:
        reps = np.array(
            [
                similarity.jackknife(similarity.twonn_or_nan, folds[0], folds[1], kept[e].features[jackknife_at].astype(np.float64))[1]
                for e in epochs
            ]
        )
    return table, Jackknifed(epochs, np.array(values, dtype=float), reps)
