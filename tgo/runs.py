"""Reading a tgo training run back through the tracking API: its config, its geometry (every
epoch's spectra in one download, or else its metric histories), its jackknife replicates and head
view, its scalar metrics, token interaction and weight spectra, as tidy tables.

    from tgo import runs
    geometry, source, spectra = runs.read_spectra(run_id, folder)   # epoch, site, view, observable, value, se
    replicates, head = runs.replicates_of(spectra), runs.head_of(spectra)

The analysis, the comparison and a sweep's aggregate all read runs through this module (and their
kept features through `tgo.representations.read_kept`); none of them reads another's files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tgo import tracking, uncertainty
from tgo.errors import AnalysisError, TgoError
from tgo.keys import HEAD_VIEW, METRIC_PREFIX, TOKEN_OBSERVABLE, parse_metric_key, parse_weight_key
from tgo.probe import ProbeResult

SCALARS = ("train/loss", "train/acc1", "val/loss", "val/acc1", "val/acc5", "lr", "time/epoch_s", "time/probe_s")
CONFIG_ARTIFACT = "/".join(tracking.config_artifact())  # the resolved TrainConfig (tgo.tracking.log_config)
PROBE_SET_ARTIFACT = "probe/probe_set.json"  # probe indices, seed, dataset size and fingerprint


def check_active(run, error: type[TgoError] = AnalysisError, prefix: str = "") -> None:
    """Refuse a deleted run (in MLflow's trash, lifecycle stage "deleted") before anything is made:
    MLflow still serves its data, but refuses every write that links to it ("must be in the
    'active' state"), which came only after an analysis or comparison run had been made and finished."""
    if run.info.lifecycle_stage == "deleted":
        run_id = run.info.run_id
        raise error(
            f"{prefix}run {run_id} is deleted (in the trash of experiment {run.info.experiment_id}); nothing was "
            f"created. Restore it first (mlflow runs restore --run-id {run_id}, with the same MLFLOW_TRACKING_URI) "
            "and run the command again, or give another run."
        )


def read_config(run_id: str, folder: str | Path) -> dict:
    """The run's resolved config as it trained (config/config.json, written again on every resume;
    the params config.<field> keep a resumed run's first values)."""
    return json.loads(tracking.download(run_id, CONFIG_ARTIFACT, folder).read_text())


def read_probe_set(run_id: str, folder: str | Path) -> dict | None:
    """The run's probe-set record (indices, seed, dataset size, fingerprint), or None for a run
    that has none (trained with probe_every=0)."""
    try:
        return json.loads(tracking.download(run_id, PROBE_SET_ARTIFACT, folder).read_text())
    except tracking.TrackingError:
        return None


def geometry_table(results: dict[int, ProbeResult]) -> pd.DataFrame:
    """Tidy table (epoch, site, view, observable, value, se) of per-epoch probe results; se is the
    jackknife standard error (NaN where the probe had no folds)."""
    rows = [
        (epoch, g.site, g.view, name, value, se[name])
        for epoch, result in sorted(results.items())
        for g in result
        for se in (g.stderr,)  # once per site/view, not once per observable
        for name, value in g.observables.items()
    ]
    return pd.DataFrame(rows, columns=["epoch", "site", "view", "observable", "value", "se"])


def replicates_of(results: dict[int, ProbeResult]) -> dict[tuple[str, str], dict[int, np.ndarray]]:
    """(site, view) -> epoch -> (K, observables) jackknife replicates, where the probe kept them."""
    out: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for epoch, result in results.items():
        for g in result:
            if g.replicates is not None:
                out.setdefault((g.site, g.view), {})[epoch] = g.replicates
    return out


def head_of(results: dict[int, ProbeResult]) -> tuple[str, str]:
    """The view that feeds the head, as the spectra recorded it (HEAD_VIEW, final/cls, for older runs)."""
    return next(iter(results.values())).head if results else HEAD_VIEW


def table_from_metrics(run_id: str, keys: Sequence[str]) -> pd.DataFrame:
    """The geometry table from metric histories (runs without spectra artifacts)."""
    rows = []
    for key, hist in tracking.metric_histories(run_id, keys).items():
        parts = parse_metric_key(key)
        assert parts is not None, f"{key} is not a geometry metric key"
        rows += [(step, parts.site, parts.view, parts.observable, value, np.nan) for step, value in hist]
    return pd.DataFrame(rows, columns=["epoch", "site", "view", "observable", "value", "se"])


def spectra_files(run_id: str, folder: Path) -> dict[int, ProbeResult]:
    """Every epoch's spectra artifact, in one download."""
    artifact_dir, _ = tracking.spectra_artifact(0)
    if not tracking.artifact_names(run_id, artifact_dir):
        return {}
    local = tracking.download(run_id, artifact_dir, folder)
    return {int(p.stem.split("_")[1]): ProbeResult.load(p) for p in sorted(local.glob("epoch_*.npz"))}


def read_geometry(run, folder: Path) -> tuple[pd.DataFrame, str, dict[int, ProbeResult]]:
    """(geometry table, source, every epoch's spectra) of an MLflow run object: the spectra files in
    one download, or else the metric histories (spectra then empty); AnalysisError for a run with
    no geometry."""
    run_id = run.info.run_id
    spectra = spectra_files(run_id, folder)
    if spectra:
        return geometry_table(spectra), "the run's logged spectra (geometry/spectra/epoch_XXXX.npz)", spectra
    keys = [k for k in run.data.metrics if (parts := parse_metric_key(k)) and parts.prefix == METRIC_PREFIX]
    if not keys:
        raise AnalysisError(
            f"run {run_id} has no geometry (no geom/... metrics, no spectra artifacts): it was trained "
            "with probe_every=0, or is not a tgo training run. Re-probe its saved weights with probe_size=N."
        )
    return table_from_metrics(run_id, keys), "the run's logged metrics", {}


def read_spectra(run_id: str, folder: str | Path) -> tuple[pd.DataFrame, str, dict[int, ProbeResult]]:
    """(geometry table, source, every epoch's spectra) of a run (spectra empty when read from its
    metric histories)."""
    return read_geometry(tracking.get_run(run_id), Path(folder))


def scalar_table(run_id: str, keys: Sequence[str]) -> pd.DataFrame:
    """Histories of the scalar metrics (train/*, val/*, lr, time/*) a run has, as epoch, key, value."""
    present = tracking.get_run(run_id).data.metrics
    rows = [(step, key, value) for key in keys if key in present for step, value in tracking.metric_history(run_id, key)]
    return pd.DataFrame(rows, columns=["epoch", "key", "value"])


def token_table(spectra: dict[int, ProbeResult]) -> pd.DataFrame:
    """Token interaction of every site at every probed epoch with its jackknife standard error and
    the folds K it was computed from (both NaN without folds; K sets the width of its interval):
    columns epoch, site, mean_cosine, se, folds."""
    rows = []
    for epoch, r in sorted(spectra.items()):
        for site, value in r.token_interaction.items():
            reps = r.token_interaction_replicates.get(site)
            rows.append(
                (epoch, site, value, float(uncertainty.jackknife_se(reps)), len(reps))
                if reps is not None
                else (epoch, site, value, np.nan, np.nan)
            )
    return pd.DataFrame(rows, columns=["epoch", "site", TOKEN_OBSERVABLE, "se", "folds"])


def weight_table(run) -> pd.DataFrame:
    """The weight spectra a run logged every epoch (weights/<kind>/<site>/<observable>, alpha and the
    ranks): columns epoch, kind, site, observable, value."""
    parsed = {k: parts for k in run.data.metrics if (parts := parse_weight_key(k))}  # key -> (kind, site, observable)
    rows = [
        (step, *parsed[key], value)
        for key, hist in tracking.metric_histories(run.info.run_id, list(parsed)).items()
        for step, value in hist
    ]
    return pd.DataFrame(rows, columns=["epoch", "kind", "site", "observable", "value"])
