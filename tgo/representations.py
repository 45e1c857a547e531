"""A run's kept probe features -> TGO-II's tables: CKA and SVCCA between sites and between epochs,
TwoNN intrinsic dimension, each with its jackknife replicates.

At its `feature_epochs` a training run keeps the per-image `cls` and `mean` features of every site
(`geometry/features/epoch_XXXX.npz`, float16, N x D each, with each row's place in the probe set
and jackknife fold). Everything here is computed from those files after the fact, for any pair of
sites, epochs or runs, with the estimators of `tgo.similarity`:

- `site_similarity`: debiased linear CKA (and SVCCA) between every pair of sites at each kept
  epoch, per view: the site x site matrices.
- `epoch_similarity`: for each site and view, the CKA (and SVCCA) of every kept epoch with the
  last kept epoch, with the previous kept epoch and with the first (how far training moved it).
- `intrinsic_dimension`: TwoNN of each site's cls and mean features at each kept epoch.

Standard errors: the probe deals its images into K folds (`tgo.uncertainty.fold_ids`); a statistic
recomputed K times, each time without one fold, gives its jackknife standard error, and, since
every epoch and site is measured on the same images, the replicates of two such statistics pair
fold by fold (`tgo.uncertainty.paired_se`). Only the statistics that verdicts use are jackknifed
(`jackknifed`): the full matrices are point estimates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tgo import tracking
from tgo.keys import site_order
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


def read_kept(run_id: str, folder: str | Path) -> dict[int, KeptEpoch]:
    """Every kept epoch of a run (one download of geometry/features/), rows sorted by their place in
    the probe set, so that epochs, and runs probed on the same set, line up image by image. Empty
    when the run kept none."""
    artifact_dir, _ = tracking.features_artifact(0)
    if not tracking.artifact_names(run_id, artifact_dir):
        return {}
    local = tracking.download(run_id, artifact_dir, Path(folder) / run_id)
    out = {}
    for path in sorted(local.glob("epoch_*.npz")):
        features, rows = ProbeResult.load_features(path), ProbeResult.load_feature_rows(path)
        if rows is not None:
            order = np.argsort(rows.position, kind="stable")
            features = {key: x[order] for key, x in features.items()}
            rows = FeatureRows(rows.position[order], rows.fold[order], rows.folds)
        out[int(path.stem.split("_")[1])] = KeptEpoch(features, rows)
    return out
