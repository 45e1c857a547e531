"""tgo's geometry in a training loop of one's own: `GeometryMonitor` probes a model at the epochs you
choose and records each one into an MLflow run as `tgo train` records it (geom/..., geom_se/...,
tokens/..., spectra, kept features at feature_epochs, weight spectra with weight_spectra, the probe
set), so that `tgo analyze` and `tgo compare` take the run as they take a tgo training run.

    monitor = tgo.GeometryMonitor(model, val_dataset, probe_size=512)
    monitor.measure(0)                      # before training: the initialisation
    for epoch in range(1, epochs + 1):
        train_one_epoch(model, ...)
        monitor.measure(epoch)              # epoch = training epochs completed
    monitor.close()

The settings are `tgo train`'s, with its names, defaults and checks (tgo.config.TrainConfig: a
preset, then probe_size, probe_seed, probe_folds, probe_batch_size, probe_patch_tokens,
probe_precision, feature_epochs, weight_spectra, device, ...). The run is the one given
(`run_id`), else the active MLflow run, else a new run in `experiment`. Under torch.distributed each
rank probes its shard of the probe set and the sums are all-reduced; rank 0 records.

Alarms: the run's alarm rules (`alarms`, `alarm_action`: tgo.alarms, as in tgo train; the
default rules warn of a collapse of the head view) are tested at every `measure`, which logs
alarm/<name> and, at a first firing, a warning line and the tag tgo.alarm. With
alarm_action="stop" a firing sets `should_stop`, for the loop to leave:

        if monitor.should_stop:
            break
    monitor.close()                         # the run tagged tgo.stopped_by, FINISHED

Under torch.distributed rank 0 tests the rules and every rank sees the same `should_stop`.

`tgo probe` (tgo.series) measures a series of checkpoints through this class, and
tgo.integrations.lightning.GeometryCallback a Lightning Trainer's epochs.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from tgo import tracking
from tgo.alarms import Alarms, EpochAlarms
from tgo.config import PROBE_FIELDS, TrainConfig, from_overrides
from tgo.errors import ConfigError
from tgo.keys import Tag
from tgo.measure import Measurement, measure
from tgo.probe import head_view, site_names
from tgo.probeset import ProbeSet, dataset_size
from tgo.recording import EpochCommitter, record_probe_start, record_stop
from tgo.runtime import rank0_flag, resolve_device

__all__ = ["GeometryMonitor"]

log = logging.getLogger(__name__)


class GeometryMonitor:
    """Probe `model` at chosen epochs and record each into an MLflow run.

    Args:
        model: a timm ViT (or a module with its token layout: `forward_intermediates`, `patch_embed`).
            Its weights are read as they are when `measure` is called; its mode is restored after.
        probe_data: a map-style dataset of (image, label) already transformed to tensors, or a
            DataLoader over one (its dataset is used): the fixed probe set is drawn from it by
            probe_seed, as training draws it from the validation set.
        run_id: the MLflow run to record into (default: the active run, else a new one).
        tags: further tags for the run (`tgo probe` names its checkpoints' source here).
        progress: a progress bar over each probe's batches (None: only on a terminal).
        data_classes: the classes of the probe data, for the run's record (default: from its labels).
        notes: plain-language facts about the data, logged once and kept in a tag.
        **settings: tgo train's settings (names and checks of tgo.config.TrainConfig, e.g.
            preset="smoke", probe_size=512, probe_folds=10, weight_spectra=True, device="cpu",
            alarms="collapse: final/cls/effective_rank < 0.25*init", alarm_action="stop").

    Attributes:
        alarms: the alarm rules and what they have seen (`tgo.alarms.Alarms`; `load_state` goes on
            from an earlier monitor's `alarms.state()`).
        should_stop: an alarm with alarm_action="stop" has fired (on every rank).
        stopped_by: what the rules found at the epoch where it fired (rank 0), else None.

    Raises:
        ConfigError: a setting that is not valid (an alarm rule among them, or one naming a site the
            model lacks), or a probe set larger than the probe data.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        probe_data: Dataset | DataLoader,
        /,
        *,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        progress: bool | None = None,
        data_classes: int | None = None,
        notes: tuple[str, ...] = (),
        **settings: Any,
    ) -> None:
        unknown = sorted(set(settings) - set(TrainConfig.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"GeometryMonitor: unknown settings {unknown}; the settings are tgo train's (tgo.config.TrainConfig).")
        tags = dict(tags or {})
        if "model" not in settings:  # the run's tgo.model tag names what is probed: a timm name, else the class
            import timm

            name = getattr(model, "default_cfg", {}).get("architecture", "")
            if name and timm.is_model(name):
                settings["model"] = name
            else:
                tags.setdefault(Tag.MODEL, type(model).__name__)
        # The run records the probe's settings and what was given; the data settings a monitor was not
        # given are the preset's, which say nothing of the caller's own data (its class names the data instead).
        measured = ("weight_spectra", "feature_epochs", "alarms", "alarm_action")  # recorded whether given or not
        self.fields = [f for f in PROBE_FIELDS if f.startswith("probe_") or f in measured or f in settings]
        dataset_of = probe_data.dataset if isinstance(probe_data, DataLoader) else probe_data
        if "dataset" not in settings:
            tags.setdefault(Tag.DATASET, type(dataset_of).__name__)
        self.cfg: TrainConfig = _config(settings)
        self.model = model
        self.alarms = Alarms.for_sites(self.cfg.alarms, self.cfg.alarm_action, site_names(model), head_view(model))
        self.stopped_by: EpochAlarms | None = None
        self._should_stop = self._stop_recorded = False
        self.device = resolve_device(self.cfg.device) if "device" in settings else _device_of(model)
        dataset = probe_data.dataset if isinstance(probe_data, DataLoader) else probe_data
        try:
            self.probe_set = ProbeSet.from_dataset(dataset, self.cfg.probe_size, self.cfg.probe_seed, folds=self.cfg.probe_folds)
        except ValueError as err:  # a probe larger than the data
            raise ConfigError(str(err)) from None
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank, world = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        self.main = rank == 0
        self.loader = self.probe_set.loader(self.cfg.probe_batch_size, self.cfg.workers, self.device.type == "cuda", rank, world)
        self.progress, self.tags = progress, tags
        self.data_classes, self.notes = data_classes, tuple(notes)
        self._run_id = run_id or ""
        self._opened = False  # this monitor made the run (and closes it)
        self.folder = Path(tempfile.mkdtemp(prefix="tgo-monitor-"))
        self._committer: EpochCommitter | None = None
        self.previous_features: dict | None = None
        self.measured: dict[int, Measurement] = {}

    @property
    def should_stop(self) -> bool:
        """An alarm with alarm_action="stop" fired at a measured epoch (and stays True): the loop
        should end there. The same on every rank under torch.distributed."""
        return self._should_stop

    @property
    def run_id(self) -> str:
        """The run recorded into ("" before the first `measure`, and on every rank but 0)."""
        return self._run_id

    def record_into(self, run_id: str) -> None:
        """Record into `run_id` from the next `measure` on (before the first one)."""
        if self._committer is not None:
            raise RuntimeError("GeometryMonitor.record_into: the monitor has started recording into a run already.")
        self._run_id = run_id

    def _start(self) -> None:
        """Find or open the run and record the probe's settings, tags and probe set (rank 0)."""
        if not self._run_id:
            self._run_id = tracking.active_run_id()
        if not self._run_id:
            self._run_id = tracking.new_run(self.cfg.experiment, self.cfg.run_name)
            self._opened = True
        run = tracking.get_run(self._run_id)
        record = self.probe_set.record()
        probed_on = run.data.tags.get(Tag.PROBE_FINGERPRINT)
        if probed_on and probed_on != record["fingerprint"]:
            raise ConfigError(
                f"run {self._run_id} was probed on other images (probe fingerprint {probed_on[:12]}, these are "
                f"{record['fingerprint'][:12]}); use the run's own data and probe settings, or record into a new run."
            )
        classes = self.data_classes if self.data_classes is not None else _count_classes(self.probe_set)
        dataset = {
            "name": f"{self.tags.get(Tag.DATASET, self.cfg.dataset)}-probe",
            "digest": record["fingerprint"][:32],
            "context": "probe",
            "source": {
                "probe_images": len(record["indices"]),
                "probe_seed": self.cfg.probe_seed,
                "images": dataset_size(self.probe_set.dataset),
            },
        }
        record_probe_start(
            self._run_id,
            self.cfg,
            self.fields,
            tags=self.tags,
            num_classes=classes,
            notes=self.notes,
            head=head_view(self.model),
            probe_record=record,
            dataset=None if probed_on else dataset,
        )
        self._committer = EpochCommitter(self._run_id, str(self.folder), background=False)

    def measure(self, epoch: int, *, label: str = "", record: dict | None = None) -> Measurement:
        """Probe the model as it is now, as epoch `epoch` (training epochs completed; 0 before any
        training), test the alarm rules on it and record it: spectra and kept features first, then
        the metrics at step `epoch` (alarm/<name> among them), one summary line (named `label`, if
        given), and a warning line and the tag tgo.alarm for an alarm that fires. Every rank calls it
        under torch.distributed; rank 0 records.

        `record`: what else to keep of this epoch (tgo probe: the checkpoint measured), logged with
        the alarms' state as probe/checkpoints/step_XXXXXX.json before the epoch's metrics, so that
        every epoch counted as measured has it and a later probe of the run goes on from it.

        Returns the measurement (its `alarms`: what the rules found, on rank 0)."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ConfigError(f"epoch: expected a whole number >= 0 (training epochs completed, 0 = before training), got {epoch!r}.")
        if self.main and self._committer is None:
            self._start()
        m = measure(
            self.model,
            self.loader,
            self.cfg,
            self.device,
            epoch=epoch,
            distributed=self.distributed,
            main=self.main,
            progress=self.main and self.progress,
            previous_features=self.previous_features,
            alarms=self.alarms,
        )
        if m.geometry is not None and m.geometry.features:
            self.previous_features = m.geometry.features
        if self.main:
            assert self._committer is not None  # started above
            if record is not None:
                tracking.log_json(self._run_id, {**record, "alarms": self.alarms.state()}, *tracking.step_record_artifact(epoch))
            self._committer.label = label
            found = (m.alarms, self.alarms.summary()) if m.alarms is not None else None
            self._committer.submit(epoch, self.cfg.epochs, None, None, m.geometry, dict(m.metrics), m.weights, alarms=found)
            if m.geometry is not None and m.geometry.degenerate():
                tracking.set_tags(self._run_id, {Tag.DEGENERATE_VIEWS: ",".join(m.geometry.degenerate())})
        # Rank 0 tests the rules and tells every rank (a broadcast only where the action is stop).
        if rank0_flag(m.alarms is not None and m.alarms.stop, self.distributed and self.alarms.action == "stop") and not self._should_stop:
            self._should_stop, self.stopped_by = True, m.alarms
        self.measured[epoch] = m
        return m

    def record_stop(self, go_on: str = "") -> bool:
        """Tag the run tgo.stopped_by (once, rank 0) when a stop alarm fired at the last epoch
        measured, that is, the loop did stop there (a loop that went on past it was not stopped).
        `go_on`: the sentence that says how to continue (tgo probe has its own). `close` calls it.
        Returns whether the run is tagged."""
        stopped = self.stopped_by
        if not (self.main and self._run_id and stopped is not None and stopped.fired and self.measured):
            return False
        if max(self.measured) != stopped.fired[0].epoch:
            return False
        if not self._stop_recorded:
            record_stop(
                self._run_id,
                stopped,
                self.cfg.epochs,
                go_on=go_on or "its epochs so far are recorded; a loop that records into the run again goes on from there.",
            )
            self._stop_recorded = True
        return True

    def close(self, status: str = "FINISHED") -> None:
        """Close the run if this monitor opened it (a run given, or the caller's active run, is the
        caller's to close), after `record_stop` when it ends well, and remove the working folder."""
        if status == "FINISHED":
            self.record_stop()
        if self._opened and self._run_id:
            tracking.finish(self._run_id, status)
            self._opened = False
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> GeometryMonitor:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close("FINISHED" if exc_type is None else "FAILED")


def _config(settings: dict[str, Any]) -> TrainConfig:
    """The probe's TrainConfig from tgo train's settings. Probing the EMA of a checkpoint needs no
    EMA in training, so probe_weights=ema stands on its own here."""
    values = dict(settings)
    if values.get("probe_weights") == "ema":
        values.setdefault("model_ema", True)
    values.setdefault("probe_every", 1)
    cfg, _ = from_overrides(values)
    return cfg


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _count_classes(probe_set: ProbeSet) -> int:
    """The classes the data holds, from its `classes` attribute, or else the probe images' labels."""
    classes = getattr(probe_set.dataset, "classes", None)
    if classes is not None:
        return len(classes)
    labels = {int(probe_set.dataset[int(i)][1]) for i in probe_set.indices}
    return len(labels)
