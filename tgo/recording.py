"""What a training run writes into its MLflow run: what starts (config, tags, probe set, datasets),
each epoch's record (spectra, kept features, weight spectra, weights, the resumable checkpoint, then
the metrics and the progress line), and how the run closes after an error.

The engine (tgo.train) decides what happens; this module only records it, through tgo.tracking.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from tgo import tracking
from tgo.alarms import EpochAlarms, alarm_rules_line
from tgo.config import TrainConfig
from tgo.errors import StoreWriteError, short_error
from tgo.keys import SE_PREFIX, Tag, head_name, metric_key
from tgo.probe import ProbeResult
from tgo.probeset import dataset_size
from tgo.weights import WeightSpectra

__all__ = [
    "EpochCommitter",
    "cpu_copy",
    "dataset_inputs",
    "progress_line",
    "record_failure",
    "record_probe_start",
    "record_start",
    "record_stop",
    "relog_missing",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# what starts
# --------------------------------------------------------------------------------------------------


def record_start(
    run_id: str,
    cfg: TrainConfig,
    *,
    num_classes: int,
    notes: Sequence[str],
    world: int,
    head: tuple[str, str],
    probe_record: dict | None,
    datasets: list[dict],
    device: torch.device,
    ckpt: dict | None,
    start_epoch: int,
) -> None:
    """The run's config, tags and probe set, and the line that says what starts.

    Args:
        run_id: the MLflow run.
        cfg: the run's config (logged as config/config.json and config.* params).
        num_classes, notes: the data's class count and plain-language notes (tags, and logged lines).
        world: the number of training processes (tgo.world_size).
        head: the (site, view) that feeds the model's head (tgo.head_view, with a probe set).
        probe_record: `ProbeSet.record()`, or None without a probe.
        datasets: `dataset_inputs(...)`, logged for a new run only (a resumed run has them).
        device: the device training runs on (the starting line).
        ckpt: the checkpoint resumed from, or None for a new run.
        start_epoch: the first epoch this call runs.
    """
    tracking.log_config(run_id, cfg.to_dict())
    tags = tracking.base_tags("train", cfg.preset, cfg.dataset, cfg.model)
    tags[Tag.WORLD_SIZE] = str(world)
    _record_probe_set(run_id, cfg, tags, num_classes=num_classes, notes=notes, head=head, probe_record=probe_record)
    for note in notes:
        log.info(note)
    if ckpt is None:
        tracking.log_datasets(run_id, datasets)
    log.info(alarm_rules_line(cfg.alarms, cfg.alarm_action, cfg.probe_folds, cfg.probe_every))
    if ckpt is not None:
        relog_missing(run_id, ckpt)
        tracking.delete_tag(run_id, Tag.STOPPED_BY)  # stopped by an alarm once, it goes on now (tgo.alarm keeps the firing)
        log.info("resuming run %s at epoch %d of %d.", run_id, start_epoch, cfg.epochs)
    elif cfg.resume:
        log.info(
            "run %s stopped before its first checkpoint: it starts again from its initialisation with its own config (%d epochs).",
            run_id,
            cfg.epochs,
        )
    else:
        log.info("run %s: %s on %s, %d epochs, device %s.", run_id, cfg.model, cfg.dataset, cfg.epochs, device)


def _record_probe_set(
    run_id: str,
    cfg: TrainConfig,
    tags: dict[str, str],
    *,
    num_classes: int,
    notes: Sequence[str],
    head: tuple[str, str],
    probe_record: dict | None,
) -> None:
    """`tags` with what every probed run says of its data and probe (classes, data notes, which
    weights, the probe set's fingerprint and the head view), and the probe set's record."""
    tags[Tag.NUM_CLASSES] = str(num_classes)
    tags[Tag.DATA_NOTES] = " ".join(notes)
    tags[Tag.PROBE_WEIGHTS] = cfg.probe_weights
    if probe_record is not None:
        tags[Tag.PROBE_FINGERPRINT] = probe_record["fingerprint"]
        tags[Tag.HEAD_VIEW] = head_name(head)
        tracking.log_json(run_id, probe_record, "probe", "probe_set.json")
    tracking.set_tags(run_id, tags)


def record_probe_start(
    run_id: str,
    cfg: TrainConfig,
    fields: Sequence[str],
    *,
    tags: dict[str, str],
    num_classes: int,
    notes: Sequence[str],
    head: tuple[str, str],
    probe_record: dict,
    dataset: dict | None,
) -> None:
    """What a probe run (`tgo probe`, `GeometryMonitor`) records before its first epoch: the settings
    that apply to a probe (`fields` of cfg, as params config.<field> and config/config.json), its
    tags (tgo.kind=probe, the model, `tags`), the probe set and, for a new run, the probe data as an
    MLflow dataset.

    Args:
        run_id: the run (a new one, one being continued, or the caller's own training run).
        cfg: the probe's settings.
        fields: the names of cfg that a probe uses (the others are training's and say nothing here).
        tags: further tags (what was probed, the checkpoints' layout, the step unit).
        num_classes, notes: the data's class count and plain-language notes.
        head: the (site, view) that feeds the model's head.
        probe_record: `ProbeSet.record()`.
        dataset: the probe data as `dataset_inputs` describes it, logged once; None to skip.
    """
    tracking.log_config(run_id, {name: getattr(cfg, name) for name in fields})
    _record_probe_set(
        run_id,
        cfg,
        {**tracking.base_tags("probe", cfg.preset, cfg.dataset, cfg.model), **tags},
        num_classes=num_classes,
        notes=notes,
        head=head,
        probe_record=probe_record,
    )
    if dataset is not None:
        tracking.log_datasets(run_id, [dataset])
    log.info(alarm_rules_line(cfg.alarms, cfg.alarm_action, cfg.probe_folds, cfg.probe_every))


def dataset_inputs(cfg: TrainConfig, train: Dataset, val: Dataset, num_classes: int, probe_record: dict | None) -> list[dict]:
    """The training and probe data as MLflow datasets. The probe's digest is its fingerprint (the
    first 32 hex digits of tgo.probe_fingerprint: the indices and every probe image's content); the
    training set's, a hash of what identifies it without reading every image (dataset, folder,
    size, classes).

    Args:
        cfg: the run's config (dataset, data_dir, synthetic_train_size, probe_seed).
        train, val: the training and validation sets.
        num_classes: the number of classes (their names where the training set has none).
        probe_record: `ProbeSet.record()`, or None without a probe.
    """
    folder = os.path.realpath(cfg.data_dir) if cfg.data_dir else ""
    classes = getattr(train, "classes", None) or list(range(num_classes))
    identity = json.dumps(
        [
            cfg.dataset,
            folder,
            dataset_size(train),
            [str(c) for c in classes],
            cfg.synthetic_train_size if cfg.dataset == "synthetic" else None,
        ]
    )
    source = {
        "dataset": cfg.dataset,
        "data_dir": folder,
        "train_images": dataset_size(train),
        "val_images": dataset_size(val),
        "classes": num_classes,
    }
    out = [
        {
            "name": f"{cfg.dataset}-train",
            "digest": hashlib.sha256(identity.encode()).hexdigest()[:32],
            "context": "training",
            "source": source,
        }
    ]
    if probe_record is not None:
        out.append(
            {
                "name": f"{cfg.dataset}-probe",
                "digest": probe_record["fingerprint"][:32],
                "context": "probe",
                "source": {**source, "probe_images": len(probe_record["indices"]), "probe_seed": cfg.probe_seed},
            }
        )
    return out


def relog_missing(run_id: str, ckpt: dict) -> None:
    """A run killed after its checkpoint was written but before the epoch's metrics were logged:
    log them now from the checkpoint, so no step goes missing (and none is logged twice).

    Args:
        run_id: the resumed run.
        ckpt: its last checkpoint (its epoch and metrics).
    """
    epoch = int(ckpt["epoch"])
    if epoch not in tracking.logged_steps(run_id, "val/loss"):
        tracking.log_metrics(run_id, ckpt["metrics"], step=epoch)


# --------------------------------------------------------------------------------------------------
# each epoch
# --------------------------------------------------------------------------------------------------


def cpu_copy(obj: Any) -> Any:
    """A snapshot of a (nested) state dict: every tensor copied to the CPU, so that training can go
    on while the snapshot is written.

    Args:
        obj: a tensor, or dicts, lists and tuples of them (other values are kept as they are).
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class EpochCommitter:
    """Writes each epoch's record in this order: spectra, weights, the resumable checkpoint, then the
    metrics (and the progress line). A kill at any point therefore leaves a checkpoint whose epoch's
    artifacts are all there, and metrics only for epochs whose checkpoint exists (a resume re-logs
    the checkpoint's epoch if its metrics are missing). With `background=True` a thread writes while
    the next epoch trains (the checkpoint must then be a snapshot); `wait()` joins and re-raises the
    writer's error. Checkpoints go straight into a local artifact store (`tracking.save_torch`)."""

    def __init__(self, run_id: str, folder: str, background: bool = True) -> None:
        self.run_id, self.folder, self.background = run_id, Path(folder), background
        self.local_dir = tracking.local_artifact_dir(run_id) if run_id else None
        if self.local_dir is not None:  # a write cut short by a kill, before a resume of this run
            for partial in self.local_dir.glob("checkpoints/.*.partial"):
                partial.unlink(missing_ok=True)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.recorded = -1  # the last epoch recorded whole (its metrics logged)
        self.label = ""  # what the progress line names first (a probed checkpoint's file)

    def submit(
        self,
        epoch: int,
        epochs: int,
        checkpoint: dict | None,
        weights: dict | None,
        geometry: ProbeResult | None,
        metrics: dict,
        weight_spectra: WeightSpectra | None = None,
        alarms: tuple[EpochAlarms, list[dict]] | None = None,
    ) -> None:
        """Record one epoch (in the background with `background=True`). `alarms`: what the alarm
        rules found at this epoch and every alarm's first firing so far (the tag tgo.alarm), logged
        after the epoch's metrics."""
        self.wait()
        args = (epoch, epochs, checkpoint, weights, geometry, metrics, weight_spectra, alarms)
        if not self.background:
            self._commit(*args)
            self.wait()  # re-raises the writer's error
            return
        self._thread = threading.Thread(target=self._commit, args=args, daemon=True)
        self._thread.start()

    def _commit(self, epoch, epochs, checkpoint, weights, geometry, metrics, weight_spectra=None, alarms=None) -> None:
        try:
            if geometry is not None:
                artifact_dir, name = tracking.spectra_artifact(epoch)
                tracking.log_file(self.run_id, geometry.save(self.folder / name), artifact_dir)
            if geometry is not None and geometry.features:
                artifact_dir, name = tracking.features_artifact(epoch)
                tracking.log_file(self.run_id, geometry.save_features(self.folder / "features" / name), artifact_dir)
            if weight_spectra is not None:
                artifact_dir, name = tracking.weight_spectra_artifact(epoch)
                path = self.folder / "weights" / name
                path.parent.mkdir(exist_ok=True)
                weight_spectra.save(path)
                tracking.log_file(self.run_id, path, artifact_dir)
            if weights is not None:
                artifact_dir, name = tracking.weights_artifact(epoch)
                tracking.save_torch(self.run_id, weights, artifact_dir, name, self.folder, self.local_dir)
            if checkpoint is not None:  # a probe of someone else's checkpoints writes none of its own
                start = time.perf_counter()
                tracking.save_torch(self.run_id, checkpoint, "checkpoints", "last.pt", self.folder, self.local_dir)
                metrics["time/checkpoint_s"] = time.perf_counter() - start  # I/O a researcher may want to see
            tracking.log_metrics(self.run_id, metrics, step=epoch)
            self.recorded = epoch
            line = progress_line(epoch, epochs, metrics, geometry.head if geometry is not None else None)
            log.info(f"{self.label}: {line}" if self.label else line)
            if alarms is not None:
                record_alarms(self.run_id, *alarms)
        except Exception as err:  # noqa: BLE001 - handed to the training thread by wait()
            # A failure to write to the run's store (read-only, full, out of reach) is said so in one
            # message by run(); anything else is a bug, raised as it is.
            self._error = self._store_error(epoch, err) or err
        except BaseException as err:  # noqa: BLE001
            self._error = err

    def _store_error(self, epoch: int, err: Exception) -> StoreWriteError | None:
        """`err` as the StoreWriteError that names the store which refused the epoch's record, or None
        for an error that is not a store's. A file system's refusal (OSError: a full disk, a folder
        turned read-only) names the folder it came from: the run's local artifact store, or the
        scratch folder (TMPDIR) where artifacts are written before they are logged."""
        what = f"recording epoch {epoch}: {short_error(err)}"
        if isinstance(err, OSError):
            path = Path(err.filename) if isinstance(err.filename, str) else None
            if path is not None and path.is_relative_to(self.folder):
                store = f"the scratch folder {self.folder} (TMPDIR)"
            elif self.local_dir is not None:
                store = f"the artifact store of the run ({self.local_dir})"
            else:
                store = f"the local folder of {path}" if path is not None else "the local file system"
            return StoreWriteError(what, store=store, full=err.errno in (errno.ENOSPC, errno.EDQUOT))
        return StoreWriteError(what) if tracking.is_store_failure(err) else None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def record_alarms(run_id: str, found: EpochAlarms, fired: list[dict]) -> None:
    """An epoch's alarms: one warning line per alarm that fired for the first time, and the tag
    tgo.alarm (every alarm's first firing, as JSON) updated. alarm/<name> is among the metrics."""
    for firing in found.fired:
        log.warning("%s", firing.line())
    if found.fired:
        tracking.set_tags(run_id, {Tag.ALARM: json.dumps(fired, allow_nan=True)})


def record_stop(run_id: str, found: EpochAlarms | None, epochs: int, *, go_on: str = "") -> None:
    """A run ended by an alarm with action stop, after its epoch's record: the tag tgo.stopped_by
    and the line that says how to go on (the run closes FINISHED). `go_on`: that sentence for a run
    that is not tgo train's (tgo probe, GeometryMonitor); by default, train's resume."""
    fired = found.fired if found is not None else []
    epoch = fired[0].epoch if fired else -1
    names = ", ".join(f.alarm for f in fired) or "an alarm"
    tracking.set_tags(run_id, {Tag.STOPPED_BY: json.dumps({"alarms": [f.alarm for f in fired], "epoch": epoch, "of": epochs})})
    go_on = go_on or (
        f"its epochs so far are recorded with their checkpoint. To go on anyway: tgo train --resume {run_id} [--alarm_action warn]."
    )
    log.warning("run %s stopped at epoch %d of %d by %s (alarm_action=stop); %s", run_id, epoch, epochs, names, go_on)


def progress_line(epoch: int, epochs: int, metrics: dict[str, float], head: tuple[str, str] | None) -> str:
    """The one line logged per recorded epoch: losses, accuracy, the effective rank and anisotropy
    of the view that feeds the head (with their jackknife standard errors), and the epoch's time.

    Args:
        epoch, epochs: this epoch and the run's last.
        metrics: the epoch's metrics; what is absent (train/loss at epoch 0, geometry between probed
            epochs) is left out of the line.
        head: the (site, view) that feeds the model's head (`ProbeResult.head`): final/cls for a
            class-token model, final/mean for an average-pooled one; None on an epoch without probe.
    """
    parts = [f"epoch {epoch}/{epochs}"]
    for key, fmt in (("train/loss", "train loss {:.3f}"), ("val/loss", "val loss {:.3f}"), ("val/acc1", "val acc {:.1f}%")):
        if key in metrics:
            parts.append(fmt.format(metrics[key]))
    if head is not None:
        site, view = head
        for observable, label, digits in (("effective_rank", f"{site}/{view} eff. rank", 1), ("spectral_anisotropy", "anisotropy", 3)):
            value = metrics.get(metric_key(site, view, observable))
            if value is not None:
                se = metrics.get(metric_key(site, view, observable, SE_PREFIX))  # its jackknife standard error
                parts.append(f"{label} {value:.{digits}f}" + (f" +- {se:.{digits}f}" if se is not None else ""))
    if "time/epoch_s" in metrics:
        parts.append(f"{metrics['time/epoch_s']:.0f} s")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# how the run closes after an error
# --------------------------------------------------------------------------------------------------


def record_failure(err: BaseException, run_id: str, committer: EpochCommitter, *, stopped: bool) -> str | None:
    """Close the run after `err`: the last good epoch recorded whole first, then the status (KILLED
    for an interrupt or an early stop, else FAILED) with the error.

    Args:
        err: what ended the run.
        run_id: the run to close.
        committer: the run's committer, joined first.
        stopped: `err` is an early stop asked for by an epoch callback (tagged tgo.stopped_early).

    Returns:
        For a tracking store that stopped accepting writes, the one message that replaces MLflow's
        chain of tracebacks (what happened, what is kept and how to resume); None for any other error.
    """
    try:
        committer.wait()  # the last good epoch is recorded whole before the run is closed
    except BaseException:  # noqa: BLE001 - the first error is the one to report
        pass
    message = _store_failure_message(err, run_id, committer.recorded) if tracking.is_store_failure(err) else None
    if stopped:
        tracking.set_tags(run_id, {Tag.STOPPED_EARLY: str(err) or "true"})
    status = "KILLED" if stopped or isinstance(err, KeyboardInterrupt) else "FAILED"
    closed = tracking.end_run(status, message or f"{type(err).__name__}: {err}")  # tgo.error: the message the user sees
    if message is None:
        return None
    if closed:
        return f"{message} The run is marked FAILED."
    return f"{message} The run could not be marked and still reads RUNNING; the resume continues it all the same."


def _store_failure_message(err: BaseException, run_id: str, recorded: int) -> str:
    """What happened (which store refused the record: the tracking store, or the artifact store or
    scratch folder that `err.store` names; full, or not accepting writes), what is kept (the epochs
    recorded whole, up to `recorded`) and the command that continues the run."""
    store = getattr(err, "store", "") or f"the tracking store {tracking.store_name()}"
    full = getattr(err, "full", False)
    kept = (
        f"Epochs up to {recorded} are recorded with their checkpoint."
        if recorded >= 0
        else "No epoch was recorded yet; the resume starts the run again from its initialisation."
    )
    when = "Once there is space again" if full else "When the store is back"
    return (
        f"run {run_id}: {store} {'is full' if full else 'stopped accepting writes'} ({short_error(err)}). {kept} "
        f"{when}, continue with `tgo train --resume {run_id}` (or `mlflow run . -e train -P resume={run_id}`)."
    )
