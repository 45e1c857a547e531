"""`tgo probe`: a series of checkpoints trained anywhere (timm's train.py, DeiT, PyTorch Lightning,
the Hugging Face Trainer, bare weight files) becomes a tgo run, with the keys and artifacts a tgo
training run has where they apply, so that `tgo analyze`, `tgo compare` and the notebooks take it as
they take a training run.

    from tgo.series import probe_checkpoints
    result = probe_checkpoints("output/train/vit-run", model="vit_small_patch16_224", dataset="imagenet100",
                               data_dir="/data/imagenet100", img_size=224)
    result.run_id, result.probed                    # the run, and the steps probed by this call

The step is tgo's epoch, training epochs completed (tgo.checkpoints explains each trainer's rule).
Incremental: run again on the same source (found by the run's tag tgo.probed, or `run_id`), only
the checkpoints not yet measured are probed; `follow` keeps watching the source while another
process trains and probes each new checkpoint once the folder has been quiet for one poll, until the
step `follow_until` or `follow_timeout` seconds without a new checkpoint.

The run's alarm rules (`alarms`, `alarm_action`: tgo.alarms, as in tgo train) are tested at every
step. What they have seen rides in each step's record (probe/checkpoints/step_XXXXXX.json), so a
later probe of the run, or `follow` started again, goes on from it. With alarm_action=stop a firing
ends the probe after that step's record (FINISHED, tagged tgo.stopped_by; `follow` stops
following); probing the run again goes on with the next steps, and the alarm that fired does not
stop it again.

Bad input (nothing found, a file that is not a checkpoint, another architecture, two different
checkpoints claiming one step, a file that needs unpickling without `trust_checkpoints`) is
refused before a run is made.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from tgo import tracking
from tgo.checkpoints import (
    Checkpoint,
    Series,
    WeightsChoice,
    architecture,
    find_checkpoints,
    fit_state_dict,
    load_weights,
    saved_args,
    vit_state_dict,
)
from tgo.config import PROBE_FIELDS, TrainConfig
from tgo.data import build_datasets
from tgo.errors import ConfigError, TgoError, TrackingError
from tgo.keys import Tag
from tgo.model import create_model
from tgo.monitor import GeometryMonitor, _config
from tgo.probe import ProbeResult, head_view

__all__ = ["SeriesResult", "probe_checkpoints"]

log = logging.getLogger(__name__)

STEP_UNITS = {"epochs": "epochs", "steps": "optimizer_steps"}  # Series.unit -> the run's tag tgo.step_unit
PROBED_METRIC = "time/probe_s"  # logged last at every probed step: a step that has it is recorded whole
Normalize = Literal["dataset", "model"]


@dataclass(frozen=True)
class Watch:
    """What --follow watches: the source (as given), how its files are read, when to stop."""

    source: str
    epoch: int | None
    weights: WeightsChoice
    until: int | None
    timeout: float
    poll_s: float


@dataclass
class SeriesResult:
    """What `probe_checkpoints` did.

    Attributes:
        run_id: the probe run.
        series: the checkpoints found (the last scan, with `follow`).
        probed: the steps this call probed, in order.
        skipped: the steps the run had already measured.
        metrics: each probed step's metrics.
        head: the (site, view) that feeds the model's head.
        stopped_by: the alarm(s) with alarm_action=stop that ended this call's probe (tag
            tgo.stopped_by), or "".
        stopped_at: the step where they fired, or None.
        alarms: each alarm's first firing in the run so far (the tag tgo.alarm).
    """

    run_id: str
    series: Series
    probed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    head: tuple[str, str] = ("final", "cls")
    stopped_by: str = ""
    stopped_at: int | None = None
    alarms: list[dict] = field(default_factory=list)


def _source_key(source: str) -> str:
    """The source as the run's tag names it: an absolute path (a glob stays a pattern)."""
    return os.path.abspath(os.path.expanduser(source))


def _settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The given settings among PROBE_FIELDS ("" is the preset's value, as for tgo train)."""
    unknown = sorted(set(settings) - set(PROBE_FIELDS))
    if unknown:
        raise ConfigError(f"tgo probe: unknown settings {unknown}; it takes {', '.join(PROBE_FIELDS)}.")
    return {k: v for k, v in settings.items() if v is not None and not (isinstance(v, str) and v.strip() == "")}


def probe_checkpoints(
    checkpoints: str,
    *,
    run_id: str = "",
    epoch: int | None = None,
    normalize: Normalize = "dataset",
    trust_checkpoints: bool = False,
    follow: bool = False,
    follow_until: int | None = None,
    follow_timeout: float = 600.0,
    poll_s: float = 2.0,
    **settings: Any,
) -> SeriesResult:
    """Probe every checkpoint under `checkpoints` into one run.

    Args:
        checkpoints: a checkpoint file, a glob, or a folder (tgo.checkpoints lists the layouts).
        run_id: the probe run to continue (default: the run of the same source, model and
            experiment if there is one, else a new run; under `mlflow run`, its run).
        epoch: the step of a single file that carries no epoch (default 0).
        normalize: "dataset", as tgo train normalises the dataset, or "model", the model's own
            data config (timm's resolve_data_config), for released weights trained with other statistics.
        trust_checkpoints: let files be unpickled beyond tensors (only files you trust).
        follow: keep watching the source for new checkpoints (another process trains).
        follow_until: with follow, stop once the checkpoint of this step is probed.
        follow_timeout: with follow, stop after this many seconds without a new checkpoint.
        poll_s: with follow, seconds between looks at the source.
        **settings: tgo train's settings that apply to a probe (tgo.config.PROBE_FIELDS: model,
            img_size, patch_size, depth, num_classes (0: the checkpoint's head), dataset, data_dir,
            probe_size, probe_seed, probe_folds, probe_batch_size, probe_patch_tokens, probe_weights,
            feature_epochs, weight_spectra, alarms, alarm_action, device, experiment, run_name, ...).

    Raises:
        ConfigError: bad input (see the module docstring; an alarm rule that does not parse, or
            names a site the model lacks, among it), before any run is made.
    """
    given = _settings(settings)
    weights = given.get("probe_weights", "model")
    # Every setting checked before the source is read or the store touched; feature_epochs once the
    # series' last step is known (its "last", and the steps it may name, depend on it).
    _config({k: v for k, v in given.items() if k != "feature_epochs"})
    if normalize not in ("dataset", "model"):
        raise ConfigError(f"normalize: choose dataset or model, got {normalize!r}.")
    if follow_until is not None and follow_until < 0:
        raise ConfigError(f"follow_until: expected a step >= 0, got {follow_until}.")
    if follow_timeout <= 0 or poll_s <= 0:
        raise ConfigError("follow_timeout and the poll interval must be positive numbers of seconds.")
    source = _source_key(checkpoints)
    series = _first_series(checkpoints, epoch, trust_checkpoints, weights, follow, follow_timeout, poll_s)
    last_step = max([c.step for c in series.checkpoints] + ([follow_until] if follow_until is not None else []))
    cfg = _config({**given, "epochs": max(last_step, 1)})  # feature_epochs' "last" is the series' last step
    for line in series.describe():
        log.info("checkpoint %s", line)
    for note in series.notes:
        log.info("note: %s", note)

    # ---- the model and the data, checked on the first checkpoint before a run exists ----
    first = series.checkpoints[0]
    first_state = vit_state_dict(load_weights(first, cfg.probe_weights, trust=trust_checkpoints, mmap=True))
    head_classes = architecture(first_state).get("num_classes")
    data = build_datasets(_replace(cfg, num_classes=0))
    num_classes = cfg.num_classes or head_classes or data.num_classes
    tracking.check_tracking()
    model = create_model(cfg, num_classes)
    fit_state_dict(model, first_state, str(first.path), model_name=cfg.model, args=saved_args(first, trust=trust_checkpoints))
    del first_state
    if normalize == "model":
        from timm.data import resolve_data_config

        data = build_datasets(_replace(cfg, num_classes=0), resolve_data_config({}, model=model))

    monitor = GeometryMonitor(  # the alarm rules' sites are held to the model's here, before any run
        model,
        data.val,
        tags={
            Tag.PROBED: source,
            Tag.PROBED_LAYOUT: ",".join(series.layouts),
            Tag.STEP_UNIT: STEP_UNITS[series.unit],
            Tag.NORMALIZE: normalize,
        },
        data_classes=data.num_classes,
        notes=tuple(data.notes),
        **{k: getattr(cfg, k) for k in PROBE_FIELDS},
        epochs=cfg.epochs,
    )

    try:  # the monitor's working folder goes however the command ends
        watch = Watch(checkpoints, epoch, weights, follow_until, follow_timeout, poll_s) if follow else None
        return _record(monitor, series, model, cfg, source, run_id, normalize, trust_checkpoints, watch)
    finally:
        monitor.close()


def _record(
    monitor: GeometryMonitor,
    series: Series,
    model,
    cfg: TrainConfig,
    source: str,
    run_id: str,
    normalize: str,
    trust: bool,
    watch: Watch | None,
) -> SeriesResult:
    """Open (or continue) the run and probe every checkpoint of `series` not yet in it."""
    # ---- the run: the one given, or the one of this source, model, weights and probe set, or a new one ----
    existing = _existing_run(run_id, source, cfg, {Tag.PROBE_FINGERPRINT: monitor.probe_set.fingerprint, Tag.NORMALIZE: normalize})
    if existing:
        tracking.claim(tracking.get_run(existing))  # refused while another live process probes it
    active = tracking.start_run(cfg.experiment, cfg.run_name or f"probe-{Path(source).name}-{cfg.model}", existing)
    rid = active.info.run_id
    lease = tracking.Lease(rid).start()
    monitor.record_into(rid)
    result = SeriesResult(rid, series, head=head_view(model))
    try:
        done = set(tracking.logged_steps(rid, PROBED_METRIC))
        if done:
            log.info("run %s already has steps %s; probing only the others.", rid, sorted(done))
            todo = [c.step for c in series.checkpoints if c.step not in done]
            monitor.previous_features = _kept_features_before(rid, min(todo) if todo else max(done) + 1, monitor.folder)
            if monitor.alarms:
                monitor.alarms.load_state(_alarm_state(rid, max(done), monitor.folder))
            if todo or watch is not None:  # stopped by an alarm once, it goes on now (tgo.alarm keeps the firing)
                tracking.delete_tag(rid, Tag.STOPPED_BY)
        _probe_all(series, done, model, monitor, cfg, trust, result)
        if watch is not None and not monitor.should_stop:
            _follow(watch, done, model, monitor, cfg, trust, result)
        result.alarms = monitor.alarms.summary()
        if monitor.should_stop and monitor.stopped_by is not None:
            result.stopped_by = ",".join(f.alarm for f in monitor.stopped_by.fired)
            result.stopped_at = monitor.stopped_by.fired[0].epoch
            monitor.record_stop(
                go_on="its steps so far are recorded. tgo probe of the same checkpoints again probes the rest "
                "(the alarm that fired does not stop it again; --alarm_action warn lets none stop it)."
            )
        tracking.end_run("FINISHED")
    except BaseException as err:
        tracking.end_run("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", short(err))
        raise
    finally:
        lease.stop()
    return result


def _kept_features_before(run_id: str, step: int, folder: Path) -> dict | None:
    """The run's kept features of its last kept step before `step` (for similarity/<site>/cka_previous
    of the next one, as an uninterrupted probe would have it), or None."""
    folder_name, _ = tracking.features_artifact(0)
    kept = sorted(int(Path(n).stem.split("_")[-1]) for n in tracking.artifact_names(run_id, folder_name) if n.endswith(".npz"))
    earlier = [e for e in kept if e < step]
    if not earlier:
        return None
    return ProbeResult.load_features(tracking.download(run_id, "/".join(tracking.features_artifact(earlier[-1])), folder))


def _alarm_state(run_id: str, step: int, folder: Path) -> dict | None:
    """What the alarms had seen after `step` (its record), or None for a run probed before its
    records kept it: its alarms then start again from the next step (their init is that step's)."""
    artifact_dir, name = tracking.step_record_artifact(step)
    try:
        path = tracking.download(run_id, f"{artifact_dir}/{name}", folder / "records")
        state = json.loads(path.read_text()).get("alarms")
    except (TrackingError, OSError, ValueError):
        state = None
    if state is None:
        log.info("run %s keeps no alarm state at step %d; its alarms start again from the next step probed.", run_id, step)
    return state


def short(err: BaseException) -> str:
    return str(err) if isinstance(err, TgoError) else f"{type(err).__name__}: {err}"


def _replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, **changes)


def _first_series(source: str, epoch, trust: bool, weights, follow: bool, timeout: float, poll_s: float) -> Series:
    """The series under `source`; with follow, waits (up to `timeout`) for its first checkpoint."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return find_checkpoints(source, epoch=epoch, trust=trust, weights=weights)
        except ConfigError:
            if not follow or not _watchable(source) or time.monotonic() > deadline:
                raise
        log.info("waiting for a first checkpoint under %s ...", source)
        time.sleep(poll_s)


def _watchable(source: str) -> bool:
    """A source that can gain checkpoints: an existing folder, or a glob whose folder exists."""
    path = Path(os.path.expanduser(source))
    return path.is_dir() or (not path.exists() and path.parent.is_dir() and any(ch in path.name for ch in "*?["))


def _existing_run(run_id: str, source: str, cfg: TrainConfig, probe: dict[str, str]) -> str:
    """The run to continue: `run_id` (checked to be a probe run), else the newest probe run in the
    experiment of this source, model, weights (probe_weights) and probe (`probe`: the probe set's
    fingerprint and the normalisation), else ""."""
    if run_id:
        tags = tracking.get_run(run_id).data.tags
        kind = tags.get(Tag.KIND, "")
        if kind and kind != "probe":
            raise ConfigError(f"run_id: run {run_id} is a {kind} run; tgo probe continues probe runs (tag tgo.kind=probe).")
        if tags.get(Tag.PROBED) and tags[Tag.PROBED] != source:
            log.warning("run %s probed %s before; it continues with %s.", run_id, tags[Tag.PROBED], source)
        return run_id
    same = {
        Tag.KIND: "probe",
        Tag.PROBED: source,
        Tag.MODEL: cfg.model,
        Tag.PROBE_WEIGHTS: cfg.probe_weights,
        **probe,
    }
    return tracking.find_run(cfg.experiment, same)


def _probe_all(
    series: Series, done: set[int], model, monitor: GeometryMonitor, cfg: TrainConfig, trust: bool, result: SeriesResult
) -> None:
    """Probe each checkpoint of `series` whose step is not in `done`, one loaded at a time."""
    todo = [c for c in series.checkpoints if c.step not in done]
    result.skipped.extend(sorted(c.step for c in series.checkpoints if c.step in done))
    for c in tqdm(todo, desc="checkpoints", unit="ckpt", disable=None):
        _probe_one(c, model, monitor, cfg, trust, result)
        done.add(c.step)
        if monitor.should_stop:  # an alarm with action stop fired: the later steps stay unprobed
            return


def _probe_one(c: Checkpoint, model, monitor: GeometryMonitor, cfg: TrainConfig, trust: bool, result: SeriesResult) -> None:
    state = fit_state_dict(model, load_weights(c, cfg.probe_weights, trust=trust, mmap=True), str(c.path), model_name=cfg.model)
    with torch.no_grad():
        model.load_state_dict(state)
    del state
    record = {"step": c.step, "file": str(c.path), "layout": c.layout, "source_epoch": c.source_epoch, "copies": [str(p) for p in c.copies]}
    m = monitor.measure(c.step, label=c.name, record=record)  # the record, with the alarms' state, before the step's metrics
    result.probed.append(c.step)
    result.metrics[c.step] = m.metrics


def _snapshot(source: str) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under the source: a folder that is quiet between two looks has
    no checkpoint half written."""
    path = Path(os.path.expanduser(source))
    files = path.rglob("*") if path.is_dir() else (Path(p) for p in glob.glob(os.path.expanduser(source)))
    out = {}
    for f in files:
        try:
            st = f.stat()
        except OSError:  # removed between the listing and the look
            continue
        if f.is_file():
            out[str(f)] = (st.st_size, st.st_mtime_ns)
    return out


def _follow(watch: Watch, done: set[int], model, monitor: GeometryMonitor, cfg: TrainConfig, trust: bool, result: SeriesResult) -> None:
    """Watch the source and probe each new checkpoint once the source has been quiet for a poll."""
    last_new = time.monotonic()
    before = _snapshot(watch.source)
    while watch.until is None or watch.until not in done:
        if time.monotonic() - last_new > watch.timeout:
            log.info("no new checkpoint under %s for %.0f s; stopping.", watch.source, watch.timeout)
            return
        time.sleep(watch.poll_s)
        if not _watchable(watch.source) and not Path(os.path.expanduser(watch.source)).exists():
            raise ConfigError(
                f"checkpoints: {watch.source} disappeared while tgo probe --follow watched it; steps {sorted(done)} are recorded."
            )
        now = _snapshot(watch.source)
        if now != before:  # something is being written: look again after the next poll
            before = now
            continue
        series = find_checkpoints(watch.source, epoch=watch.epoch, trust=trust, weights=watch.weights)
        new = [c for c in series.checkpoints if c.step not in done]
        if new:
            result.series = series
            for c in new:
                _probe_one(c, model, monitor, cfg, trust, result)
                done.add(c.step)
                if monitor.should_stop:  # an alarm with action stop fired: following ends here
                    return
            last_new = time.monotonic()
