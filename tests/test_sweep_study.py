"""Seed sweeps and Optuna studies with real worker processes, storages and MLflow runs."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import scipy.stats
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import mlflow_run, subprocess_env
from tgo.config import ConfigError
from tgo.errors import StorageError
from tgo.storage import open_storage
from tgo.study import study
from tgo.sweep import summarise, sweep


def _sweep_cmd(seeds: str, storage: str, name: str, epochs: int = 1, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tgo", "sweep", "--seeds", seeds, "--storage", storage, "--study_name", name,
            "--preset", "smoke", "--epochs", str(epochs), "--experiment", "sweeps", *extra]


def _children(parent: str) -> list:
    return mlflow.search_runs(experiment_names=["sweeps"], filter_string=f"tags.mlflow.parentRunId = '{parent}'", output_format="list")


def _complete_seeds(storage: str, name: str) -> list[int]:
    s = optuna.load_study(study_name=name, storage=open_storage(storage))
    return sorted(t.params["seed"] for t in s.get_trials(states=(TrialState.COMPLETE,)))


def test_summary_statistics_match_numpy_and_scipy():
    rng = np.random.default_rng(0)
    rows = [(e, "final", "cls", "effective_rank", s, rng.normal(10 + e, 1)) for e in range(3) for s in range(5)]
    per_seed = pd.DataFrame(rows, columns=["epoch", "site", "view", "observable", "seed", "value"])
    summary = summarise(per_seed, ["epoch", "site", "view", "observable"])
    for epoch in range(3):
        values = per_seed[per_seed.epoch == epoch].value.to_numpy()
        row = summary[summary.epoch == epoch].iloc[0]
        low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=scipy.stats.sem(values))
        assert row.n == 5 and row["mean"] == pytest.approx(values.mean()) and row["std"] == pytest.approx(values.std(ddof=1))
        assert (row.ci95_low, row.ci95_high) == pytest.approx((low, high))


@pytest.mark.slow
def test_two_workers_on_one_journal_run_each_seed_once_and_aggregate(store, tmp_path):
    storage = f"journal:{tmp_path / 'sweep.journal'}"
    workers = [subprocess.Popen(_sweep_cmd("0,1,2", storage, "two", 1, "--figure_format", "pdf"), env=subprocess_env(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:] + err[-3000:]  # tgo's own messages are on stdout
    s = optuna.load_study(study_name="two", storage=open_storage(storage))
    seeds = [t.params["seed"] for t in s.get_trials() if t.state == TrialState.COMPLETE]
    assert sorted(seeds) == [0, 1, 2]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in s.get_trials())
    parent = s.user_attrs["mlflow_parent_run_id"]
    children = _children(parent)
    assert sorted(int(r.data.params["config.seed"]) for r in children) == [0, 1, 2]  # one run per seed
    # The aggregate in the parent run equals numpy on the children's histories.
    client = MlflowClient()
    key = "geom/final/cls/effective_rank"
    per_child = [{m.step: m.value for m in client.get_metric_history(r.info.run_id, key)} for r in children]
    mean = {m.step: m.value for m in client.get_metric_history(parent, f"seeds/mean/{key}")}
    high = {m.step: m.value for m in client.get_metric_history(parent, f"seeds/ci95_high/{key}")}
    for epoch in (0, 1):
        values = np.array([h[epoch] for h in per_child])
        assert mean[epoch] == pytest.approx(values.mean())
        assert high[epoch] == pytest.approx(values.mean() + scipy.stats.t.ppf(0.975, 2) * values.std(ddof=1) / np.sqrt(3))
    names = {a.path for a in client.list_artifacts(parent, "figures")}
    assert "figures/seeds_effective_rank.pdf" in names  # figure_format=pdf
    assert "seeds/finding/1/sign_test_p" in client.get_run(parent).data.metrics
    assert {f"seeds/finding/{n}" for n in (6, 7, 8)} <= set(client.get_run(parent).data.metrics)  # TGO-II too
    # One verdict across seeds: the mean of the seeds' first-to-last changes with its t interval,
    # checked against numpy on the children's histories.
    assert client.get_run(parent).data.metrics["seeds/finding/1"] in (-1.0, 0.0, 1.0)
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="tables/findings.csv"))
    row = table[(table.finding == 1) & (table.observable == "effective_rank")].iloc[0]
    changes = np.array([h[max(h)] - h[min(h)] for h in per_child])
    half = scipy.stats.t.ppf(0.975, 2) * changes.std(ddof=1) / np.sqrt(3)
    assert (row["mean"], row.ci_low, row.ci_high) == pytest.approx((changes.mean(), changes.mean() - half, changes.mean() + half))
    # What the geometry says about accuracy across the seeds: each seed's last epoch, against scipy.
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="tables/accuracy_correlation.csv"))
    row = table[(table.site == "final") & (table.view == "cls") & (table.observable == "effective_rank")].iloc[0]
    by_seed = sorted(zip((int(r.data.params["config.seed"]) for r in children), per_child, children), key=lambda t: t[0])
    y = np.array([h[max(h)] for _, h, _ in by_seed])
    x = np.array([max(client.get_metric_history(r.info.run_id, "val/acc1"), key=lambda m: m.step).value for _, _, r in by_seed])
    assert row.n == 3 and row.accuracy_pick == by_seed[int(np.argmax(x))][0]
    if np.ptp(x) and np.ptp(y):
        assert row.rho == pytest.approx(scipy.stats.spearmanr(x, y).statistic) and row.pick == by_seed[int(np.argmax(y))][0]

    # Re-running the sweep reuses the finished seeds: no new training run.
    proc = subprocess.run(_sweep_cmd("0,1,2", storage, "two"), env=subprocess_env(store), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(_children(parent)) == 3
    # ... and aggregating again adds nothing to the parent's histories (one value per epoch).
    assert sorted(m.step for m in client.get_metric_history(parent, f"seeds/mean/{key}")) == [0, 1]
    assert len(client.get_metric_history(parent, "seeds/finding/1")) == 1


def _kill_when_running(proc: subprocess.Popen, storage: str, name: str, timeout: float = 300) -> None:
    """SIGKILL the worker once it has a RUNNING trial whose run has logged its first epoch."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        if line.startswith("tgo: epoch 0/") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rdb", "journal"])
def test_a_killed_workers_seed_is_run_by_another(store, tmp_path, kind):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}" if kind == "rdb" else f"journal:{tmp_path / 'sweep.journal'}"
    env = subprocess_env(store, TGO_HEARTBEAT_INTERVAL="1", TGO_GRACE_PERIOD="3")
    victim = subprocess.Popen(_sweep_cmd("0,1", storage, "kill", epochs=2), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _kill_when_running(victim, storage, "kill")
    s = optuna.load_study(study_name="kill", storage=open_storage(storage))
    (running,) = s.get_trials(states=(TrialState.RUNNING,))
    if kind == "rdb":
        time.sleep(5)  # past the grace period: the heartbeat is stale
    proc = subprocess.run(_sweep_cmd("0,1", storage, "kill", epochs=2), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = optuna.load_study(study_name="kill", storage=open_storage(storage))
    states = {t.number: t.state for t in s.get_trials()}
    assert states[running.number] == TrialState.FAIL
    assert _complete_seeds(storage, "kill") == [0, 1]
    retried = [t for t in s.get_trials(states=(TrialState.COMPLETE,)) if t.params["seed"] == running.params["seed"]]
    assert len(retried) == 1 and retried[0].number > running.number
    # The dead worker's run was marked FAILED with the reason (not RUNNING for good), and the retry
    # resumed that very run from its checkpoint: one run per seed, every epoch logged once.
    client = MlflowClient()
    dead_run = s.trials[running.number].user_attrs["mlflow_run_id"]
    assert retried[0].user_attrs["mlflow_run_id"] == dead_run
    run = client.get_run(dead_run)
    assert run.info.status == "FINISHED" and run.data.tags["tgo.trial_state"] == "COMPLETE"
    assert "died" in run.data.tags["tgo.previous_error"] and "tgo.error" not in run.data.tags
    assert sorted(m.step for m in client.get_metric_history(dead_run, "val/loss")) == [0, 1, 2]
    assert len(_children(s.user_attrs["mlflow_parent_run_id"])) == 2


@pytest.mark.slow
def test_study_on_postgresql_runs_to_n_trials_with_children_linked(store, postgres_url, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 1.0e-3, high: 3.0e-3, log: true}\nwarmup_epochs: {type: int, low: 0, high: 1}\n")
    result = study(3, search_space=space, storage=postgres_url, study_name=f"pg-{os.getpid()}", preset="smoke",
                   epochs=1, experiment="studies", pruner="none")
    assert len(result.trials) == 3 and set(result.trials.state) == {"COMPLETE"}
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["tgo.kind"] == "study" and parent.info.status == "FINISHED"
    for _, row in result.trials.iterrows():
        child = client.get_run(row.run_id)
        assert child.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert child.info.experiment_id == parent.info.experiment_id
        assert child.data.tags["tgo.trial_number"] == str(row.number) and child.data.tags["tgo.trial_state"] == "COMPLETE"
        assert float(child.data.params["config.lr"]) == pytest.approx(row["param.lr"])
        assert "geom/final/cls/effective_rank" in child.data.metrics
    figures = {a.path for a in client.list_artifacts(result.parent_run_id, "figures")}
    assert "figures/optuna_optimization_history.png" in figures
    table = {a.path for a in client.list_artifacts(result.parent_run_id, "tables")}
    assert "tables/hyperparameter_geometry_spearman.csv" in table
    # resuming with more trials continues the same study
    more = study(4, search_space=space, storage=postgres_url, study_name=f"pg-{os.getpid()}", preset="smoke", epochs=1, experiment="studies", pruner="none")
    assert len(more.trials) == 4


@pytest.mark.slow
def test_a_bad_trial_is_pruned_and_a_failing_one_recorded(store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: categorical, choices: [0.0003, 1.0e-9, 1.0e+30]}\n")
    storage = f"journal:{tmp_path / 'study.journal'}"
    good = {"lr": 0.0003}
    result = study(5, search_space=space, storage=storage, study_name="prune", preset="smoke", epochs=3, experiment="studies",
                   enqueue=[good, good, {"lr": 1e-9}, {"lr": 1e30}, good])
    states = dict(zip(result.trials.number, result.trials.state))
    assert states[0] == states[1] == states[4] == "COMPLETE"
    assert states[2] == "PRUNED"  # cannot learn at lr 1e-9: below the median at epoch 2
    assert states[3] == "FAIL"  # a non-finite loss: the study goes on
    client = MlflowClient()
    runs = dict(zip(result.trials.number, result.trials.run_id))
    pruned = client.get_run(runs[2])
    assert pruned.info.status == "KILLED" and pruned.data.tags["tgo.trial_state"] == "PRUNED" and "tgo.stopped_early" in pruned.data.tags
    assert client.get_run(runs[3]).info.status == "FAILED"
    # what the geometry says about accuracy, over the completed trials only (0, 1, 4) at their last epoch
    table = result.accuracy
    assert table is not None and (table.n == 3).all() and set(table.accuracy_pick) <= {0, 1, 4}
    assert "tables/accuracy_correlation.csv" in {a.path for a in client.list_artifacts(result.parent_run_id, "tables")}
    finals = {n: client.get_run(runs[n]).data.metrics for n in (0, 1, 4)}
    x = np.array([finals[n]["val/acc1"] for n in (0, 1, 4)])
    y = np.array([finals[n]["geom/final/cls/effective_rank"] for n in (0, 1, 4)])
    row = table[(table.site == "final") & (table.view == "cls") & (table.observable == "effective_rank")].iloc[0]
    assert row.accuracy_pick == (0, 1, 4)[int(np.argmax(x))]
    if np.ptp(x) and np.ptp(y):
        assert row.rho == pytest.approx(scipy.stats.spearmanr(x, y).statistic) and row.pick == (0, 1, 4)[int(np.argmax(y))]


@pytest.mark.slow
def test_multi_objective_study_has_a_pareto_front(store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 1.0e-3, high: 3.0e-3}\n")
    result = study(2, objectives="val/acc1:max,geom/final/cls/effective_rank:max", search_space=space,
                   storage=f"journal:{tmp_path / 'mo.journal'}", study_name="mo", preset="smoke", epochs=1, experiment="studies")
    assert {"val/acc1", "geom/final/cls/effective_rank"} <= set(result.trials.columns)
    assert "figures/optuna_pareto_front.png" in {a.path for a in MlflowClient().list_artifacts(result.parent_run_id, "figures")}


def test_a_studys_figures_come_in_the_format_asked_and_its_folder_is_removed(store, tmp_path, monkeypatch, capsys):
    import tempfile

    from tgo import cli

    assert cli.main(["study", "--n_trials", "1", "--figure_format", "gif", "--preset", "smoke"]) == 2  # before any trial
    assert "tgo: error: figure_format: 'gif' is not one of png, pdf, svg" in capsys.readouterr().err
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 1.0e-3, high: 3.0e-3}\n")
    argv = ["study", "--n_trials", "1", "--search_space", str(space), "--storage", f"journal:{tmp_path / 'fmt.journal'}",
            "--study_name", "fmt", "--pruner", "none", "--figure_format", "svg", "--preset", "smoke", "--epochs", "1", "--experiment", "studies"]
    assert cli.main(argv) == 0
    (parent,) = [r for r in mlflow.search_runs(experiment_names=["studies"], output_format="list") if r.data.tags.get("tgo.kind") == "study"]
    figures = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "figures")}
    assert "figures/optuna_optimization_history.svg" in figures and all(f.endswith(".svg") for f in figures), figures
    assert not list(tmp_path.glob("tgo-study-*"))  # the summary's folder, removed once logged


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(objectives="val/acc7:max"), "objectives: unknown metric 'val/acc7'"),
        (dict(objectives="geom/final/cls/rank:max"), "objectives: unknown metric"),
        (dict(objectives="val/acc1:up"), "must end in :max or :min"),
        (dict(search_space="EMPTY"), "is empty"),
        (dict(search_space="BROKEN"), "is not valid YAML"),
        (dict(search_space="UNKNOWN"), "is not a tgo train setting"),
        (dict(search_space="HFLIP"), "search_space: hflip = 2 is not a valid setting: hflip: must be a number in [0, 1]"),
        (dict(search_space="NAN"), "needs finite numbers low <= high"),
        (dict(search_space="BATCH"), "search_space: batch_size = 0 is not a valid setting"),
        (dict(storage="postgresql://postgres@127.0.0.1:9/none"), "cannot open the Optuna storage postgresql://postgres@127.0.0.1:9/none"),
        (dict(storage="nowhere"), "is not a storage URL"),
        (dict(resume="0123456789abcdef0123456789abcdef"), "resume: a study resumes only its own runs"),
        (dict(figure_format="tiff"), "figure_format: 'tiff' is not one of png, pdf, svg"),
    ],
)
def test_bad_study_input_stops_before_any_trial(store, tmp_path, kwargs, message):
    files = {"EMPTY": "", "BROKEN": "lr: {type: float, low: [", "UNKNOWN": "learning_rate: {type: float, low: 0.1, high: 1}",
             "HFLIP": "hflip: {type: categorical, choices: [2, 3]}", "NAN": "lr: {type: float, low: .nan, high: 0.1}",
             "BATCH": "batch_size: {type: int, low: 0, high: 8}"}
    if kwargs.get("search_space") in files:
        path = tmp_path / "space.yaml"
        path.write_text(files[kwargs["search_space"]])
        kwargs["search_space"] = path
    with pytest.raises((ConfigError, StorageError), match=message.replace("(", r"\(").replace("[", r"\[")):
        study(2, preset="smoke", **{"storage": f"journal:{tmp_path / 'j'}", **kwargs})
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_study_name_with_other_directions_is_refused(store, tmp_path):
    storage = f"journal:{tmp_path / 'dir.journal'}"
    optuna.create_study(storage=open_storage(storage), study_name="taken", direction="minimize")
    with pytest.raises(ConfigError, match="exists with directions \\['minimize'\\], not \\['maximize'\\]"):
        study(1, storage=storage, study_name="taken", preset="smoke")


def test_bad_sweep_input(store, capsys):
    from tgo import cli

    assert cli.main(["sweep", "--seeds", "0,x", "--preset", "smoke"]) == 2
    assert "seeds: expected integers" in capsys.readouterr().err
    assert cli.main(["sweep", "--seeds", "1,,2", "--preset", "smoke"]) == 2  # a typo, not seeds 1 and 2
    assert "seeds: an empty entry in '1,,2'" in capsys.readouterr().err
    assert cli.main(["sweep", "--seeds", "0,1", "--seed", "3", "--preset", "smoke"]) == 2
    assert "seed: a sweep sets the seed" in capsys.readouterr().err
    # An unrelated run is never adopted as a seed: a sweep resumes only its own runs.
    unrelated = MlflowClient().create_run(MlflowClient().create_experiment("elsewhere")).info.run_id
    assert cli.main(["sweep", "--seeds", "0,1", "--resume", unrelated, "--preset", "smoke"]) == 2
    assert "resume: a sweep resumes only its own runs" in capsys.readouterr().err
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == 1  # nothing started
    with pytest.raises(ConfigError, match="epochs: expected an integer"):
        sweep("0,1", preset="smoke", epochs="many")


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["sweep", "study"])
def test_under_mlflow_run_the_launcher_run_is_the_parent_of_one_child_per_seed_or_trial(store, tmp_path, entry):
    # `mlflow run` opens a run and sets MLFLOW_RUN_ID before tgo starts: that run must become the
    # parent, and each seed or trial a child of its own (the fluent start_run used to consume it).
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 1.0e-3, high: 3.0e-3}\n")
    params = {"sweep": ["seeds=0,1"], "study": ["n_trials=2", f"search_space={space}", "pruner=none"]}[entry]
    proc = mlflow_run(entry, "launched", store, tmp_path, *params, f"storage=journal:{tmp_path / 'launch.journal'}", "preset=smoke", "epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["launched"], output_format="list")
    assert len(runs) == 3, [(r.info.run_name, r.data.tags.get("tgo.kind")) for r in runs]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["tgo.kind"] == entry and parent.info.status == "FINISHED"
    assert parent.info.run_name == {"sweep": "sweep sweep-0-1", "study": "study tgo-study"}[entry]  # not MLflow's random name
    assert not any(k.startswith("geom/") for k in parent.data.metrics)  # no training metrics in the parent
    children = [r for r in runs if r is not parent]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id != child.info.run_id
        assert child.data.tags["tgo.kind"] == "train" and child.info.status == "FINISHED"
        assert "geom/final/cls/effective_rank" in child.data.metrics
    if entry == "sweep":
        assert sorted(r.data.params["config.seed"] for r in children) == ["0", "1"]
        assert "seeds/finding/1" in parent.data.metrics


@pytest.mark.parametrize("kind", ["sweep", "study"])
def test_the_launcher_run_made_a_parent_is_named_after_the_sweep_or_study(store, monkeypatch, kind):
    """`mlflow run` names its run at random (angry-owl-75); made the parent, it is renamed as tgo
    names a parent it opens itself, beside children named after the sweep or study."""
    from tgo.workers import parent_run

    client = MlflowClient()
    launcher = client.create_run(client.create_experiment("launched")).info.run_id  # what `mlflow run` opens
    assert client.get_run(launcher).info.run_name != f"{kind} seeds-0-1"  # MLflow's random name
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher)
    assert parent_run(optuna.create_study(), "launched", "seeds-0-1", kind=kind) == launcher
    run = client.get_run(launcher)
    assert run.info.run_name == run.data.tags["mlflow.runName"] == f"{kind} seeds-0-1"
    assert run.data.tags["tgo.kind"] == kind and run.info.status == "RUNNING"  # still `mlflow run`'s to close
    monkeypatch.delenv("MLFLOW_RUN_ID")
    own = parent_run(optuna.create_study(), "launched", "other", kind=kind)  # no launcher: a run of its own, named alike
    assert own != launcher and client.get_run(own).info.run_name == f"{kind} other"


def test_a_storage_password_is_never_printed(store, capsys):
    from tgo import cli
    from tgo.errors import mask_url

    assert mask_url("postgresql://user:s3cret@db.example:5432/tgo") == "postgresql://user:***@db.example:5432/tgo"
    assert mask_url("postgresql://user@db.example/tgo") == "postgresql://user@db.example/tgo"
    # Port 1 on loopback refuses at once: the error names the storage without its password.
    code = cli.main(["sweep", "--seeds", "0", "--preset", "smoke", "--storage", "postgresql://u:s3cret@127.0.0.1:1/db"])
    out = capsys.readouterr()
    assert code == 2 and "postgresql://u:***@127.0.0.1:1/db" in out.err
    assert "s3cret" not in out.err + out.out


@pytest.mark.slow
def test_workers_started_together_on_a_fresh_sqlite_store_all_open_it(tmp_path):
    # Each process creates the store's schema if it is missing; together they used to race on it
    # ("table already exists"). Four at once, on a store nobody has opened yet.
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    code = "from tgo.tracking import check_tracking; check_tracking(); print('ok')"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(uri), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 and out.strip() == "ok" for p, (out, _) in zip(procs, results)), [err[-500:] for _, err in results]


def test_a_study_whose_trials_all_fail_on_one_configuration_error_stops_with_it(store, tmp_path, capfd, caplog):
    # Each value is valid alone (checked before the first trial), but not together: mixup needs an
    # even batch size. The study stops after its first two trials instead of failing all four.
    space = tmp_path / "space.yaml"
    space.write_text("mixup: {type: categorical, choices: [0.8]}\nbatch_size: {type: int, low: 7, high: 7}\n")
    storage = f"journal:{tmp_path / 'bad.journal'}"
    import logging

    logger = logging.getLogger("tgo")  # whatever the CLI (in an earlier test) or a user configured on it
    logger.addHandler(caplog.handler)
    try:
        with pytest.raises(ConfigError, match="first 2 trials all failed with the same configuration error, batch_size: mixup/cutmix need an even batch size"):
            study(4, search_space=space, storage=storage, study_name="bad", preset="smoke", epochs=1)
    finally:
        logger.removeHandler(caplog.handler)
    # Each failed trial is reported in one line by the "tgo" logger, without Optuna's traceback.
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err + caplog.text
    assert "trial 0 failed: ConfigError: batch_size: mixup/cutmix need an even batch size" in caplog.text
    assert "trial 1 failed: ConfigError" in caplog.text
    trials = optuna.load_study(study_name="bad", storage=open_storage(storage)).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING, TrialState.WAITING]  # 2 slots untouched


@pytest.mark.slow
def test_two_study_workers_started_together_share_one_parent_and_exactly_n_trials(store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 1.0e-3, high: 3.0e-3, log: true}\nwarmup_epochs: {type: int, low: 0, high: 1}\n")
    storage = f"journal:{tmp_path / 'together.journal'}"
    cmd = [sys.executable, "-m", "tgo", "study", "--n_trials", "4", "--search_space", str(space), "--storage", storage,
           "--study_name", "together", "--pruner", "none", "--preset", "smoke", "--epochs", "1", "--experiment", "studies"]
    workers = [subprocess.Popen(cmd, env=subprocess_env(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-2000:] for _, err in outputs]
    s = optuna.load_study(study_name="together", storage=open_storage(storage))
    trials = s.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)  # exactly n_trials
    configs = {tuple(sorted(t.params.items())) for t in trials}
    assert len(configs) == 4  # distinct configurations: each trial samples with its own seed
    parents = mlflow.search_runs(experiment_names=["studies"], filter_string="tags.`tgo.kind` = 'study'", output_format="list")
    assert len(parents) == 1 and parents[0].info.run_id == s.user_attrs["mlflow_parent_run_id"]
    children = mlflow.search_runs(experiment_names=["studies"], filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'", output_format="list")
    assert len(children) == 4


def test_a_sweep_worker_judges_only_its_own_trials(store, tmp_path, monkeypatch):
    # While this worker trains seed 0, "another worker" fails a trial of the same sweep. This
    # worker's own seed succeeded: it must not report the other's failure as its own.
    from types import SimpleNamespace

    from tgo import train

    storage = f"journal:{tmp_path / 'own.journal'}"
    client = MlflowClient()

    def fake_run(cfg, parent_run_id, on_start=None, **_):  # the sweep passes each seed's TrainConfig
        other = optuna.load_study(study_name="own", storage=open_storage(storage))
        trial = other.ask()
        other.tell(trial, state=TrialState.FAIL)  # another worker's trial, failed meanwhile
        run_id = client.create_run(client.get_run(parent_run_id).info.experiment_id, tags={"mlflow.parentRunId": parent_run_id}).info.run_id
        client.set_terminated(run_id)
        return SimpleNamespace(run_id=run_id, metrics={"val/acc1": 1.0})

    monkeypatch.setattr(train, "run", fake_run)
    result = sweep([0], storage=storage, study_name="own", preset="smoke", aggregate=False)
    assert result.failed == [] and result.complete and sorted(result.seed_runs) == [0]


def test_a_trial_is_not_pruned_before_its_own_warm_up_has_ended(store, tmp_path, monkeypatch):
    # Two trials without warm-up reach val/acc1 50 from epoch 1; the third warms up for 3 epochs
    # (per epoch, its epoch 1 trains at warmup_lr: nothing learnt yet), then matches them. The
    # median pruner used to stop it at epoch 1, below the others' median.
    from types import SimpleNamespace

    from tgo import train

    space = tmp_path / "space.yaml"
    space.write_text("warmup_epochs: {type: categorical, choices: [0, 3]}\n")
    client = MlflowClient()
    trained: dict[int, list[int]] = {}  # the epochs of each warm-up's trials

    def fake_run(cfg, parent_run_id, epoch_callback, on_start, **_):  # a trial's training: its curve from its warm-up
        run_id = client.create_run(client.get_run(parent_run_id).info.experiment_id, tags={"mlflow.parentRunId": parent_run_id}).info.run_id
        on_start(run_id)
        for epoch in range(1, cfg.epochs + 1):
            trained.setdefault(cfg.warmup_epochs, []).append(epoch)
            epoch_callback(epoch, {"val/acc1": 0.0 if epoch <= cfg.warmup_epochs else 50.0})
        client.set_terminated(run_id)
        return SimpleNamespace(run_id=run_id, metrics={"val/acc1": 50.0})

    monkeypatch.setattr(train, "run", fake_run)
    result = study(3, search_space=space, storage=f"journal:{tmp_path / 'warm.journal'}", study_name="warm", preset="smoke",
                   epochs=5, sched_on_updates=False, experiment="studies", enqueue=[{"warmup_epochs": 0}] * 2 + [{"warmup_epochs": 3}])
    assert list(result.trials.state) == ["COMPLETE"] * 3
    assert trained[3] == [1, 2, 3, 4, 5]
