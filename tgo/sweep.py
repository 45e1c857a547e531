"""Seed sweeps: one training run per seed under a parent run, then the spread across seeds.

    from tgo.sweep import sweep
    result = sweep([0, 1, 2], preset="demo", epochs=5)     # any train setting passes through

The sweep is an Optuna study with a GridSampler over {"seed": seeds}, so several workers (this
function called in several processes or machines with the same storage and study name) share the
work: Optuna numbers trials atomically and the GridSampler gives trial k < len(seeds) the k-th
grid point, so each seed is started once; a surplus trial (a worker asking once the grid is
exhausted) finds its seed taken and is pruned without training. A dead worker's seed is run again
by another worker (tgo.storage), resuming the dead worker's run from its checkpoint (`retried_run`). A finished seed is never trained again: re-running the same sweep
reuses it. Each seed is a full training run, a child of the sweep's parent run.

When every seed is complete, the worker that sees it aggregates into the parent run, for every
observable, site, view and epoch (and the scalars train/*, val/*):
  seeds/mean/<key>, seeds/std/<key>, seeds/ci95_low/<key>, seeds/ci95_high/<key>   (step = epoch)
with the 95% confidence interval of the mean from Student's t (n - 1 degrees of freedom), a tidy
table, mean-and-band figures, and per TGO-I finding the number of seeds that support it with a
one-sided sign test (scipy.stats.binomtest over the seeds that support or contradict it), and one
verdict across seeds: the seeds' first-to-last changes combined with a t interval and test, Holm
across the finding's observables (`tgo.findings.across_seeds`), logged as seeds/finding/<N>; and
what the geometry says about accuracy across the seeds (`tgo.accuracy.over_runs`: each observable's
last-epoch value against the seed's last val/acc1, tables/accuracy_correlation.csv).

Alarms (alarms, alarm_action) pass to every seed's run like any train setting. A seed whose run an
alarm with alarm_action=stop ended early is complete all the same (its run is FINISHED, with fewer
epochs; unlike a study, a sweep prunes nothing: a seed that collapses is a result about the
setting). The aggregate is per epoch, so from its stop on a stopped seed is simply absent (`n` in
the summary counts the seeds that reached each epoch) and no last epoch of one seed is averaged
with another's; the verdicts across seeds take each seed's change up to its own last epoch. The
stopped seeds are named: a warning, a note, SweepResult.stopped and the parent's tag
tgo.stopped_seeds (seed -> its run's tgo.stopped_by).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import optuna
import pandas as pd
import scipy.stats
from optuna.trial import TrialState
from tqdm.auto import tqdm

from tgo import accuracy, findings, plots, representations, runs, tgo2, tracking, train
from tgo.config import from_dict, from_overrides
from tgo.errors import ConfigError, mask_url, short_error
from tgo.keys import Tag, TrialAttr, metric_key, seeds_finding_key, seeds_key, site_order
from tgo.outputs import OutputFolder
from tgo.storage import mark_worker, open_storage, optuna_errors_only, reclaim_dead_trials
from tgo.workers import RESUME_REFUSED, fail_dead_run, parent_run, retried_run, trial_started

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    study_name: str
    parent_run_id: str
    seed_runs: dict[int, str]  # seed -> training run id (the completed ones)
    complete: bool
    failed: list[int | None] = field(default_factory=list)  # seeds whose last trial failed in this worker (None: before it drew one)
    summary: pd.DataFrame | None = None  # epoch, site, view, observable, n, mean, std, ci95_low, ci95_high
    findings: pd.DataFrame | None = None  # tgo.findings.across_seeds: per finding and observable
    accuracy: pd.DataFrame | None = None  # tgo.accuracy.over_runs across the seeds at their last epoch
    stopped: dict[int, dict] = field(default_factory=dict)  # seed -> its run's tgo.stopped_by (alarms, epoch, of): ended early by an alarm
    notes: list[str] = field(default_factory=list)


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    if not isinstance(text, str):
        seeds = [int(s) for s in text]
    else:
        parts = text.replace(" ", "").split(",")
        if "" in parts:  # '1,,2' or a trailing comma: a typo, not a request for seeds 1 and 2
            raise ConfigError(f"seeds: an empty entry in {text!r}; write integers separated by single commas, e.g. 0,1,2.")
        try:
            seeds = [int(s) for s in parts]
        except ValueError:
            raise ConfigError(f"seeds: expected integers separated by commas (e.g. 0,1,2,3,4), got {text!r}.") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"seeds: expected distinct integers >= 0 separated by commas, got {text!r}.")
    return seeds


def _seed_of(t) -> int | None:
    return t.params.get("seed")


@optuna_errors_only()
def sweep(
    seeds: Sequence[int] | str,
    *,
    storage: str = "",
    study_name: str = "",
    experiment: str = "",
    aggregate: bool = True,
    figure_format: Literal["png", "pdf", "svg"] = "png",
    **train_overrides,
) -> SweepResult:
    """Run (or join, or resume) a seed sweep as one worker; aggregate when every seed is done.

    seeds: the seeds; storage: an Optuna storage URL (tgo.storage; default sqlite:///optuna.db);
    study_name: default "sweep-" + the seeds; train_overrides: any tgo train setting except seed.
    """
    plots.check_format(figure_format)
    seeds = parse_seeds(seeds)
    if train_overrides.get("seed") not in (None, ""):
        raise ConfigError("seed: a sweep sets the seed of each run; pass seeds=... instead.")
    if train_overrides.get("resume") not in (None, ""):
        raise ConfigError(RESUME_REFUSED.format(what="sweep", unit="seed"))
    cfg, _ = from_overrides(train_overrides)  # bad input stops here, before any work
    tracking.check_tracking()
    study_name = study_name or "sweep-" + "-".join(map(str, seeds))
    store = open_storage(storage, on_dead_trial=fail_dead_run, tracking=tracking.tracking_uri())
    grid = optuna.samplers.GridSampler({"seed": seeds}, seed=0)
    try:  # atomic in every Optuna storage: exactly one worker creates the sweep (and its parent run)
        study = optuna.create_study(storage=store, study_name=study_name, direction="maximize", sampler=grid)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=store, sampler=grid)
        created = False
    recorded = study.user_attrs.get("seeds")
    if recorded is not None and sorted(recorded) != sorted(seeds):
        raise ConfigError(f"study {study_name!r} is a sweep over seeds {recorded}, not {seeds}; choose another study_name.")
    study.set_user_attr("seeds", seeds)
    parent = parent_run(study, experiment, study_name, create=created)
    launcher = tracking.launcher_run_id()
    if launcher and launcher != parent:  # another worker's `mlflow run` made the parent: link to it
        tracking.set_tags(
            launcher,
            {Tag.SWEEP_PARENT: parent, "mlflow.note.content": f"Sweep {study_name}: its runs and aggregate are under run {parent}."},
        )

    ran: list[int] = []  # the trials this worker ran: it judges only those

    def objective(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        seed = trial.suggest_categorical("seed", seeds)
        taken = [
            t
            for t in study.get_trials(deepcopy=False)
            if _seed_of(t) == seed
            and t.number != trial.number
            and (t.state == TrialState.COMPLETE or (t.state == TrialState.RUNNING and t.number < trial.number))
        ]
        if taken:
            raise optuna.TrialPruned(f"seed {seed} is already taken by trial {taken[0].number}")
        resume = retried_run(trial, parent)
        mark_worker(trial)

        try:
            run_cfg = from_dict(
                {**cfg.to_dict(), "seed": seed, "run_name": f"{study_name} seed {seed}", "experiment": experiment, "resume": resume}
            )
            result = train.run(run_cfg, parent_run_id=parent, on_start=lambda run_id: trial_started(trial, run_id))
        except Exception as err:
            trial.set_user_attr(TrialAttr.ERROR, short_error(err))  # reported in one line below
            raise
        trial.set_user_attr(TrialAttr.RUN, result.run_id)
        tracking.set_tags(result.run_id, {Tag.TRIAL_STATE: "COMPLETE"})
        return float(result.metrics.get("val/acc1", 0.0))

    failed: list[int | None] = []
    while True:
        reclaim_dead_trials(study, store, fail_dead_run)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        started = {_seed_of(t) for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING)}
        if not waiting and set(seeds) <= started:
            break
        ran.clear()
        study.optimize(objective, n_trials=1, catch=(Exception,))
        # Only this worker's own trial: another worker's failure is that worker's to report (and
        # its seed is retried by whoever runs the sweep again).
        mine = [t for t in study.get_trials(deepcopy=False) if t.number in ran and t.state == TrialState.FAIL]
        if mine:
            failed.extend(_seed_of(t) for t in mine)
            log.warning(
                "sweep %s: seed %s failed: %s (its run %s). Re-run the sweep to retry it.",
                study_name,
                _seed_of(mine[0]),
                mine[0].user_attrs.get(TrialAttr.ERROR, "?"),
                mine[0].user_attrs.get(TrialAttr.RUN, "-"),
            )
            break

    completed: dict[int, str] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        seed = _seed_of(t)
        assert seed is not None  # a complete trial ran the objective, whose first step suggests its seed
        completed.setdefault(seed, t.user_attrs[TrialAttr.RUN])
    for seed, run_id in completed.items():
        if not tracking.run_exists(run_id):
            raise ConfigError(
                f"study {study_name!r} in {mask_url(storage) if storage else 'the default storage'} ran seed {seed} as run {run_id}, which is not "
                f"in the tracking store {tracking.store_name()}: the study belongs to another store. Use another "
                "study_name or storage."
            )
    result = SweepResult(study_name, parent, completed, set(completed) == set(seeds), failed)
    if not result.complete:
        missing = sorted(set(seeds) - set(completed))
        result.notes.append(
            f"seeds {missing} are not complete yet (running in other workers, or failed); the worker "
            "that completes the last seed aggregates, or re-run the sweep once they are done."
        )
    elif aggregate:
        result.stopped = stopped_seeds(completed)
        if result.stopped:
            for seed, why in sorted(result.stopped.items()):
                note = (
                    f"seed {seed}'s run {completed[seed]} was stopped by alarm {', '.join(why.get('alarms', [])) or '?'} at epoch "
                    f"{why.get('epoch')} of {why.get('of')} (alarm_action=stop): after that epoch the aggregate covers the other "
                    "seeds only, and its verdicts take this seed's change up to that epoch."
                )
                log.warning("sweep %s: %s", study_name, note)
                result.notes.append(note)
            tracking.set_tags(parent, {Tag.STOPPED_SEEDS: json.dumps({str(k): v for k, v in sorted(result.stopped.items())})})
        result.summary, result.findings, result.accuracy = aggregate_into(parent, completed, figure_format)
    return result


def stopped_seeds(seed_runs: dict[int, str]) -> dict[int, dict]:
    """The seeds whose run an alarm with alarm_action=stop ended early: seed -> the run's tag
    tgo.stopped_by ({"alarms": [...], "epoch": E, "of": N}); a resumed run that went on has lost it."""
    out = {}
    for seed, run_id in seed_runs.items():
        text = tracking.get_run(run_id).data.tags.get(Tag.STOPPED_BY)
        if text:
            try:
                out[seed] = dict(json.loads(text))
            except (ValueError, TypeError):
                out[seed] = {"alarms": [], "epoch": None, "of": None, "tag": text}
    return out


def summarise(per_seed: pd.DataFrame, group: Sequence[str]) -> pd.DataFrame:
    """Mean, standard deviation (ddof=1) and the t-based 95% confidence interval of the mean over
    the `seed` column, per group."""
    g = per_seed.groupby(list(group)).value
    out = g.agg(n="count", mean="mean", std=lambda v: v.std(ddof=1)).reset_index()
    half = scipy.stats.t.ppf(0.975, np.maximum(out.n - 1, 1)) * out["std"] / np.sqrt(out.n)
    half = np.where(out.n > 1, half, np.nan)
    out["ci95_low"], out["ci95_high"] = out["mean"] - half, out["mean"] + half
    return out


def finding_counts(seed_findings: dict[int, list[findings.Finding]]) -> pd.DataFrame:
    """Per finding across seeds (`tgo.findings.across_seeds`; TGO-I's 1-5 and TGO-II's 6-8): per
    observable, the mean of the seeds' effects (first-to-last change; finding 5: the head's margin
    over the nearest site; findings 6-8: `tgo.findings.seed_effects`) with
    its t interval and test, Holm across the finding's observables, one verdict across seeds by the
    rules of a single run; and the seeds that support, contradict or are mixed on it with the
    one-sided sign test of supported against contradicted (H0: each is equally likely)."""
    rows = [dict(r, seed=seed) for seed, found in seed_findings.items() for r in findings.seed_effects(found)]
    return findings.across_seeds(pd.DataFrame(rows))


def aggregate_into(parent: str, seed_runs: dict[int, str], figure_format: str = "png") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Read every seed's geometry and scalars, and log their spread into the parent run (its
    downloads, tables and figures in a temporary folder, removed once logged)."""
    safe = "the seed runs are unchanged, and the parent run may hold part of the aggregate"
    with OutputFolder(None, prefix="tgo-sweep-", figure_format=figure_format, safe=safe) as out:
        return _aggregate(parent, seed_runs, out)


def _aggregate(parent: str, seed_runs: dict[int, str], out: OutputFolder) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """`aggregate_into`, with the seeds' downloads, the tables and the figures in `out`: the summary
    across seeds, the findings across seeds and the correlation with accuracy across seeds."""
    tables, seed_findings = [], {}
    for seed, run_id in tqdm(sorted(seed_runs.items()), desc="reading seeds", unit="run", disable=None):
        geometry, _, spectra = runs.read_spectra(run_id, out.root / run_id)
        replicates, head = runs.replicates_of(spectra), runs.head_of(spectra)
        kept = representations.read_kept(run_id, out.root / run_id / "features")
        tgo2_part = tgo2.judge(kept, spectra, None, head, findings_only=True)  # TGO-II: findings 6-8
        seed_findings[seed] = findings.judge(geometry, replicates, head) + tgo2_part.findings
        geometry = geometry.drop(columns="se")
        scalars = runs.scalar_table(run_id, runs.SCALARS).rename(columns={"key": "observable"})
        scalars["site"], scalars["view"] = "", ""
        tables += [geometry.assign(seed=seed), scalars.assign(seed=seed)]
    per_seed = pd.concat(tables, ignore_index=True)
    summary = summarise(per_seed, ["epoch", "site", "view", "observable"])
    counts = finding_counts(seed_findings)
    # each seed's geometry and val/acc1 at its last epoch, seeds in order (ties go to the first)
    per_run = per_seed.rename(columns={"seed": "run"})
    acc1 = accuracy.at_last_epoch(per_run[(per_run.site == "") & (per_run.observable == accuracy.ACCURACY_KEY)]).sort_values("run")
    last = accuracy.at_last_epoch(per_run[per_run.site != ""])
    correlation = accuracy.over_runs(last, dict(zip(acc1.run, acc1.value)))

    joined = ",".join(seed_runs[s] for s in sorted(seed_runs))
    if tracking.get_run(parent).data.tags.get(Tag.SEED_RUNS) == joined:
        # Aggregated before from these very runs (the tag is set last): logging again would only
        # add every seeds/* step a second time to the parent's history.
        return summary, counts, correlation
    keys = np.asarray(
        [o if s == "" else metric_key(s, v, o) for s, v, o in zip(summary.site, summary.view, summary.observable)], dtype=object
    )
    for epoch in sorted(summary.epoch.unique()):
        rows = summary.epoch == epoch
        metrics = {}
        for stat in ("mean", "std", "ci95_low", "ci95_high"):
            for key, value in zip(keys[rows], summary.loc[rows, stat]):
                if np.isfinite(value):
                    metrics[seeds_key(stat, key)] = float(value)
        tracking.log_metrics(parent, metrics, step=int(epoch))
    last = int(summary.epoch.max())
    finding_metrics: dict[str, float] = {}
    for row in counts.drop_duplicates("finding").itertuples():
        finding_metrics[seeds_finding_key(row.finding)] = {"supported": 1, "contradicted": -1}.get(row.verdict, 0)
        finding_metrics[seeds_finding_key(row.finding, "supported")] = int(row.supported)
        finding_metrics[seeds_finding_key(row.finding, "sign_test_p")] = float(row.sign_test_p)
    tracking.log_metrics(parent, finding_metrics, step=last)

    out.table(per_seed, "per_seed")
    out.table(summary, "seeds_summary")
    out.table(counts, "findings")
    out.table(correlation, "accuracy_correlation")
    geo = summary[summary.site != ""]
    sites = site_order(geo.site)
    shown = [s for s in (sites[0], sites[len(sites) // 2], "final") if s in sites]
    for name in dict.fromkeys(geo.observable):
        out.figure(plots.mean_and_band(geo[geo.site.isin(shown)], name, len(seed_runs)), f"seeds_{name}")
    out.log(parent)
    tracking.set_tags(parent, {Tag.SEEDS: ",".join(map(str, sorted(seed_runs))), Tag.SEED_RUNS: joined})
    tracking.finish(parent)
    return summary, counts, correlation
