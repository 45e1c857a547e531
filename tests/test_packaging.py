"""The project's own files agree with each other: dependencies, entry points, CI."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from helpers import ROOT


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_conda_yaml_and_pyproject_name_the_same_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    conda_reqs = sorted(r.replace(" ", "") for r in pip if not r.startswith("-e"))
    assert conda_reqs == sorted(r.replace(" ", "") for r in project["dependencies"])
    python = next(d for d in conda["dependencies"] if isinstance(d, str) and d.startswith("python="))
    minimum = project["requires-python"].removeprefix(">=")
    assert tuple(map(int, python.split("=")[1].split("."))) >= tuple(map(int, minimum.split(".")))


def test_readme_has_the_blocks_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    for marker in ("<!-- ci:install -->", "<!-- ci:lint -->", "<!-- ci:test -->"):
        after = readme.split(marker, 1)[1]
        assert re.match(r"\s*```", after), f"{marker} must be followed by a fenced block"
    assert 'pip install -e ".[dev]"' in readme
    assert "pytest" in readme.split("<!-- ci:test -->", 1)[1].split("```")[1]


def test_the_package_ships_the_imagenet100_class_list():
    from importlib.resources import files

    classes = files("tgo").joinpath("data/imagenet100_classes.txt").read_text().split()
    assert len(classes) == len(set(classes)) == 100
    assert all(re.fullmatch(r"n\d{8}", c) for c in classes)
    shared = ROOT.parent / "shared" / "data" / "imagenet100_classes.txt"
    if shared.exists():
        assert classes == shared.read_text().split()


@pytest.mark.slow
def test_a_built_wheel_installs_and_runs_a_study_with_its_default_search_space(tmp_path):
    """A regular (non-editable) install has no checkout beside it: the default search space and the
    class list ship inside the package, the version is the package's, and `tgo` is on PATH."""
    import os
    import subprocess
    import sys
    import sysconfig

    import tgo

    import shutil

    # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds.
    source = shutil.copytree(ROOT, tmp_path / "src", ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "mlruns", "*.db", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(source)], check=True,
                   capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("tgo-*.whl")
    assert wheel.name.startswith(f"tgo-{tgo.__version__}-")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    # The dependencies come from this environment (a path in a .pth file: its own .pth files, this
    # checkout's editable install among them, are not read), tgo only from the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHONPATH"))}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    where = subprocess.run([python, "-c", "import tgo; print(tgo.__file__)"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site))
    version = subprocess.run([venv / "bin" / "tgo", "--version"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert version.stdout.strip() == f"tgo {tgo.__version__}"
    proc = subprocess.run([venv / "bin" / "tgo", "study", "--n_trials", "1", "--preset", "smoke", "--epochs", "1", "--pruner", "none",
                           "--storage", f"journal:{tmp_path / 'study.journal'}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "param.lr" in proc.stdout  # the default space (lr among its settings) was read from the package
