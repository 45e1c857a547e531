"""One epoch's measurement of a ViT, as every tgo run records it: the probe with a TrainConfig's
settings (observables, their jackknife standard errors, token interaction), the kept features and
their similarity at `feature_epochs`, the weight spectra with `weight_spectra`, their times, and
the run's alarm rules tested on the probe's geometry (`tgo.alarms`: alarm/<name>).

    m = measure(model, probe_loader, cfg, device, epoch=3, previous_features=earlier.geometry.features)
    m.metrics["geom/final/cls/effective_rank"], m.metrics["geom_se/final/cls/effective_rank"]

Training (`tgo.train.run_epoch`), `tgo probe` of checkpoints and `tgo.GeometryMonitor` in a loop of
one's own all call this, so that their runs carry the same keys with the same meaning.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from tgo.alarms import Alarms, EpochAlarms
from tgo.config import TrainConfig
from tgo.probe import ProbeResult, probe_model
from tgo.similarity import feature_metrics
from tgo.spectral import DegenerateGeometryWarning
from tgo.weights import WeightSpectra, weight_spectra

__all__ = ["Measurement", "measure"]


@dataclass
class Measurement:
    """What `measure` found at one epoch.

    Attributes:
        metrics: the epoch's geometry metrics (geom/..., geom_se/... of the head view, tokens/...,
            similarity/... and intrinsic_dim/... where features were kept, weights/..., time/probe_s,
            time/weights_s), keys from tgo.keys.
        geometry: the probe's result (spectra, replicates, kept features), or None without a probe.
        weights: the weight spectra, or None without weight_spectra.
        alarms: what the alarm rules found on this epoch's geometry (None: no probe, no rules, or
            not the recording process).
    """

    metrics: dict[str, float]
    geometry: ProbeResult | None
    weights: WeightSpectra | None
    alarms: EpochAlarms | None = None


def measure(
    model: torch.nn.Module,
    loader,
    cfg: TrainConfig,
    device: torch.device | str,
    *,
    epoch: int,
    distributed: bool = False,
    main: bool = True,
    progress: bool | None = False,
    previous_features: dict[tuple[str, str], np.ndarray] | None = None,
    alarms: Alarms | None = None,
) -> Measurement:
    """Measure `model` at `epoch`.

    Args:
        model: the ViT, as it is at this epoch (its train/eval mode and RNG state are restored).
        loader: the probe set's loader (`ProbeSet.loader`), or None for no probe this epoch.
        cfg: the probe settings (probe_precision, probe_patch_tokens, probe_seed, probe_folds), which
            epochs keep their features (feature_epochs) and whether to measure the weights.
        device: where the probe runs.
        epoch: the epoch measured (training epochs completed; 0 = the initialisation).
        distributed: the probe's sums are all-reduced over the process group (torchrun); the weight
            spectra, the same on every rank, are measured on `main` only.
        main: this process records (rank 0).
        progress: a progress bar over the probe's batches (None: only on a terminal).
        previous_features: the kept features of the last earlier kept epoch, for
            similarity/<site>/cka_previous.
        alarms: the run's alarm rules and what they have seen, tested on the main process when the
            probe ran (they then hold this epoch too).
    """
    metrics: dict[str, float] = {}
    geometry = None
    if loader is not None:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True):  # degenerate views: the tag tgo.degenerate_views, not a warning per epoch
            warnings.simplefilter("always", DegenerateGeometryWarning)
            keep = epoch in cfg.feature_epoch_set()
            geometry = probe_model(model, loader, cfg, device, distributed=distributed, progress=progress, keep_features=keep)
        metrics["time/probe_s"] = time.perf_counter() - t0
        metrics.update(geometry.metrics())
        metrics.update(geometry.stderr_metrics())  # geom_se/final/cls/*: the head view only
        metrics.update(geometry.token_interaction_metrics())  # tokens/<site>/mean_cosine
        if geometry.features:  # similarity/ and intrinsic_dim/ of the kept features
            metrics.update(feature_metrics(geometry.features, previous_features))
    weights = None
    if cfg.weight_spectra and main:  # the same weights on every rank: measured once
        t0 = time.perf_counter()
        weights = weight_spectra(model)
        metrics.update(weights.metrics())  # weights/<kind>/<site>/<observable>
        metrics["time/weights_s"] = time.perf_counter() - t0
    found = None
    if alarms and geometry is not None and main:
        found = alarms.observe(epoch, geometry.observations(epoch))
        metrics.update(found.metrics)  # alarm/<name>: 1 in alarm, 0 not, at every probed epoch
    return Measurement(metrics, geometry, weights, found)
