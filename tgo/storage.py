"""Optuna storages for sweeps and studies, and what a dead worker leaves behind.

  ""                          sqlite:///optuna.db beside the MLflow store when that is a SQLite file
                              (the runs and the study that made them stay together), else in the
                              working directory: one process
  journal:PATH                JournalStorage(JournalFileBackend(PATH)): several processes on one machine
  sqlite:///F, postgresql://  RDBStorage: PostgreSQL for several machines (SQLite only for one process)

Dead workers. On an RDB storage every running trial sends a heartbeat (Optuna's heartbeat_interval);
a trial whose heartbeat is older than grace_period is failed by the next worker to start a trial,
and Optuna's RetryHeartbeatStaleTrialCallback enqueues it again with the same parameters, so its
seed or configuration is run by another worker. JournalStorage has no heartbeat. There, each trial
records its worker as "<host>:<pid>"; a worker on the same host that finds a RUNNING trial whose
process no longer exists fails it and enqueues it again (`reclaim_dead_trials`). The journal's
ordered log makes that safe with several workers: only the first one to fail the trial succeeds
(Optuna raises UpdateFinishedTrialError for the others), and only it enqueues the retry. A journal
file is for one machine, so the process table is the ground truth; nothing else is locked.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
import warnings
from collections.abc import Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from tgo.errors import StorageError, mask_url, url_password
from tgo.keys import TrialAttr
from tgo.liveness import grace_period, heartbeat_interval, process_alive, worker_id

MAX_RETRY = 3
SCHEMA_ATTEMPTS = 5  # opening a fresh RDB storage that other workers are creating at the same moment
_SCHEMA_RACE = re.compile(r"already exists|duplicate key|UniqueViolation|IntegrityError", re.I)


def default_storage(tracking: str = "") -> str:
    """sqlite:///optuna.db beside the MLflow store `tracking` when that is a SQLite file, else in the
    working directory."""
    if tracking.startswith("sqlite:///"):
        return "sqlite:///" + os.path.join(os.path.dirname(os.path.abspath(tracking[len("sqlite:///") :])), "optuna.db")
    return "sqlite:///optuna.db"


class _RetryAndReport:
    """Optuna's RetryHeartbeatStaleTrialCallback, then `on_dead_trial(trial)` (tgo marks the trial's
    MLflow run FAILED there, so a dead worker's run does not stay RUNNING for good)."""

    def __init__(self, max_retry: int, on_dead_trial: Callable[[FrozenTrial], None] | None) -> None:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        self.retry, self.on_dead_trial = RetryHeartbeatStaleTrialCallback(max_retry=max_retry), on_dead_trial

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.retry(study, trial)
        _report_dead_trial(self.on_dead_trial, trial)


def _report_dead_trial(on_dead_trial, trial: FrozenTrial) -> None:
    if on_dead_trial is None:
        return
    try:
        on_dead_trial(trial)
    except Exception as err:  # noqa: BLE001 - bookkeeping of another worker's run never stops this one
        warnings.warn(f"could not mark the run of dead trial {trial.number}: {err}", RuntimeWarning, stacklevel=2)


@contextlib.contextmanager
def optuna_errors_only():
    """Optuna's own log at ERROR inside the block (as a decorator: during the call), its level before
    restored after: a failed trial is one line from tgo, not Optuna's traceback, and a notebook that
    set Optuna's verbosity gets it back."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def open_storage(url: str = "", on_dead_trial: Callable[[FrozenTrial], None] | None = None, tracking: str = ""):
    """The Optuna storage named by `url` (see the module docstring; "" for the default beside the
    MLflow store `tracking`), checked to be reachable. on_dead_trial(trial) is called for each trial
    failed because its worker died (RDB heartbeat)."""
    url = url.strip() or default_storage(tracking)
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = url[len("journal:") :]
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise StorageError(f"storage {url}: folder {folder} does not exist.")
        return JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise StorageError(
            f"storage {mask_url(url)!r} is not a storage URL; use journal:PATH (one machine, several processes), "
            "sqlite:///FILE (one process) or postgresql://USER@HOST:PORT/DB (several machines)."
        )
    from optuna.storages import RDBStorage

    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable in use
                return RDBStorage(
                    url,
                    heartbeat_interval=heartbeat_interval(),
                    grace_period=grace_period(),
                    heartbeat_stale_trial_callback=_RetryAndReport(MAX_RETRY, on_dead_trial),
                    engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
                )
        except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many kinds; all mean "cannot use it"
            # Workers started together on a fresh database race to create Optuna's tables (one wins,
            # the others hit "duplicate key"/"already exists"): the losers open it again.
            if attempt + 1 < SCHEMA_ATTEMPTS and _SCHEMA_RACE.search(str(err)):
                time.sleep(0.5 * (attempt + 1))
                continue
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            password = url_password(url)
            if password:  # a driver's message may quote the URL it was given
                first = first.replace(password, "***")
            raise StorageError(f"cannot open the Optuna storage {mask_url(url)}: {first}") from None
    raise AssertionError("unreachable")  # the last attempt returns or raises


def mark_worker(trial: optuna.Trial) -> None:
    trial.set_user_attr(TrialAttr.WORKER, worker_id())


def reclaim_dead_trials(study: optuna.Study, storage, on_dead_trial: Callable[[FrozenTrial], None] | None = None) -> list[int]:
    """JournalStorage: fail the RUNNING trials of dead workers on this host and enqueue them again,
    calling on_dead_trial(trial) for each. Returns the numbers of the trials reclaimed by this worker.
    RDB storages: fail the trials whose heartbeat is stale (Optuna's retry callback enqueues them)."""
    from optuna.storages import JournalStorage

    if not isinstance(storage, JournalStorage):
        # RDB storages: the heartbeat does it, but Optuna checks only when a trial starts; a worker
        # that finds every seed started must check too, or a dead worker's seed is never retried.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return []
    host = socket.gethostname()
    reclaimed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(TrialAttr.WORKER, "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host != host or not pid.isdigit() or process_alive(int(pid)) or int(pid) == os.getpid():
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, TrialAttr.FAILED_BECAUSE, f"worker {owner} died")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker reclaimed it first
        _report_dead_trial(on_dead_trial, t)
        # As Optuna's own retry callbacks do: a WAITING copy with the same parameters, user and
        # system attributes (a GridSampler needs its grid_id; the dead trial's run id lets the
        # retry resume that run from its checkpoint), run by the next worker that asks.
        system_attrs = {**t.system_attrs, "fixed_params": t.params, "failed_trial": t.number}
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=t.params,
                distributions=t.distributions,
                user_attrs={**t.user_attrs, TrialAttr.RETRY_OF: t.number},
                system_attrs=system_attrs,
            )
        )
        reclaimed.append(t.number)
    return reclaimed
