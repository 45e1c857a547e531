"""Optuna studies over training hyperparameters, each trial a child MLflow run with its geometry.

    from tgo.study import study
    result = study(20, objectives="val/acc1:max", preset="demo", epochs=5)
    result = study(20, objectives="val/acc1:max,geom/final/cls/effective_rank:max")   # Pareto

- The search space is a YAML file (tgo/data/search_space.yaml, shipped with the package, by default;
  see its header for the format).
- Objectives: any per-epoch metric a training run logs (train/loss, train/acc1, val/loss,
  val/acc1, val/acc5) or any geometry key geom/<site>/<view>/<observable>, each with :max or
  :min, the value at the last epoch. Several make a multi-objective study (Pareto front).
- Pruning (single objective): the objective is reported every epoch and the pruner (MedianPruner
  by default) stops unpromising trials, each judged only after its own warm-up epochs; their runs
  end as KILLED with tgo.stopped_early.
- Pruning on geometry (any study): with alarm_action=stop, a trial whose alarm (tgo.alarms) is in
  alarm at a probed epoch is pruned there, before the pruner judges it, instead of ending FINISHED as
  a lone run would: it is a trial the study gave up, like the pruner's. Either way the trial is
  PRUNED with TrialAttr.PRUNED_BY ("pruner" or "alarm") and PRUNED_BECAUSE, its run KILLED with
  tgo.stopped_early, tgo.trial_state PRUNED, tgo.pruned_by and the reason (for an alarm, its firing
  with the numbers) in the run's note; the summary counts the two apart.
- A trial that raises is recorded as FAIL (its run as FAILED) and the study goes on.
- Storage (tgo.storage): SQLite by default, journal:PATH for several processes on one machine,
  PostgreSQL across machines; load_if_exists resumes a study; heartbeats retry dead workers'
  trials on RDB storages, and a PID check does it for journal storages.
- The parent run (tgo.kind=study) gets Optuna's matplotlib figures (optimisation history,
  parameter importances, intermediate values, Pareto front, in figure_format) and a table of Spearman's rho between
  each hyperparameter and each final-epoch observable of the head view (final/cls) across the completed trials,
  and what the geometry says about accuracy across them (`tgo.accuracy.over_runs`: every site/view's
  final-epoch observables against the trial's final val/acc1, the trial each would pick next to the
  one accuracy picks; tables/accuracy_correlation.csv);
  the trials table has a pruned_by column, the parent the metrics study/<state> (`keys.study_key`),
  and the figures count the pruner's prunes and the alarms' apart (the intermediate values draw
  alarm-pruned trials dashed).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeGuard, cast

import numpy as np
import optuna
import pandas as pd
import scipy.stats
import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from optuna.trial import TrialState

from tgo import accuracy, plots, tracking, train
from tgo.alarms import ALARM_PREFIX, Firing
from tgo.config import FIELD_TYPES, TrainConfig, from_dict, from_overrides
from tgo.errors import ConfigError, short_error
from tgo.keys import HEAD_VIEW, METRIC_PREFIX, Tag, TrialAttr, best_key, metric_key, parse_head, parse_metric_key, study_key
from tgo.outputs import OutputFolder
from tgo.spectral import OBSERVABLE_NAMES
from tgo.storage import mark_worker, open_storage, optuna_errors_only, reclaim_dead_trials
from tgo.workers import RESUME_REFUSED, fail_dead_run, parent_run, retried_run, trial_started

DEFAULT_SPACE = Path(__file__).resolve().parent / "data" / "search_space.yaml"  # shipped inside the package
SCALAR_OBJECTIVES = ("train/loss", "train/acc1", "val/loss", "val/acc1", "val/acc5")
PRUNERS = ("median", "hyperband", "successive_halving", "none")
PRUNER, ALARM, SURPLUS = "pruner", "alarm", "surplus"  # what pruned a trial (TrialAttr.PRUNED_BY; surplus: no slot was left)

log = logging.getLogger(__name__)


@dataclass
class StudyResult:
    study_name: str
    parent_run_id: str
    trials: pd.DataFrame  # number, state, values, params, run id
    best_trials: list[int]
    correlations: pd.DataFrame | None = None
    accuracy: pd.DataFrame | None = None  # tgo.accuracy.over_runs across the completed trials (3 or more)
    notes: list[str] = field(default_factory=list)


def parse_objectives(text: str) -> tuple[list[str], list[Literal["maximize", "minimize"]]]:
    """ "val/acc1:max,geom/final/cls/effective_rank:max" -> (metrics, directions)."""
    metrics: list[str] = []
    directions: list[Literal["maximize", "minimize"]] = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        name, _, direction = part.rpartition(":")
        if not name:
            name, direction = direction, "max"
        if direction not in ("max", "min"):
            raise ConfigError(f"objectives: {part!r} must end in :max or :min.")
        parts = parse_metric_key(name)
        if name not in SCALAR_OBJECTIVES and not (parts and parts.prefix == METRIC_PREFIX and parts.observable in OBSERVABLE_NAMES):
            raise ConfigError(
                f"objectives: unknown metric {name!r}; use one of {', '.join(SCALAR_OBJECTIVES)} or "
                f"geom/<site>/<view>/<observable> with an observable of {', '.join(OBSERVABLE_NAMES)}."
            )
        metrics.append(name)
        directions.append("maximize" if direction == "max" else "minimize")
    if not metrics:
        raise ConfigError("objectives: give at least one metric, e.g. val/acc1:max.")
    return metrics, directions


def _finite_number(v: object) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_search_space(path: str | Path) -> dict[str, dict]:
    """Read and check a search space file (format in tgo/data/search_space.yaml)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search_space: {path} does not exist.")
    try:
        space = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"search_space: {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(space, dict) or not space:
        raise ConfigError(
            f"search_space: {path} is empty; name at least one setting, e.g. lr: {{type: float, low: 1e-4, high: 1e-2, log: true}}."
        )
    for name, spec in space.items():
        where = f"search_space: {path}: {name}"
        if name not in FIELD_TYPES or name in ("seed", "preset", "resume"):
            raise ConfigError(f"{where} is not a tgo train setting that a study can vary.")
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            raise ConfigError(f"{where} needs type: float, int or categorical.")
        if spec["type"] == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                raise ConfigError(f"{where} needs a non-empty list of choices.")
        else:
            low, high = spec.get("low"), spec.get("high")
            if not (_finite_number(low) and _finite_number(high)) or low > high:
                raise ConfigError(f"{where} needs finite numbers low <= high, got low={low!r}, high={high!r}.")
            if spec.get("log") and low <= 0:
                raise ConfigError(f"{where}: a log scale needs low > 0.")
    return space


def check_space(space: dict[str, dict], cfg: TrainConfig) -> None:
    """Every value the space can suggest, checked against the train config's ranges before the first
    trial (a categorical's choices, a range's bounds), with the study's other settings (`cfg`): a
    space whose values are invalid would otherwise spend the whole study on failing trials."""
    for name, spec in space.items():
        values = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        for value in values:
            if spec["type"] == "int":
                value = int(value)
            try:
                from_dict({**cfg.to_dict(), name: value})
            except ConfigError as err:
                raise ConfigError(f"search_space: {name} = {value!r} is not a valid setting: {err}") from None


def suggest(trial: optuna.Trial, space: dict[str, dict]) -> dict:
    params = {}
    for name, spec in space.items():
        if spec["type"] == "float":
            params[name] = trial.suggest_float(name, spec["low"], spec["high"], log=bool(spec.get("log")))
        elif spec["type"] == "int":
            params[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
        else:
            params[name] = trial.suggest_categorical(name, spec["choices"])
    return params


def _alarm_reason(run_id: str, names: list[str], epoch: int) -> str:
    """Why a trial is pruned by its alarms `names` at `epoch`: each one's first firing with its
    numbers, as the run's tag tgo.alarm holds it (written with the epoch's record, before the epoch
    callback; a retried trial's run may have fired before the worker died)."""
    try:
        fired = [Firing(**f) for f in json.loads(tracking.get_run(run_id).data.tags.get(Tag.ALARM, "[]"))]
    except (ValueError, TypeError):  # a tag another tgo version wrote: the names still say it
        fired = []
    lines = [f.line() for f in fired if f.alarm in names]  # "alarm <name> at epoch <first firing>: <numbers>"
    if not lines:
        return f"pruned by an alarm at epoch {epoch} (alarm_action=stop): {', '.join(names)} in alarm"
    return f"pruned by an alarm at epoch {epoch} (alarm_action=stop): {'; '.join(lines)}"


def _pruner(name: str) -> optuna.pruners.BasePruner:
    makers: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "none": optuna.pruners.NopPruner,
    }
    return makers[name]()


@optuna_errors_only()
def study(
    n_trials: int,
    *,
    objectives: str = "val/acc1:max",
    search_space: str | Path = DEFAULT_SPACE,
    storage: str = "",
    study_name: str = "tgo-study",
    pruner: str = "median",
    experiment: str = "",
    sampler_seed: int = 0,
    enqueue: list[dict] | None = None,
    figure_format: Literal["png", "pdf", "svg"] = "png",
    **train_overrides,
) -> StudyResult:
    """Run (or join, or resume) an Optuna study of n_trials in all; this process is one worker.

    enqueue: configurations to try first (Optuna's enqueue_trial), when the study is new;
    figure_format: png, pdf or svg, the parent run's figures."""
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"n_trials: expected an integer >= 1, got {n_trials!r}.")
    plots.check_format(figure_format)
    if pruner not in PRUNERS:
        raise ConfigError(f"pruner: unknown pruner {pruner!r}; choose one of {', '.join(PRUNERS)}.")
    if train_overrides.get("resume") not in (None, ""):
        raise ConfigError(RESUME_REFUSED.format(what="study", unit="trial"))
    metrics, directions = parse_objectives(objectives)
    space = load_search_space(search_space)
    cfg, given = from_overrides(train_overrides)
    clash = sorted(set(space) & given)
    if clash:
        raise ConfigError(f"{', '.join(clash)}: set by the search space and by a parameter; drop one.")
    check_space(space, cfg)
    tracking.check_tracking()
    store = open_storage(storage, on_dead_trial=fail_dead_run, tracking=tracking.tracking_uri())
    sampler = PerTrialSeed(optuna.samplers.TPESampler if len(metrics) == 1 else optuna.samplers.NSGAIISampler, sampler_seed)
    study_pruner = _pruner(pruner) if len(metrics) == 1 else optuna.pruners.NopPruner()
    try:  # creating a study is atomic in every Optuna storage: exactly one worker is its creator
        s = optuna.create_study(storage=store, study_name=study_name, directions=directions, sampler=sampler, pruner=study_pruner)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        s = optuna.load_study(study_name=study_name, storage=store, sampler=sampler, pruner=study_pruner)
        created = False
        wanted = [optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE for d in directions]
        if list(s.directions) != wanted:
            raise ConfigError(
                f"study {study_name!r} exists with directions {[d.name.lower() for d in s.directions]}, "
                f"not {[d.name.lower() for d in wanted]}; choose another study_name or the same objectives."
            ) from None
    if created:
        # n_trials slots, taken one at a time by whichever worker is free (Optuna pops a WAITING
        # trial atomically): exactly n_trials trials across all workers; configurations to try
        # first fill the first slots.
        first = list(enqueue or [])[:n_trials]
        for params in first + [{}] * (n_trials - len(first)):
            s.enqueue_trial(params, user_attrs={TrialAttr.SLOT: True})
        s.set_user_attr("objectives", objectives)
    else:
        _add_slots(s, n_trials)
    parent = parent_run(s, experiment, study_name, kind="study", create=created)

    ran: set[int] = set()  # the trial this worker runs now

    def objective(trial: optuna.Trial):
        ran.add(trial.number)
        attrs = trial.user_attrs
        if not (attrs.get(TrialAttr.SLOT) or TrialAttr.RETRY_OF in attrs):  # not a slot: another worker took the last one meanwhile
            trial.set_user_attr(TrialAttr.SURPLUS, True)
            raise optuna.TrialPruned("surplus: every slot of the study was taken")
        params = suggest(trial, space)
        resume = retried_run(trial, parent)
        mark_worker(trial)
        run_ids: list[str] = []
        stopped_by: list[str] = []  # PRUNER or ALARM, set where the trial's training is stopped

        def started(run_id: str) -> None:
            run_ids.append(run_id)
            trial_started(trial, run_id, {f"{Tag.PARAM_PREFIX}{k}": v for k, v in params.items()})

        try:
            trial_cfg = from_dict(
                {**cfg.to_dict(), **params, "run_name": f"{study_name} trial {trial.number}", "experiment": experiment, "resume": resume}
            )

            def report(epoch: int, m: dict) -> None:
                if len(metrics) == 1 and epoch > 0 and metrics[0] in m:
                    trial.report(m[metrics[0]], epoch)
                # Called before train's own alarm stop (which would end the run FINISHED): the
                # study prunes the trial instead, and before the pruner, whose verdict it overrides.
                in_alarm = sorted(k.partition("/")[2] for k, v in m.items() if k.startswith(f"{ALARM_PREFIX}/") and v == 1)
                if in_alarm and trial_cfg.alarm_action == "stop":
                    stopped_by.append(ALARM)
                    raise train.StopTraining(_alarm_reason(run_ids[0], in_alarm, epoch))
                if len(metrics) == 1 and epoch > 0 and metrics[0] in m:
                    # Judged only once its own warm-up has ended: until then its lr is still rising
                    # (stepped per epoch, its first epoch trains at warmup_lr), and a trial with a
                    # longer warm-up would lose to the others' epochs at full lr.
                    if epoch > trial_cfg.warmup_epochs and trial.should_prune():
                        stopped_by.append(PRUNER)
                        raise train.StopTraining(f"pruned by {type(s.pruner).__name__} at epoch {epoch}")

            result = train.run(trial_cfg, parent_run_id=parent, epoch_callback=report, on_start=started)
        except train.StopTraining as stop:
            by = stopped_by[-1] if stopped_by else PRUNER
            trial.set_user_attr(TrialAttr.PRUNED_BY, by)
            trial.set_user_attr(TrialAttr.PRUNED_BECAUSE, str(stop))
            tracking.set_tags(run_ids[0], {Tag.TRIAL_STATE: "PRUNED", Tag.PRUNED_BY: by})
            tracking.set_note(run_ids[0], f"Trial {trial.number} of study {study_name}: {stop}.")
            log.info("study %s: trial %d %s (its run %s).", study_name, trial.number, stop, run_ids[0])
            raise optuna.TrialPruned(str(stop)) from None
        except Exception as err:
            # Reported in one line by this worker (below); Optuna's own report, a traceback per
            # failed trial, is silenced. The run keeps the error (tgo.error), the trial too.
            trial.set_user_attr(TrialAttr.ERROR, short_error(err))
            if isinstance(err, ConfigError):  # a setting the space combined badly (e.g. mixup with an odd batch size)
                trial.set_user_attr(TrialAttr.CONFIG_ERROR, str(err))
            if run_ids:
                tracking.set_tags(run_ids[0], {Tag.TRIAL_STATE: "FAIL"})
            raise
        missing = [k for k in metrics if k not in result.metrics]
        if missing:
            tracking.set_tags(result.run_id, {Tag.TRIAL_STATE: "FAIL"})
            raise ConfigError(f"objective metric(s) {missing} were not logged by the run (probe_every=0?).")
        tracking.set_tags(result.run_id, {Tag.TRIAL_STATE: "COMPLETE"})
        values = [float(result.metrics[k]) for k in metrics]
        return values[0] if len(values) == 1 else values

    # Take slots until none is left (a dead worker's trial comes back as a WAITING retry).
    while True:
        reclaim_dead_trials(s, store, fail_dead_run)
        if _same_config_error(s) or not s.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            break
        ran.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            s.optimize(objective, n_trials=1, catch=(Exception,))
        for t in s.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if t.number in ran and TrialAttr.ERROR in t.user_attrs:  # the trial this worker just ran
                log.warning(
                    "study %s: trial %d failed: %s (its run %s); the study goes on.",
                    study_name,
                    t.number,
                    t.user_attrs[TrialAttr.ERROR],
                    t.user_attrs.get(TrialAttr.RUN, "-"),
                )
    repeated = _same_config_error(s)
    if repeated:
        raise ConfigError(
            f"the study stopped: its first {repeated[0]} trials all failed with the same configuration "
            f"error, {repeated[1]} Fix the search space or the parameters."
        )
    safe = "the trials' runs are unchanged, and the study's parent run may hold part of the summary"
    with OutputFolder(None, prefix="tgo-study-", figure_format=figure_format, safe=safe) as out:
        return _summarise(s, parent, metrics, space, out)


class PerTrialSeed(optuna.samplers.BaseSampler):
    """A sampler (TPE, NSGA-II) made anew for each trial with the seed (sampler_seed, trial number).

    Workers that share a study with one fixed seed draw the same configurations from the same
    history (two workers started together ran identical trials); trial numbers are unique across
    workers, so these seeds are distinct, and a study run by one worker is still reproducible."""

    def __init__(self, make, seed: int) -> None:
        self.make, self.seed = make, int(seed)
        self.inner = make(seed=self.seed)

    def _for(self, number: int) -> None:
        self.inner = self.make(seed=int(np.random.SeedSequence([self.seed, number]).generate_state(1)[0]))

    def before_trial(self, study, trial) -> None:
        self._for(trial.number)
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def _add_slots(s: optuna.Study, n_trials: int) -> None:
    """A study asked again for more trials than it has slots: the missing slots, added only while no
    other worker is active (no RUNNING or WAITING trial), so that two joiners cannot both add them."""
    trials = s.get_trials(deepcopy=False)
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return
    slots = [
        t
        for t in trials
        if not t.user_attrs.get(TrialAttr.SURPLUS) and TrialAttr.RETRY_OF not in t.user_attrs and "failed_trial" not in t.system_attrs
    ]
    for _ in range(n_trials - len(slots)):
        s.enqueue_trial({}, user_attrs={TrialAttr.SLOT: True})


def _same_config_error(s: optuna.Study, first: int = 2) -> tuple[int, str] | None:
    """(count, message) when the study's first finished trials (at least `first`) all failed with
    one and the same configuration error, and none has succeeded: nothing will."""
    done = sorted(s.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)), key=lambda t: t.number)
    errors = {t.user_attrs.get(TrialAttr.CONFIG_ERROR) for t in done}
    if len(done) >= first and len(errors) == 1 and None not in errors:
        error = errors.pop()
        assert error is not None  # None is not among them
        return len(done), error
    return None


def pruned_by(t: optuna.trial.FrozenTrial) -> str:
    """What pruned a trial ("" if it is not PRUNED): its TrialAttr.PRUNED_BY (PRUNER or ALARM), else
    SURPLUS (asked for once every slot was taken), else PRUNER (a study from before tgo told them apart)."""
    if t.state != TrialState.PRUNED:
        return ""
    if TrialAttr.PRUNED_BY in t.user_attrs:
        return str(t.user_attrs[TrialAttr.PRUNED_BY])
    return SURPLUS if t.user_attrs.get(TrialAttr.SURPLUS) else PRUNER


def _ended(trials: pd.DataFrame) -> dict[str, int]:
    """The study's trials by how they ended (surplus trials, never one of its slots, left out): the
    parent's metrics study/<what>."""
    if trials.empty:
        return dict.fromkeys(("complete", "pruned_by_pruner", "pruned_by_alarm", "fail"), 0)
    return {
        "complete": int((trials.state == "COMPLETE").sum()),
        "pruned_by_pruner": int((trials.pruned_by == PRUNER).sum()),
        "pruned_by_alarm": int((trials.pruned_by == ALARM).sum()),
        "fail": int((trials.state == "FAIL").sum()),
    }


def _mark_pruned(fig: Figure, trials: pd.DataFrame) -> None:
    """An Optuna figure that tells the pruner's prunes from the alarms': the counts under its title,
    and where it draws a line per trial ("Trial<N>": the intermediate values) alarm-pruned trials
    dashed with x markers, each pruned line labelled by what pruned it."""
    by = dict(zip(trials.number, trials.pruned_by))
    for ax in fig.axes:
        drawn = False
        for line in ax.get_lines():
            label = str(line.get_label())
            if not (label.startswith("Trial") and label[5:].isdigit()):
                continue
            drawn, what = True, by.get(int(label[5:]), "")
            if what == ALARM:
                line.set_linestyle("--")
                line.set_marker("x")
            if what in (ALARM, PRUNER):
                line.set_label(f"{label} (pruned by {'an alarm' if what == ALARM else 'the pruner'})")
        if drawn and ax.get_legend() is not None:
            ax.legend(bbox_to_anchor=(1.05, 1), loc="upper left", borderaxespad=0.0)  # Optuna's placement, the new labels
    ended = _ended(trials)
    if fig.axes and (ended["pruned_by_pruner"] or ended["pruned_by_alarm"]):
        ax = fig.axes[0]
        ax.set_title(
            f"{ax.get_title()}\n{ended['pruned_by_pruner']} trial(s) pruned by the pruner, {ended['pruned_by_alarm']} by an alarm",
            fontsize="small",
        )


def _summarise(s: optuna.Study, parent: str, metrics: list[str], space: dict, out: OutputFolder) -> StudyResult:
    """Trials table, Optuna figures and the hyperparameter x geometry correlations, written in
    `out` and logged into the parent."""
    rows = []
    for t in s.get_trials(deepcopy=False):
        values = t.values if t.values is not None else [np.nan] * len(metrics)
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "pruned_by": pruned_by(t),
                **dict(zip(metrics, values)),
                **{f"param.{k}": v for k, v in t.params.items()},
                "run_id": t.user_attrs.get(TrialAttr.RUN, ""),
            }
        )
    trials = pd.DataFrame(rows)
    complete = [t for t in s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = [t.number for t in s.best_trials] if complete else []
    result = StudyResult(s.study_name, parent, trials, best)
    for t in s.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        if pruned_by(t) == ALARM:
            result.notes.append(f"trial {t.number} {t.user_attrs.get(TrialAttr.PRUNED_BECAUSE, 'pruned by an alarm')}.")

    # Spearman's rho between each hyperparameter and each final-epoch observable of the head view
    # (final/cls, or final/mean for an average-pooled model: every trial has the same model).
    corr_rows = []
    if len(complete) >= 3:
        trial_runs = {t.number: tracking.get_run(t.user_attrs[TrialAttr.RUN]) for t in complete if TrialAttr.RUN in t.user_attrs}
        finals = {number: run.data.metrics for number, run in trial_runs.items()}
        head = parse_head(next(iter(trial_runs.values())).data.tags.get(Tag.HEAD_VIEW, "")) if trial_runs else HEAD_VIEW
        keys = ["val/acc1", *[metric_key(*head, o) for o in OBSERVABLE_NAMES]]
        for name in space:
            xs = [t.params.get(name) for t in complete if t.number in finals]
            if len(set(map(str, xs))) < 2 or not all(isinstance(x, (int, float)) for x in xs):
                continue
            for key in keys:
                ys = [finals[t.number].get(key, np.nan) for t in complete if t.number in finals]
                if np.all(np.isfinite(ys)) and np.ptp(ys) > 0:
                    rho, p = scipy.stats.spearmanr(xs, ys)
                    corr_rows.append({"hyperparameter": name, "metric": key, "spearman_rho": rho, "p_value": p, "n": len(xs)})
        # every site/view's final-epoch geometry against the final val/acc1, over the trials in number order
        last = [
            (number, parts.site, parts.view, parts.observable, value)
            for number, values in sorted(finals.items())
            for key, value in values.items()
            if (parts := parse_metric_key(key)) and parts.prefix == METRIC_PREFIX
        ]
        acc1 = {number: values[accuracy.ACCURACY_KEY] for number, values in sorted(finals.items()) if accuracy.ACCURACY_KEY in values}
        result.accuracy = accuracy.over_runs(pd.DataFrame(last, columns=["run", "site", "view", "observable", "value"]), acc1)
    result.correlations = pd.DataFrame(corr_rows, columns=["hyperparameter", "metric", "spearman_rho", "p_value", "n"])

    out.table(trials, "trials")
    out.table(result.correlations, "hyperparameter_geometry_spearman")
    if result.accuracy is not None:
        out.table(result.accuracy, "accuracy_correlation")
    vis = optuna.visualization.matplotlib
    names = [f"{m} ({d.name.lower()})" for m, d in zip(metrics, s.directions)]
    plots_to_make = (
        [("pareto_front", lambda: vis.plot_pareto_front(s, target_names=names))]
        if len(metrics) > 1
        else [
            ("optimization_history", lambda: vis.plot_optimization_history(s, target_name=names[0])),
            ("param_importances", lambda: vis.plot_param_importances(s, target_name=names[0])),
            ("intermediate_values", lambda: vis.plot_intermediate_values(s)),
        ]
    )
    for name, make in plots_to_make:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax: Axes | np.ndarray = make()  # these plots give one Axes; an array of them (multi-panel plots) is handled too
            fig = ax.figure if hasattr(ax, "figure") else np.ravel(ax)[0].figure
            _mark_pruned(cast(Figure, fig), trials)
            out.figure(cast(Figure, fig), f"optuna_{name}")  # Optuna draws on a figure of its own (plt.subplots), not a subfigure
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            result.notes.append(f"{name} figure skipped: {err}")
    out.log(parent)
    tags = {Tag.OBJECTIVES: ",".join(metrics), Tag.N_TRIALS: len(trials), Tag.BEST_TRIALS: ",".join(map(str, best))}
    tracking.set_tags(parent, tags)
    ended: dict[str, float] = {study_key(what): n for what, n in _ended(trials).items()}
    if len(metrics) == 1 and complete:
        ended[best_key(metrics[0])] = s.best_value
    tracking.log_metrics(parent, ended, step=len(trials))
    tracking.finish(parent)
    return result
