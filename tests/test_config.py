"""The typed config, presets, and MLproject parameters reaching their command."""

import re
import subprocess
import sys

import pytest
import yaml

from helpers import ROOT
from tgo import cli
from tgo.config import FIELD_TYPES, PRESETS, ConfigError, TrainConfig, resolve


def test_presets_resolve_and_tgo1_is_the_deit_recipe():
    for name in PRESETS:
        cfg = resolve(name, data_dir="/data/imagenet100")
        assert cfg.preset == name
    tgo1 = resolve("tgo1", data_dir="/x")
    assert (tgo1.img_size, tgo1.dataset, tgo1.opt, tgo1.sched) == (224, "imagenet100", "adamw", "cosine")
    assert tgo1.resolved_lr == pytest.approx(5e-4 * 256 / 512)
    assert (tgo1.weight_decay, tgo1.warmup_epochs, tgo1.smoothing) == (0.05, 5, 0.1)
    assert (tgo1.mixup, tgo1.cutmix, tgo1.reprob, tgo1.drop_path) == (0.8, 1.0, 0.25, 0.1)
    assert tgo1.auto_augment == "rand-m9-mstd0.5-inc1" and tgo1.probe_size == 1000
    assert resolve("tgo1", data_dir="/x", batch_size=512).resolved_lr == pytest.approx(5e-4)


def test_strings_are_parsed_and_empty_means_the_preset_value():
    cfg = resolve("demo", epochs="3", lr="0.01", compile="true", dataset="", auto_augment="")
    assert cfg.epochs == 3 and cfg.lr == 0.01 and cfg.compile is True
    assert cfg.dataset == "digits" and cfg.auto_augment == PRESETS["demo"].get("auto_augment", TrainConfig().auto_augment)
    assert resolve("demo", epochs="4.0").epochs == 4


def test_integers_are_read_exactly_never_through_a_float():
    assert resolve("demo", seed="4294967295").seed == 2**32 - 1
    assert resolve("demo", epochs="1e3").epochs == 1000 and resolve("demo", epochs="3.0").epochs == 3  # MLflow's float parameters
    with pytest.raises(ConfigError) as err:
        resolve("demo", epochs="99999999999999999999999")
    assert "99999999999999991611392" not in str(err.value)  # what a float makes of it


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(nonsense=1), "unknown parameter(s) nonsense"),
        (dict(epochs="x"), "epochs: expected an integer, got 'x'"),
        (dict(epochs=True), "epochs: expected an integer"),
        (dict(lr="fast"), "lr: expected a number, got 'fast'"),
        (dict(lr="nan"), "lr: expected a finite number"),
        (dict(compile="maybe"), "compile: expected true or false"),
        (dict(dataset=3), "dataset: expected a string"),
        (dict(hflip=2), "hflip: must be a number in [0, 1]"),
        (dict(amp="fp8"), "amp: unknown mode 'fp8'; choose one of auto, bf16, fp16, off"),
        (dict(mixup=0.8, batch_size=7), "batch_size: mixup/cutmix need an even batch size"),
        (dict(checkpoint_epochs="0,x"), "checkpoint_epochs: expected epochs separated by commas"),
        (dict(probe_size=1), "probe_size: must be an integer in [2, 100000000] (a covariance needs two images)"),
        (dict(probe_precision="float16"), "probe_precision: choose float64 or float32"),
        (dict(probe_folds=0), "probe_folds: must be an integer in [1, 10000]"),
        (dict(opt="nonexistent_opt"), "opt: unknown optimiser 'nonexistent_opt'; timm knows"),
        (dict(auto_augment="garbage-spec"), "auto_augment: timm cannot read 'garbage-spec'"),
        (dict(probe_seed=99999999999999999999999), "probe_seed: must be an integer in [0, 2^32 - 1]"),
        (dict(epochs="99999999999999999999999"), "epochs: must be an integer in [0, 1000000], got '99999999999999999999999'"),
        (dict(epochs="1e999999999"), "epochs: must be an integer in [0, 1000000], got '1e999999999'"),
        (dict(num_classes=1), "num_classes: must be 0 (the dataset's count) or at least 2"),
        (dict(probe_size=4, probe_folds=5), "probe_folds: 5 folds need at least 5 probe images, got probe_size=4"),
    ],
)
def test_bad_values_name_the_parameter(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve("demo", **overrides)
    assert message in str(err.value)


def test_checkpoint_epochs():
    assert resolve("demo", epochs=5, checkpoint_epochs="0,2,last").checkpoint_epoch_set() == {0, 2, 5}
    assert resolve("demo", epochs=3, checkpoint_epochs="all").checkpoint_epoch_set() == {0, 1, 2, 3}
    assert resolve("demo", checkpoint_epochs="none").checkpoint_epoch_set() == set()


def _mlproject():
    return yaml.safe_load((ROOT / "MLproject").read_text())


def test_every_mlproject_parameter_reaches_its_command_and_tgo():
    project = _mlproject()
    assert {"main", "train", "train_ddp", "analyze"} <= set(project["entry_points"])
    for name, entry in project["entry_points"].items():
        params, command = entry["parameters"], entry["command"]
        for param, spec in params.items():
            assert "type" in spec and ("default" in spec or param in ("run_id", "run_a", "run_b", "checkpoints")), (name, param)
            assert spec["type"] in ("string", "float", "path", "uri"), (name, param)
            assert f"{{{param}}}" in command, f"{name}: parameter {param} does not reach the command"
        if "entrypoints/train.py" not in command:
            continue
        # Every parameter handed to entrypoints/train.py is a TrainConfig field (and nothing else).
        tgo_args = command.split("entrypoints/train.py", 1)[1]
        flags = re.findall(r"--(\w+) \{(\w+)\}", tgo_args)
        assert all(flag == value for flag, value in flags)
        assert {f for f, _ in flags} == set(FIELD_TYPES), name
        assert set(params) - {f for f, _ in flags} <= {"nproc_per_node"}


def test_mlproject_comments_repeat_each_parameters_help():
    """Each train parameter's help is written once (TrainConfig's field metadata, HELP); MLproject's
    comment above the parameter repeats it word for word."""
    from tgo.config import HELP

    lines = (ROOT / "MLproject").read_text().splitlines()
    seen = set()
    for above, line in zip(lines, lines[1:]):
        found = re.match(r"\s+(\w+): \{type:", line)
        if found and found.group(1) in HELP and found.group(1) not in seen:  # the shared train list comes first
            name = found.group(1)
            seen.add(name)
            assert above.strip() == f"# {HELP[name]}", (name, above.strip(), HELP[name])
    assert seen == set(HELP)


def test_a_value_given_to_mlflow_reaches_the_config(monkeypatch):
    """Render the train command as MLflow does, parse it with tgo's own parser, resolve it."""
    from mlflow.projects._project_spec import load_project

    entry = load_project(str(ROOT)).get_entry_point("train")
    values = {"preset": "smoke", "epochs": "3", "lr": "0.002", "probe_size": "16", "checkpoint_epochs": "0,last", "device": "cpu"}
    command = entry.compute_command(values, storage_dir=None)
    argv = __import__("shlex").split(command)
    assert argv[:2] == ["python", "entrypoints/train.py"]
    args = cli.build_parser().parse_args(["train", *argv[2:]])
    given = {k: getattr(args, k) for k in FIELD_TYPES}
    cfg = resolve(given.pop("preset"), **given)
    assert (cfg.preset, cfg.epochs, cfg.lr, cfg.probe_size, cfg.device) == ("smoke", 3, 0.002, 16, "cpu")


@pytest.mark.slow
def test_cli_help_lists_every_option():
    out = subprocess.run([sys.executable, "-m", "tgo", "train", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    for name in FIELD_TYPES:
        assert f"--{name}" in out, name
    top = subprocess.run([sys.executable, "-m", "tgo", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    assert "train" in top and "data" in top
    bad = subprocess.run([sys.executable, "-m", "tgo", "train", "--epochs", "x"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "epochs: expected an integer" in bad.stderr and "Traceback" not in bad.stderr


def test_analyze_parameters_reach_tgo_analyze():
    from mlflow.projects._project_spec import load_project

    entry = load_project(str(ROOT)).get_entry_point("analyze")
    values = {"run_id": "abc", "probe_size": "12", "data_dir": "/d", "probe_seed": "3", "sites": "final/cls", "device": "cpu"}
    argv = __import__("shlex").split(entry.compute_command(values, storage_dir=None))
    assert argv[:2] == ["python", "entrypoints/analyze.py"]
    args = cli.build_parser().parse_args(["analyze", *argv[2:]])
    assert (args.run_id, args.probe_size, args.data_dir, args.probe_seed, args.sites, args.device) == ("abc", "12", "/d", "3", "final/cls", "cpu")


def test_probe_parameters_reach_tgo_probe_with_trains_names_and_help():
    """`mlflow run . -e probe`: every parameter reaches `tgo probe`'s parser under its own name; the
    model, data and probe parameters are train's (tgo.config.PROBE_FIELDS, with train's help), the
    probe's own have the help of cli.PROBE_HELP above them in MLproject."""
    from mlflow.projects._project_spec import load_project

    from tgo.config import HELP, PROBE_FIELDS

    spec = _mlproject()["entry_points"]["probe"]["parameters"]
    assert set(spec) == set(PROBE_FIELDS) | set(cli.PROBE_HELP)
    values = {name: f"v_{name}" for name in spec}
    argv = __import__("shlex").split(load_project(str(ROOT)).get_entry_point("probe").compute_command(values, storage_dir=None))
    assert argv[:2] == ["python", "entrypoints/probe.py"]
    args = cli.build_parser().parse_args(["probe", *argv[2:]])
    assert {name: getattr(args, name) for name in spec} == values
    lines = (ROOT / "MLproject").read_text().split("  probe:\n", 1)[1].split("\n  analyze:", 1)[0].splitlines()
    for above, line in zip(lines, lines[1:]):
        found = re.match(r"\s+(\w+): \{type:", line)
        if found:
            name = found.group(1)
            assert above.strip() == f"# {cli.PROBE_HELP[name] if name in cli.PROBE_HELP else HELP[name]}", name


def test_a_device_name_is_resolved_and_checked_in_one_place(monkeypatch):
    # resolve_device checks without side effects (a command checks its device before any work);
    # here against a pretended machine, so that the CUDA rules are tested on any machine.
    import torch

    from tgo.runtime import resolve_device

    for name in ("tpu", "cuda:x", "gpu"):
        with pytest.raises(ConfigError, match=re.escape(f"device: {name!r} is not available here; choose auto, cpu, cuda, cuda:N or mps.")):
            resolve_device(name)
    assert resolve_device("CPU") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'mps' is not available on this machine"):
        resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device: 'cuda:0' asked for CUDA, but torch sees no CUDA GPU on this machine; use device=cpu"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1) == resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=re.escape("device: 'cuda:2': this machine has 2 CUDA device(s).")):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match=re.escape("device: 'cuda' (the GPU of local rank 2): this machine has 2 CUDA device(s).")):
        resolve_device("cuda", local_rank=2)
