import os

# pytest-xdist workers share the machine's cores: each worker (and every process it starts: mlflow
# run, tgo, torchrun) gets its share of threads instead of all of them, else torch's OpenMP pools
# spin against each other (on 2 cores, -n 2 with 2 threads each took 22 CPU-minutes, not 17).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_name] = _THREADS

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.register_assert_rewrite("helpers")
from helpers import MLFLOW_ENV, free_port, sqlite_store, tiny_vit, tracking_store  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(_THREADS))

os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 3, 32, 32, generator=g)


@pytest.fixture(autouse=True)
def _restore_mlflow_environment():
    """MLflow 3's set_experiment / set_tracking_uri write os.environ; keep tests from leaking them, and
    the fluent API's active experiment (a run started later in the same process, in another store,
    would look for that experiment there)."""
    import mlflow.tracking.fluent as fluent

    saved = {k: os.environ.get(k) for k in MLFLOW_ENV}
    yield
    fluent._active_experiment_id = None
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _pg_bin() -> str | None:
    import glob
    import shutil

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    path = found[-1] if found else shutil.which("initdb")
    return os.path.dirname(path) if path else None


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL database on loopback: TGO_TEST_POSTGRES_URL (what .ci/run starts), or a
    throwaway cluster started here from Debian's postgresql package."""
    import subprocess

    if os.environ.get("TGO_TEST_POSTGRES_URL"):
        yield os.environ["TGO_TEST_POSTGRES_URL"]
        return
    pg = _pg_bin()
    if pg is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    import pathlib
    import shutil
    import tempfile

    data = pathlib.Path(tempfile.mkdtemp(prefix="tgo-pg-"))  # pytest's tmp dirs are private to root
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_pg:
        os.chown(data, __import__("pwd").getpwnam("postgres").pw_uid, -1)
    port = str(free_port())  # pytest-xdist workers each start their own
    subprocess.run([*as_pg, f"{pg}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    subprocess.run([*as_pg, f"{pg}/pg_ctl", "-D", str(data), "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
                    "-l", str(data / "log"), "-w", "start"], check=True, capture_output=True)
    try:
        subprocess.run([*as_pg, f"{pg}/createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "tgo"], check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/tgo"
    finally:
        subprocess.run([*as_pg, f"{pg}/pg_ctl", "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


# The slowest files first: with pytest-xdist (`-n 2 --dist loadfile --no-loadscope-reorder`, see
# pyproject.toml) the README test, minutes long, then starts at once on one worker while the other
# takes the rest, instead of starting last (xdist's default order puts files with most tests first).
SLOWEST_FIRST = ("test_readme.py", "test_readme_smoke.py", "test_sweep_study.py", "test_scale_out.py", "test_train.py", "test_train_faults.py", "test_analysis.py", "test_ui.py", "test_notebooks.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite tracking store in tmp_path, which is also the working directory (schema created
    once, before any subprocess uses it: several processes on a fresh sqlite file race on it)."""
    import mlflow

    uri = sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


# One smoke run that several files read instead of each training its own (test_train, test_ecosystem
# and test_weights through `smoke_run`, test_compare as the first of its two runs): trained once per
# pytest-xdist worker, by the first test that asks for it, in a store of its own.
SMOKE_RUN = dict(preset="smoke", epochs=1, seed=0, feature_epochs="all", weight_spectra=True, experiment="smoke")


@pytest.fixture(scope="session")
def trained_smoke_run(tmp_path_factory):
    """A finished smoke run (SMOKE_RUN: one epoch, seed 0): spectra, kept features and weights
    (checkpoints/weights_epoch_*.pt) and weight spectra at epochs 0 and 1, in a sqlite store of its
    own: SimpleNamespace(result (its TrainResult), uri, folder). Tests read it through `smoke_run`;
    what they write beside it (tags, runs of their own) must not change what the others read."""
    from types import SimpleNamespace

    from tgo.train import run

    folder = tmp_path_factory.mktemp("smoke_run")
    uri = sqlite_store(folder)
    with tracking_store(uri, cwd=folder):
        result = run(**SMOKE_RUN)
    return SimpleNamespace(result=result, uri=uri, folder=folder)


@pytest.fixture
def smoke_run(trained_smoke_run, tmp_path, monkeypatch):
    """trained_smoke_run, its store the tracking store of the test and tmp_path the working directory."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_smoke_run.uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(trained_smoke_run.uri)
    yield trained_smoke_run
    mlflow.set_tracking_uri(None)
