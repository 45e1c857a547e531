"""What seed sweeps and Optuna studies share as workers of one Optuna study: the parent run recorded
in the study, each trial's run, and the runs of workers that died.

A sweep or study has one MLflow parent run, whose id the Optuna storage holds (study user attribute
TrialAttr.PARENT_RUN), and each trial records its training run's id (trial user attribute TrialAttr.RUN) as soon
as the run exists, so that the run of a worker that dies can be found, marked FAILED
(`fail_dead_run`, called by tgo.storage when the trial is failed) and resumed by the trial's retry
(`retried_run`).
"""

from __future__ import annotations

import time

import optuna

import tgo
from tgo import tracking
from tgo.keys import Tag, TrialAttr

RESUME_REFUSED = (
    "resume: a {what} resumes only its own runs: run the same {what} command again, and a {unit} whose "
    "worker died continues from its run's checkpoint. To continue one training run, use tgo train --resume <run_id>."
)


def parent_run(
    study: optuna.Study, experiment: str, study_name: str, kind: str = "sweep", create: bool = True, wait_s: float = 120.0
) -> str:
    """The sweep's or study's parent run: the one recorded in the study, else, from the worker that
    created the study (`create`), the launcher run under `mlflow run` or a new one, recorded in the
    study. Other workers wait for the creator to record it (up to wait_s; then, if the creator died
    before recording, they make it themselves), so that whatever the timing there is one parent per
    study."""
    deadline = time.time() + (0.0 if create else wait_s)
    while True:
        recorded = study.user_attrs.get(TrialAttr.PARENT_RUN)  # read from the storage each time
        if recorded:
            if tracking.run_exists(recorded):
                return recorded
            break  # recorded in another tracking store: make a new one here
        if time.time() >= deadline:
            break
        time.sleep(0.5)
    run_id = tracking.open_parent_run(
        experiment, f"{kind} {study_name}", {Tag.KIND: kind, Tag.STUDY: study_name, Tag.VERSION: tgo.__version__}
    )
    study.set_user_attr(TrialAttr.PARENT_RUN, run_id)
    return run_id


def trial_started(trial: optuna.Trial, run_id: str, tags: dict | None = None) -> None:
    """The trial records its run as soon as the run exists, before any work (so that the run of a
    worker that dies can be found), and the run its trial: tgo.trial_number, tgo.trial_state and `tags`."""
    trial.set_user_attr(TrialAttr.RUN, run_id)
    tracking.set_tags(run_id, {Tag.TRIAL_NUMBER: trial.number, Tag.TRIAL_STATE: "RUNNING", **(tags or {})})


def retried_run(trial: optuna.Trial, parent: str) -> str:
    """The run to resume for this trial: where the trial retries one whose worker died (the retry
    carries that trial's user attributes, its run id among them), that run, if it is a child of this
    sweep's or study's parent with a checkpoint (tracking.resumable); else "" (a new run)."""
    previous = trial.user_attrs.get(TrialAttr.RUN, "")
    return previous if previous and tracking.resumable(previous, parent) else ""


def fail_dead_run(trial) -> None:
    """The run of a trial failed because its worker died: FAILED too, not RUNNING for good."""
    tracking.fail_run(
        trial.user_attrs.get(TrialAttr.RUN, ""),
        f"worker {trial.user_attrs.get(TrialAttr.WORKER, '?')} died; "
        f"trial {trial.number} was failed and is retried (resuming this run from its checkpoint)",
    )
