"""Probing a run's saved weights again: the weights a training run kept
(checkpoints/weights_epoch_XXXX.pt) measured by the same probe, on more images, another seed, or
with covariance matrices kept for figures, after checking that the data is the one it was probed on.

    from tgo.reprobe import reprobe
    results, size = reprobe(run_id, folder, probe_size=1000)       # epoch -> ProbeResult
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tgo import runs, tracking
from tgo.config import from_dict
from tgo.data import build_datasets
from tgo.errors import AnalysisError, ArtifactError
from tgo.model import create_model
from tgo.probe import ProbeResult, probe_model
from tgo.probeset import ProbeSet, dataset_size, fingerprint
from tgo.runtime import resolve_device
from tgo.spectral import DegenerateGeometryWarning


def saved_weight_epochs(run_id: str) -> list[int]:
    """The epochs whose weights the run kept (checkpoints/weights_epoch_XXXX.pt)."""
    folder, _ = tracking.weights_artifact(0)
    epochs = (tracking.weights_epoch(n) for n in tracking.artifact_names(run_id, folder))
    return sorted(e for e in epochs if e is not None)


def reprobe(
    run_id: str,
    folder: str | Path,
    probe_size: int = 0,
    data_dir: str = "",
    probe_seed: int | None = None,
    device: str = "auto",
    epochs: Sequence[int] | None = None,
    keep_covariance: Sequence[tuple[str, str]] = (),
) -> tuple[dict[int, ProbeResult], int]:
    """Probe the run's saved weights again with the probe settings of its own config.

    Args:
        run_id: the training run.
        folder: where downloads go (each weights file is removed once probed).
        probe_size: probe images (0: as many as the run's own probe).
        data_dir: where the run's data lies now (checked against the probe set's fingerprint).
        probe_seed: seed of the image selection (None: the run's own).
        device: auto, cpu, cuda, cuda:N or mps.
        epochs: the saved epochs to probe (None: every saved epoch).
        keep_covariance: (site, view) pairs whose covariance matrices the results keep.

    Returns:
        (epoch -> ProbeResult, the number of probe images).
    """
    folder = Path(folder)
    config = runs.read_config(run_id, folder)
    if data_dir:
        config["data_dir"] = data_dir
    config["device"] = device or "auto"
    cfg = from_dict(config)
    data = build_datasets(cfg)
    available = saved_weight_epochs(run_id)
    wanted = available if epochs is None else [e for e in epochs if e in available]
    if not wanted:
        raise AnalysisError(
            f"run {run_id} has no saved weights to re-probe (checkpoints/weights_epoch_XXXX.pt"
            f"{' for epochs ' + str(list(epochs)) if epochs is not None else ''}; it has {available}). "
            "Train with checkpoint_epochs=all (or a list) to keep them."
        )
    record = runs.read_probe_set(run_id, folder)
    if record is not None:
        indices = np.asarray(record["indices"])
        if dataset_size(data.val) != record["dataset_size"] or fingerprint(data.val, indices) != record["fingerprint"]:
            raise AnalysisError(
                f"the validation data{' under ' + data_dir if data_dir else ''} is not the data run {run_id} "
                f"was probed on: its {record['size']} probe images have another fingerprint, or the set has "
                f"{dataset_size(data.val)} images instead of {record['dataset_size']}. Point data_dir at the run's data."
            )
    size = probe_size or (record["size"] if record else cfg.probe_size)
    seed = cfg.probe_seed if probe_seed is None else probe_seed
    try:
        probe_set = ProbeSet.from_dataset(data.val, size, seed, folds=cfg.probe_folds)
    except ValueError as err:
        raise AnalysisError(str(err)) from None
    dev = resolve_device(device)
    model = create_model(cfg, data.num_classes).to(dev)
    out = {}
    for epoch in tqdm(wanted, desc="re-probe", unit="epoch", disable=None):
        artifact_dir, name = tracking.weights_artifact(epoch)
        path = tracking.download(run_id, f"{artifact_dir}/{name}", folder / "weights")
        try:
            weights = tracking.load_checkpoint(path, f"{artifact_dir}/{name} of run {run_id}")
        except ArtifactError as err:
            raise AnalysisError(
                f"{err} Re-probing needs the weights tgo saved; analyse the run's logged geometry instead (without probe_size or data_dir)."
            ) from None
        model.load_state_dict(weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateGeometryWarning)
            out[epoch] = probe_model(model, probe_set.loader(cfg.probe_batch_size, cfg.workers), cfg, dev, keep_covariance=keep_covariance)
        path.unlink()
    return out, size
