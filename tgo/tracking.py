"""Everything MLflow: reaching the store, opening or attaching the run, params, batched metrics,
the artifact layout, and checkpoint I/O.

Artifact layout of a training run:
  config/config.json                   the resolved TrainConfig
  probe/probe_set.json                 probe indices, seed, dataset size and data fingerprint
  geometry/spectra/epoch_XXXX.npz      every probed epoch's spectra (tgo.probe.ProbeResult.save)
  checkpoints/last.pt                  resumable: model, optimiser, scheduler, scaler, RNG, epoch
  checkpoints/weights_epoch_XXXX.pt    model weights (state_dict) at the chosen epochs
Checkpoints are plain dicts of tensors and Python scalars, read with torch.load(weights_only=True):
an artifact store is not a trusted source of pickles.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import torch
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import tgo
from tgo.errors import ArtifactError, DiskFullError, StoreWriteError, TrackingError, is_disk_full, mask_url, short_error
from tgo.keys import Tag
from tgo.liveness import grace_period, heartbeat_interval, process_alive, worker_id

log = logging.getLogger(__name__)

PARAM_PREFIX = "config."  # resolved config values; entry-point parameters keep their own names
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
CLAIM_SETTLE_S = 1.0  # after writing a claim, how long to wait before reading it back
DATASET_ATTEMPTS = 4  # log_datasets: tries before giving the record up
DEFAULT_EXPERIMENT = "Default"  # MLflow's own default: where `mlflow run .` puts its run
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # model training, not GenAI


def is_store_failure(err: BaseException) -> bool:
    """Whether `err` is the tracking store refusing a write or out of reach (MLflow's own errors,
    the HTTP client's after MLflow's retries, the database's), as opposed to tgo's or torch's."""
    import requests

    if isinstance(err, (StoreWriteError, MlflowException, requests.RequestException)):
        return True
    module = type(err).__module__ or ""
    return module.startswith(("sqlalchemy", "sqlite3", "urllib3"))


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def store_name() -> str:
    """The tracking store's URI for a message: any password in it masked."""
    return mask_url(tracking_uri())


def check_tracking() -> str:
    """Fail early, before any work, when the tracking store cannot be reached. Returns its URI."""
    uri = mlflow.get_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except requests.RequestException as err:
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {mask_url(uri)} ({type(err).__name__}). Start it "
                "(mlflow server --backend-store-uri ... --host ... --port ...), or unset "
                "MLFLOW_TRACKING_URI to log to ./mlflow.db."
            ) from None
        _check_credentials(uri)
    else:
        try:
            with _schema_lock(uri):
                MlflowClient(uri).search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - any backend failure means we cannot log
            raise TrackingError(f"cannot open the MLflow tracking store {uri}: {err}") from None
    return uri


def _check_credentials(uri: str) -> None:
    """A server with authentication (`mlflow server --app-name basic-auth`) answers /health to anyone
    and refuses everything else without valid credentials: one authenticated call, so that a wrong
    or missing MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD is one message naming the server,
    before any work, instead of an HTTP 401 traceback midway (or, for `get_run`, "no run"). The
    message never repeats the credentials, nor MLflow's text about them."""
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as err:
        status = err.get_http_status_code()
        if status == 401:
            given = "the credentials given" if os.environ.get("MLFLOW_TRACKING_USERNAME") else "no credentials"
            raise TrackingError(
                f"the MLflow tracking server at {mask_url(uri)} refused {given} (HTTP 401: not authenticated); "
                "nothing was logged. Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of "
                "that server (or MLFLOW_TRACKING_TOKEN), and run the command again."
            ) from None
        if status == 403:
            raise TrackingError(
                f"the MLflow tracking server at {mask_url(uri)} accepted the credentials but refused access "
                "(HTTP 403: permission denied); nothing was logged. Ask its administrator for permission on "
                "the experiment, or use another account."
            ) from None
        raise TrackingError(f"the MLflow tracking server at {mask_url(uri)} failed a first request: {short_error(err)}") from None


@contextlib.contextmanager
def _schema_lock(uri: str):
    """Several processes opening a fresh sqlite store at once race on creating its schema ("table
    already exists"): the first to open it creates it while holding an exclusive lock on a file
    beside the database (fcntl.flock), and the others wait. Other stores need no lock."""
    path = uri[len("sqlite:///") :].split("?")[0] if uri.startswith("sqlite:///") else ""  # relative, or /absolute
    if not path or path == ":memory:":
        yield
        return
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# runs: the launcher run of `mlflow run`, parents and children, finishing
# --------------------------------------------------------------------------------------------------


def launcher_run_id() -> str:
    """The run `mlflow run` opened for this entry point (MLFLOW_RUN_ID), or "". tgo attaches to it or
    links it, never lets a fluent start_run() without a run id consume it, and leaves closing it to
    `mlflow run` (`finish`)."""
    return os.environ.get("MLFLOW_RUN_ID", "")


def active_run_id() -> str:
    """The run of the fluent API that this process has open (a notebook's `mlflow.start_run()`,
    PyTorch Lightning's MLFlowLogger does not open one), else the launcher run, else ""."""
    active = mlflow.active_run()
    return active.info.run_id if active is not None else launcher_run_id()


def find_run(experiment: str, tags: dict[str, str]) -> str:
    """The newest live (not deleted) run of `experiment` carrying every tag of `tags`, or ""."""
    found = MlflowClient().search_runs(
        [experiment_id(experiment)],
        " and ".join(f"tags.`{k}` = '{v.replace(chr(39), chr(92) + chr(39))}'" for k, v in tags.items()),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else ""


def run_exists(run_id: str) -> bool:
    try:
        MlflowClient().get_run(run_id)
        return True
    except MlflowException:
        return False


def experiment_id(name: str = "") -> str:
    """The experiment of a new run: `name`, else the one MLflow itself would choose
    (MLFLOW_EXPERIMENT_NAME or MLFLOW_EXPERIMENT_ID, else "Default"), so that `mlflow run .`,
    `tgo train`, sweeps and studies land in one experiment unless told otherwise. An experiment tgo
    creates is tagged as a model-training experiment (EXPERIMENT_KIND) for the MLflow 3 UI."""
    client = MlflowClient()
    if not name and os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, tags=EXPERIMENT_KIND)
    except MlflowException:  # created by another worker at the same moment
        found = client.get_experiment_by_name(name)
        if found is None:  # no such race: the creation failed for its own reason
            raise
        return found.experiment_id


def new_run(experiment: str, run_name: str, tags: dict[str, Any] | None = None) -> str:
    """A new run in the experiment `experiment` (see experiment_id); returns its id."""
    return (
        MlflowClient()
        .create_run(experiment_id(experiment), run_name=run_name or None, tags={k: str(v) for k, v in (tags or {}).items()})
        .info.run_id
    )


def open_parent_run(experiment: str, run_name: str, tags: dict[str, Any]) -> str:
    """The run that holds a sweep's or study's children: the launcher run under `mlflow run`, else a
    new run in `experiment`. Tagged with `tags`, and named `run_name` either way: the launcher run
    would otherwise keep MLflow's random name (angry-owl-75) beside children named after the sweep
    or study."""
    launcher = launcher_run_id()
    run_id = launcher or new_run(experiment, run_name)
    # mlflow.runName in the same batch renames the run (MLflow's stores update its name from it)
    set_tags(run_id, {**tags, "mlflow.runName": run_name} if launcher and run_name else tags)
    return run_id


def open_child_run(parent_run_id: str, run_name: str, tags: dict[str, Any]) -> str:
    """A run that records something about `parent_run_id` (an analysis of a training run) as its
    child: the launcher run under `mlflow run` (unless that is the parent itself), else a new run in
    the parent's experiment. Tagged with `tags` and mlflow.parentRunId."""
    launcher = launcher_run_id()
    if launcher and launcher != parent_run_id:
        run_id = launcher
    else:
        parent = get_run(parent_run_id)
        run_id = MlflowClient().create_run(parent.info.experiment_id, run_name=run_name or None).info.run_id
    set_tags(run_id, {"mlflow.parentRunId": parent_run_id, **tags})
    return run_id


def finish(run_id: str, status: str = "FINISHED", error: str = "") -> None:
    """End a run tgo opened with the client, with its error (if any) in tgo.error; the launcher run
    gets the error too, and is left to `mlflow run`, which closes it (FAILED, as tgo exits non-zero)."""
    if error:
        MlflowClient().set_tag(run_id, Tag.ERROR, error[:5000])
    if run_id != launcher_run_id():
        MlflowClient().set_terminated(run_id, status)


def get_run(run_id: str):
    """The run, or a TrackingError naming the id and the store."""
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException:
        raise TrackingError(
            f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()}; check the id "
            "(MLflow UI, or mlflow.search_runs()) and MLFLOW_TRACKING_URI."
        ) from None


def start_run(experiment: str, run_name: str = "", resume_run_id: str = "", system_metrics: bool = False, parent_run_id: str = ""):
    """Open the run to log into.

    - resume_run_id: that run, reopened (status RUNNING). If `mlflow run` launched this process
      with a run of its own (MLFLOW_RUN_ID), that launcher run is tagged to point at the resumed one.
    - else parent_run_id: a new child run of that run, in its experiment (sweep and study workers).
    - else MLFLOW_RUN_ID (set by `mlflow run`): attach to it; never set_experiment there.
    - else, inside an active run (a notebook's own run): a nested child run of it.
    - else a new run in `experiment`.
    """
    kwargs: dict[str, Any] = {}
    if system_metrics:
        try:
            import psutil  # noqa: F401

            kwargs["log_system_metrics"] = True
        except ImportError:
            pass
    launcher = launcher_run_id()
    if resume_run_id:
        tags = get_run(resume_run_id).data.tags
        if Tag.ERROR in tags:  # the error it stopped with is history now
            set_tags(resume_run_id, {Tag.PREVIOUS_ERROR: tags[Tag.ERROR]})
            MlflowClient().delete_tag(resume_run_id, Tag.ERROR)
        if launcher and launcher != resume_run_id:
            client = MlflowClient()
            client.set_tag(launcher, Tag.RESUMES, resume_run_id)
            client.set_tag(launcher, "mlflow.note.content", f"This launcher run resumed run {resume_run_id}; its metrics are there.")
        return mlflow.start_run(run_id=resume_run_id, **kwargs)
    if parent_run_id:  # before MLFLOW_RUN_ID: a sweep launched by `mlflow run` has one of its own
        parent = get_run(parent_run_id)
        # Created through the client, then attached by id: the fluent start_run() without a run id
        # would attach to MLFLOW_RUN_ID (the launcher run, here the parent itself) instead.
        child = MlflowClient().create_run(parent.info.experiment_id, run_name=run_name or None, tags={"mlflow.parentRunId": parent_run_id})
        return mlflow.start_run(run_id=child.info.run_id, **kwargs)
    if launcher:
        return mlflow.start_run(run_id=launcher, **kwargs)
    if mlflow.active_run() is not None:
        return mlflow.start_run(run_name=run_name or None, nested=True, **kwargs)
    return mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name or None, **kwargs)


# --------------------------------------------------------------------------------------------------
# leases: one process trains a run at a time
# --------------------------------------------------------------------------------------------------


def _lease_of(run) -> dict | None:
    try:
        return json.loads(run.data.tags.get(Tag.LEASE, ""))
    except ValueError:
        return None


def _write_lease(run_id: str, nonce: str) -> None:
    lease = {"worker": worker_id(), "renewed": time.time(), "nonce": nonce}
    MlflowClient().set_tag(run_id, Tag.LEASE, json.dumps(lease, sort_keys=True))


def lease_holder(run) -> str:
    """The live process that trains `run` ("<host>:<pid>", renewed how long ago), or "" when none
    does: the run is not RUNNING, or its lease's process is gone (on this host: it no longer
    exists; elsewhere: its lease was not renewed for `tgo.liveness.grace_period()` seconds)."""
    lease = _lease_of(run)
    if run.info.status != "RUNNING" or not lease or lease.get("worker") == worker_id():
        return ""
    host, _, pid = str(lease.get("worker", "")).rpartition(":")
    age = time.time() - float(lease.get("renewed", 0))
    if host == socket.gethostname() and pid.isdigit():
        alive = process_alive(int(pid))
    else:
        alive = age < grace_period()
    return f"{lease['worker']} (lease renewed {age:.0f} s ago)" if alive else ""


def refuse_if_trained(run) -> None:
    """A TrackingError when another live process trains `run` (`lease_holder`): two processes
    training one run would log every step twice. Writes nothing."""
    holder = lease_holder(run)
    if holder:
        raise TrackingError(
            f"run {run.info.run_id} is being trained by {holder}; resuming it now would train it twice. Wait for it "
            f"to end, or stop that process (a lease not renewed for {grace_period()} s is given up)."
        )


def claim(run) -> None:
    """Take the lease of a run about to be resumed, or refuse with a TrackingError when another live
    process trains it (`refuse_if_trained`).

    MLflow has no compare-and-set, so the claim is written, left CLAIM_SETTLE_S to settle, and read
    back: of two processes claiming at once, the one whose claim was overwritten gives way."""
    refuse_if_trained(run)
    run_id = run.info.run_id
    nonce = uuid.uuid4().hex
    _write_lease(run_id, nonce)
    time.sleep(CLAIM_SETTLE_S)
    if (_lease_of(MlflowClient().get_run(run_id)) or {}).get("nonce") != nonce:
        raise TrackingError(f"run {run_id} was claimed by another process at the same moment; it resumes the run, this one stops.")


def release(run_id: str) -> None:
    """Give up this process's lease of a run it has stopped training: delete the tag, which belongs
    to a live run only, if the lease is still this process's (one another process claimed after
    this one's went stale is theirs). Best effort, as it runs while training unwinds: where the
    store cannot be written the lease stays, and goes stale by itself."""
    client = MlflowClient()
    try:
        if (_lease_of(client.get_run(run_id)) or {}).get("worker") == worker_id():
            client.delete_tag(run_id, Tag.LEASE)
    except Exception as err:  # noqa: BLE001 - see the docstring; the error being unwound matters more
        log.debug("run %s: its lease was not given up (%s).", run_id, short_error(err))


class Lease:
    """Renews the run's lease every `interval` seconds (default `tgo.liveness.heartbeat_interval()`) from a daemon thread while the run
    trains, so that `claim` can tell a live run from a dead one, and gives it up when stopped. A
    failed renewal is skipped: the lease is advisory, and a store that cannot be written stops the
    run through its own writes."""

    def __init__(self, run_id: str, interval: float | None = None) -> None:
        self.run_id, self.interval = run_id, heartbeat_interval() if interval is None else interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="tgo-lease")

    def start(self) -> Lease:
        self._beat()
        self._thread.start()
        return self

    def _beat(self) -> None:
        try:
            _write_lease(self.run_id, uuid.uuid4().hex)
        except Exception:  # noqa: BLE001 - see the class docstring
            pass

    def _renew(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def stop(self) -> None:
        """Stop renewing and give the lease up (`release`). Training calls this last, after the run
        is closed (`end_run`), and the tag goes only once the thread has ended: a renewal still in
        flight would write it back."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if not self._thread.is_alive():  # a renewal stuck on the store past the join: leave it to go stale
            release(self.run_id)


def log_datasets(run_id: str, datasets: Sequence[dict[str, Any]]) -> None:
    """Record the run's data with MLflow's dataset tracking (the UI's Datasets column): each item
    has name, digest (at most 36 characters, MLflow's limit), context ("training", "probe") and
    source (a dict of facts: dataset, data_dir, sizes)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for item in datasets:
        # MLflow's Dataset marks profile abstract but is no ABC; MetaDataset inherits its None.
        dataset = MetaDataset(
            CodeDatasetSource(tags={k: str(v) for k, v in item["source"].items()}), name=item["name"], digest=item["digest"][:36]
        )  # type: ignore[abstract]
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", item["context"])]))
    for attempt in range(DATASET_ATTEMPTS):
        try:
            MlflowClient().log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as err:
            # MLflow's SQL store looks a dataset up, then inserts it: two runs logging the same
            # dataset at once (a sweep's seeds) collide on its unique key, and the loser finds it
            # on a second try. The record is informational: a run never fails over it.
            if attempt + 1 == DATASET_ATTEMPTS:
                log.warning("run %s: its datasets were not recorded (%s).", run_id, short_error(err))
                return
            time.sleep(0.2 + 0.3 * attempt)


def config_artifact() -> tuple[str, str]:
    """Where a run keeps its resolved config (written by `log_config`, again on every resume)."""
    return "config", "config.json"


def log_config(run_id: str, config: dict[str, Any]) -> None:
    """Log the resolved config as params `config.<field>`, and as config/config.json.

    A param already on the run with another value (a resumed run whose epochs were extended) is
    not re-logged (MLflow forbids it); the new value goes to a tag `tgo.resumed.<field>`.
    """
    client = MlflowClient()
    existing = client.get_run(run_id).data.params
    params, tags = [], {}
    for key, value in config.items():
        name, text = PARAM_PREFIX + key, str(value)
        if name not in existing:
            params.append(mlflow.entities.Param(name, text))
        elif existing[name] != text:
            tags[f"{Tag.RESUMED_PREFIX}{key}"] = text
    client.log_batch(run_id, params=params, tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items()])
    log_json(run_id, config, *config_artifact())


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    MlflowClient().log_batch(run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()])


def set_note(run_id: str, text: str) -> None:
    """The run's note (MLflow's description, shown on its page in the UI)."""
    set_tags(run_id, {"mlflow.note.content": text})


def delete_tag(run_id: str, key: str) -> None:
    """Remove a tag from a run, if it has it."""
    if key in MlflowClient().get_run(run_id).data.tags:
        MlflowClient().delete_tag(run_id, key)


def base_tags(kind: str, preset: str, dataset: str, model: str) -> dict[str, str]:
    return {Tag.KIND: kind, Tag.PRESET: preset, Tag.DATASET: dataset, Tag.MODEL: model, Tag.VERSION: tgo.__version__}


def log_metrics(run_id: str, metrics: dict[str, float], step: int) -> None:
    """All metrics of one step in as few log_batch calls as MLflow allows (one-by-one is 30x slower)."""
    client = MlflowClient()
    now = int(time.time() * 1000)
    items = [Metric(key, float(value), now, int(step)) for key, value in metrics.items()]
    for i in range(0, len(items), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])


def logged_steps(run_id: str, key: str) -> list[int]:
    return sorted(step for step, _ in metric_history(run_id, key))


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of `key`."""
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def metric_histories(run_id: str, keys: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """Histories of several keys: one call per key (MLflow has no multi-key history call), eight
    at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(8) as pool:
        pairs = pool.map(lambda key: (key, metric_history(run_id, key)), keys)
        return dict(tqdm(pairs, total=len(keys), desc="metric histories", leave=False, disable=None))


def artifact_names(run_id: str, folder: str) -> list[str]:
    """Paths of the artifacts directly under `folder` of the run."""
    return [f.path for f in MlflowClient().list_artifacts(run_id, folder)]


def log_folder(run_id: str, folder: str | Path, artifact_path: str | None = None) -> None:
    """Log a folder's files as the run's artifacts under `artifact_path`; DiskFullError when the
    artifact store is full (`_store_full`)."""
    with _store_full(run_id):
        MlflowClient().log_artifacts(run_id, str(folder), artifact_path)


def log_json(run_id: str, obj: Any, artifact_path: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(obj, indent=2, sort_keys=True))
        log_file(run_id, path, artifact_path)


def log_file(run_id: str, path: str | Path, artifact_path: str | None) -> None:
    """Log one file as the run's artifact under `artifact_path`; DiskFullError when the artifact
    store is full (`_store_full`)."""
    with _store_full(run_id):
        MlflowClient().log_artifact(run_id, str(path), artifact_path)


@contextlib.contextmanager
def _store_full(run_id: str):
    """A full disk under the run's artifact store (a local folder's OSError, shutil.copytree's
    shutil.Error, or a server's answer quoting it) as a DiskFullError whose `where` is the run's
    artifact location, password masked; other errors pass through."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        where = mask_url(MlflowClient().get_run(run_id).info.artifact_uri)
        raise DiskFullError(f"no space left in the artifact store {where}", where=where) from None


def local_artifact_dir(run_id: str) -> Path | None:
    """The run's artifact folder when its artifact store is a local (or mounted) file system, else
    None (an S3 bucket, an MLflow server proxying artifacts, ...)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    repo = get_artifact_repository(MlflowClient().get_run(run_id).info.artifact_uri)
    return Path(repo.artifact_dir) if isinstance(repo, LocalArtifactRepository) else None


def save_torch(run_id: str, obj: Any, artifact_path: str, name: str, scratch: str | Path, local_dir: Path | None) -> None:
    """torch.save `obj` as the run's artifact `artifact_path/name`.

    With a local artifact store (`local_dir`, from `local_artifact_dir`) the file is written in
    place: into a hidden file beside it, then renamed over the old version, so a kill mid-write
    leaves the previous version whole, as MLflow's own log_artifact does, but without writing the
    260 MB of a ViT-S checkpoint twice. Elsewhere it is written to `scratch` and uploaded with
    log_artifact.
    """
    if local_dir is None:
        path = Path(scratch) / name
        try:
            with open(path, "wb") as fh:
                _torch_save(obj, fh, path)
            log_file(run_id, path, artifact_path)
        finally:
            path.unlink(missing_ok=True)
        return
    folder = local_dir / artifact_path
    folder.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            _torch_save(obj, fh, folder / name)
        # mkstemp makes the file 0600; give it the mode of MLflow's other artifacts (0666 less the
        # umask), so that a shared artifact store can serve it to other users.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)
        os.replace(partial, folder / name)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _torch_save(obj: Any, fh, path: Path) -> None:
    """torch.save into an open file; a write the file system refuses (a full disk, a folder turned
    read-only) is raised as that OSError, naming `path`, instead of the RuntimeError torch's zip
    writer raises after it ("[enforce fail at inline_container.cc] unexpected pos ...")."""
    try:
        torch.save(obj, fh)
    except (RuntimeError, OSError) as err:
        refused = err if isinstance(err, OSError) else err.__cause__ or err.__context__
        if not isinstance(refused, OSError):
            raise
        raise OSError(refused.errno, refused.strerror, str(path)) from None


def spectra_artifact(epoch: int) -> tuple[str, str]:
    return "geometry/spectra", f"epoch_{epoch:04d}.npz"


def features_artifact(epoch: int) -> tuple[str, str]:
    return "geometry/features", f"epoch_{epoch:04d}.npz"


def weight_spectra_artifact(epoch: int) -> tuple[str, str]:
    return "geometry/weights", f"epoch_{epoch:04d}.npz"


def step_record_artifact(step: int) -> tuple[str, str]:
    """A probe run's record of one step (tgo probe: the checkpoint file measured, and the alarms'
    state after it, which a later probe of the run goes on from)."""
    return "probe/checkpoints", f"step_{step:06d}.json"


def weights_artifact(epoch: int) -> tuple[str, str]:
    return "checkpoints", f"weights_epoch_{epoch:04d}.pt"


def weights_epoch(path: str) -> int | None:
    """The epoch of a weights artifact's path (`weights_artifact`'s name), or None for any other file,
    such as the hidden .weights_epoch_XXXX.pt.*.partial that a kill mid-write leaves."""
    match = re.fullmatch(r"weights_epoch_(\d{4,})\.pt", Path(path).name)
    return int(match.group(1)) if match else None


def download(run_id: str, artifact: str, dst: str | Path) -> Path:
    """One artifact (a file or a folder) of a run, as a local path; TrackingError when the run lacks
    it, DiskFullError (`where` = dst) when `dst` has no room for it. (MLflow's own progress bars
    follow MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR, which the command line sets to false unless the
    user set it: tgo draws its own.)

    Read through the run's artifact repository itself: `mlflow.artifacts.download_artifacts(run_id=...)`
    turns every failure, a full disk under `dst` among them, into "Failed to download artifacts
    from path ..., please ensure that the path is correct", which blamed the run for a full TMPDIR."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        repo = get_artifact_repository(MlflowClient().get_run(run_id).info.artifact_uri)
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(repo.download_artifacts(artifact, dst_path=str(dst)))
    except (MlflowException, OSError) as err:
        if is_disk_full(err):
            detail = f"for artifact {artifact} of run {run_id}"
            raise DiskFullError(f"no space left in {dst} {detail}", where=str(dst), detail=detail) from None
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            raise TrackingError(f"artifact {artifact} of run {run_id} could not be written to {dst}: {short_error(err)}") from None
        # MLflow's repositories list each file's failure on a line of its own: the last says why
        lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("#####")]
        raise TrackingError(
            f"run {run_id} has no artifact {artifact} ({mask_url(lines[-1][:300] if lines else type(err).__name__)})."
        ) from None


def load_checkpoint(path: str | Path, what: str = "") -> dict:
    """A checkpoint written by tgo (a dict of tensors and plain values), read without unpickling
    arbitrary objects: torch.load(weights_only=True), as an artifact store is not a trusted source of
    pickles.

    Args:
        path: the downloaded file.
        what: the artifact it is, for messages ("checkpoints/last.pt of run ..."); default the path.

    Raises:
        ArtifactError: the file holds pickled objects other than tensors and plain values (tgo never
            unpickles them, and never advises torch's weights_only=False, which would run whatever
            was planted in it), is damaged (truncated, empty), or holds no dict.
    """
    import pickle
    import warnings

    what = what or str(path)
    untouched = "Nothing was loaded or run from it."
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it then refuses
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ArtifactError(
            f"{what} is not a tgo checkpoint: it holds pickled objects other than tensors and plain values, "
            f"and tgo will not unpickle it (that could run code planted in it). {untouched}"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch's reader fails in many ways (RuntimeError, EOFError, KeyError) on a damaged file
        reason = short_error(err).split(". ")[0]  # torch's first sentence; the rest is advice about saving
        raise ArtifactError(f"{what} is damaged (truncated or corrupt: {reason}). {untouched}") from None
    if not isinstance(ckpt, dict):
        raise ArtifactError(f"{what} is not a tgo checkpoint: it holds a {type(ckpt).__name__}, not a dict. {untouched}")
    return ckpt


def end_run(status: str = "FINISHED", message: str = "") -> bool:
    """Close the active run with `status` (and its error in tgo.error). False when the store could
    not be written (the run then stays as it was; the caller says so). The run's lease is given up
    by `Lease.stop`, called after this, once its thread can no longer renew it."""
    run = mlflow.active_run()
    if run is None:
        return True
    try:
        if message:
            MlflowClient().set_tag(run.info.run_id, Tag.ERROR, message[:5000])
        mlflow.end_run(status=status)
        return True
    except Exception:  # noqa: BLE001 - a store that cannot be written; reported by the caller
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status)  # lets go of the run locally even where it cannot write
        return False


def fail_run(run_id: str, reason: str) -> None:
    """Mark a run FAILED with its reason (tgo.error, tgo.trial_state=FAIL) if it is still RUNNING:
    the run of a trial whose worker died, which nobody else would ever end. The dead worker's lease
    goes with it (a lease belongs to a live run only)."""
    if run_id:
        close_failed(run_id, reason, {Tag.TRIAL_STATE: "FAIL"})


def close_failed(run_id: str, reason: str, tags: dict[str, str] | None = None) -> None:
    """Mark a run that no live process trains FAILED with `reason` (tgo.error) and `tags`, if it still
    reads RUNNING (a killed process cannot say otherwise), and drop its stale lease. A run in
    another state is left as it is."""
    client = MlflowClient()
    run = client.get_run(run_id)
    if run.info.status != "RUNNING":
        return
    set_tags(run_id, {**(tags or {}), Tag.ERROR: reason[:5000]})
    client.set_terminated(run_id, "FAILED")
    if Tag.LEASE in run.data.tags:
        with contextlib.suppress(MlflowException):  # gone already: whoever removed it did this job
            client.delete_tag(run_id, Tag.LEASE)


def resumable(run_id: str, parent_run_id: str) -> bool:
    """Whether a sweep or study may resume `run_id` for a retried trial: a child of its own parent
    run (never an unrelated run), not finished, with a resumable checkpoint."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    if run.data.tags.get("mlflow.parentRunId") != parent_run_id or is_finished(run):
        return False
    return any(a.path == "checkpoints/last.pt" for a in client.list_artifacts(run_id, "checkpoints"))


def is_finished(run) -> bool:
    return run.info.status == RunStatus.to_string(RunStatus.FINISHED)


def open_linked_run(beside_run_id: str, run_name: str, tags: dict[str, Any]) -> str:
    """A run that records something about several runs at once (a comparison of two runs) without
    being the child of any of them: the launcher run under `mlflow run`, else a new run in the
    experiment of `beside_run_id`. Tagged with `tags`; never given mlflow.parentRunId."""
    run_id = launcher_run_id()
    if not run_id:
        experiment = get_run(beside_run_id).info.experiment_id
        run_id = MlflowClient().create_run(experiment, run_name=run_name or None).info.run_id
    set_tags(run_id, tags)
    return run_id
