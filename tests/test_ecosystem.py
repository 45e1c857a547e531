"""What users of MLflow, timm and Python expect: one experiment, names that tell runs apart, the
data in MLflow's dataset tracking, a resumed run's launcher explained, presets that yield, figure
formats, declared dependencies and no global state changed on import."""

import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from helpers import ROOT, interrupted_and_resumed, mlflow_run, subprocess_env
from tgo.config import resolve
from tgo.train import run


@pytest.mark.slow
def test_runs_land_in_mlflows_experiment_with_names_that_tell_them_apart(store, monkeypatch):
    first = run(preset="smoke", epochs=1, probe_every=0)
    second = run(preset="smoke", epochs=1, probe_every=0)  # the same seed
    client = MlflowClient()
    a, b = client.get_run(first.run_id), client.get_run(second.run_id)
    assert a.info.experiment_id == b.info.experiment_id == client.get_experiment_by_name("Default").experiment_id
    assert a.info.run_name != b.info.run_name
    assert a.info.run_name.startswith("smoke-synthetic-seed0-") and b.info.run_name.startswith("smoke-synthetic-seed0-")
    # MLFLOW_EXPERIMENT_NAME is honoured, and an experiment tgo creates is a model-training one.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    third = run(preset="smoke", epochs=1, probe_every=0)
    experiment = client.get_experiment_by_name("mine")
    assert client.get_run(third.run_id).info.experiment_id == experiment.experiment_id
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_training_and_probe_data_are_mlflow_datasets(smoke_run):
    result = smoke_run.result  # run(preset="smoke", epochs=1, ...)
    inputs = MlflowClient().get_run(result.run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(by_context) == {"training", "probe"}
    fingerprint = MlflowClient().get_run(result.run_id).data.tags["tgo.probe_fingerprint"]
    assert by_context["probe"].digest == fingerprint[:32] and by_context["probe"].name == "synthetic-probe"
    assert by_context["training"].name == "synthetic-train"
    source = json.loads(by_context["training"].source)
    assert source["tags"]["train_images"] == "128"


@pytest.mark.slow
def test_a_resumed_runs_launcher_run_says_which_run_it_resumed(store, tmp_path):
    first = run(preset="smoke", epochs=1, probe_every=0, experiment="resumed")
    proc = mlflow_run("train", "resumed", store, tmp_path, f"resume={first.run_id}", "epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["resumed"], output_format="list")
    (launcher,) = [r for r in runs if r.info.run_id != first.run_id]
    assert launcher.info.status == "FINISHED"
    assert launcher.data.tags["tgo.resumes"] == first.run_id and first.run_id in launcher.data.tags["mlflow.note.content"]
    assert sorted(m.step for m in MlflowClient().get_metric_history(first.run_id, "val/loss")) == [0, 1, 2]


def test_a_presets_dataset_dependent_values_yield_to_another_dataset():
    assert resolve("smoke").num_classes == 4  # the smoke preset's synthetic data
    assert resolve("smoke", dataset="imagefolder", data_dir="/x").num_classes == 0  # from the folder
    assert resolve("smoke", dataset="imagefolder", data_dir="/x", num_classes=2).num_classes == 2  # given: kept
    assert resolve("smoke", dataset="synthetic").num_classes == 4  # its own dataset: kept


@pytest.mark.slow
def test_analysis_figures_in_the_format_asked(store, tmp_path):
    from tgo.analysis import analyze
    from tgo.errors import ConfigError

    result = run(preset="smoke", epochs=2)
    out = analyze(result.run_id, output_dir=tmp_path / "svg", figure_format="svg", log=False)
    assert out.figures and all(p.suffix == ".svg" and p.read_text().lstrip().startswith(("<?xml", "<svg")) for p in out.figures)
    assert "data:image/svg+xml;base64," in out.report_html.read_text()
    pdf = analyze(result.run_id, output_dir=tmp_path / "pdf", figure_format="pdf", log=False)
    assert all(p.suffix == ".pdf" and p.read_bytes().startswith(b"%PDF") for p in pdf.figures)
    with pytest.raises(ConfigError, match="figure_format: 'tiff' is not one of png, pdf, svg"):
        analyze(result.run_id, figure_format="tiff", log=False)


def test_every_third_party_import_of_tgo_is_a_declared_dependency():
    import ast

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower()
                for r in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]}
    providers = importlib.metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    missing = set()
    for path in (ROOT / "tgo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in stdlib or top == "tgo":
                    continue
                dists = {d.lower() for d in providers.get(top, [top])}
                # a namespace package (nvidia.dali, shared with torch's nvidia-* wheels) is declared by
                # its own distribution, named after its first two levels (nvidia-dali-cuda120)
                namespace = "-".join(name.lower().split(".")[:2])
                if not dists & declared and not any(d.startswith(namespace) for d in declared if "." in name):
                    missing.add((path.name, top, tuple(sorted(dists))))
    assert not missing, missing


@pytest.mark.slow
def test_importing_tgo_changes_no_global_state():
    code = (
        "import os, matplotlib, mlflow, optuna, timm, torch  # what these do on import is theirs, not tgo's\n"
        "env, backend = dict(os.environ), matplotlib.rcParams._get_backend_or_none()\n"
        "import tgo, tgo.plots, tgo.analysis, tgo.train, tgo.sweep, tgo.study, tgo.cli\n"
        "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())\n"
        "assert matplotlib.rcParams._get_backend_or_none() == backend\n"
        "print('ok')\n"
    )
    env = subprocess_env("sqlite:///unused.db")
    env.pop("MPLBACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.slow
def test_the_version_is_written_once():
    import tgo

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tgo.__version__"}
    out = subprocess.run([sys.executable, "-m", "tgo", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == f"tgo {tgo.__version__}"
    assert Path(ROOT / "tgo" / "data" / "search_space.yaml").is_file()


@pytest.mark.slow
def test_deits_weight_average_and_repeated_augmentation(store):
    """tgo1 turns both on (DeiT's recipe); here on the smoke preset: the probe measures the weight
    average when asked, the kept weights are the ones it measured, and an interrupted run resumes
    to the same numbers as an uninterrupted one (the average is in the checkpoint)."""
    import torch

    from tgo import tracking
    from tgo.train import build

    assert (resolve("tgo1", data_dir="/x").repeated_aug, resolve("tgo1", data_dir="/x").model_ema) == (3, True)
    with pytest.raises(Exception, match="probe_weights: ema needs model_ema=true"):
        resolve("smoke", probe_weights="ema")
    # Repeated augmentation: an epoch keeps len(train) draws, each image three times.
    setup = build(resolve("smoke", repeated_aug=3))
    setup.sampler.set_epoch(1)
    drawn = list(iter(setup.sampler))
    assert len(drawn) == 128 and len(set(drawn)) == 43  # ceil(128 / 3) distinct images

    common = dict(preset="smoke", epochs=3, model_ema=True, model_ema_decay=0.9, probe_weights="ema", repeated_aug=3,
                  checkpoint_epochs="all", experiment="ema")
    whole, resumed = interrupted_and_resumed(**common)
    assert {"val_ema/acc1", "val_ema/loss"} <= set(whole.metrics)
    client = MlflowClient()
    assert client.get_run(whole.run_id).data.tags["tgo.probe_weights"] == "ema"
    for key in ("val_ema/acc1", "val/loss", "geom/final/cls/effective_rank", "geom/block_00/patch/stable_rank"):
        assert resumed.metrics[key] == pytest.approx(whole.metrics[key], rel=1e-6), key
    # The kept weights of the last epoch are the average the probe measured, not the trained weights.
    folder = Path(mlflow.artifacts.download_artifacts(run_id=whole.run_id, artifact_path="checkpoints"))
    kept = tracking.load_checkpoint(folder / "weights_epoch_0003.pt")
    last = tracking.load_checkpoint(folder / "last.pt")
    assert all(torch.equal(kept[k], last["ema"][k]) for k in kept)
    assert not all(torch.equal(kept[k], last["model"][k]) for k in kept)


@pytest.mark.slow
def test_two_processes_logging_the_same_dataset_at_once_both_record_it(store, tmp_path):
    """A sweep's seeds log the same training data at the same moment: MLflow's SQL store looks the
    dataset up, then inserts it, so one of two processes used to fail on its unique key."""
    script = tmp_path / "log_datasets.py"
    script.write_text(
        "from mlflow.tracking import MlflowClient\n"
        "from tgo import tracking\n"
        "client = MlflowClient()\n"
        "exp = client.get_experiment_by_name('race').experiment_id\n"
        "for i in range(20):\n"
        "    run_id = client.create_run(exp).info.run_id\n"
        "    tracking.log_datasets(run_id, [{'name': 'synthetic-train', 'digest': f'd{i:02d}', 'context': 'training', 'source': {}}])\n"
        "    assert len(client.get_run(run_id).inputs.dataset_inputs) == 1, run_id\n"
    )
    MlflowClient().create_experiment("race")
    procs = [subprocess.Popen([sys.executable, str(script)], env=subprocess_env(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "not recorded" not in err, err[-2000:]
