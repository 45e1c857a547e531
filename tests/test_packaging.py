"""The project's own files agree with each other: dependencies, entry points, CI."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


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
    for marker in ("<!-- ci:install -->", "<!-- ci:test -->"):
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


def test_only_tracking_imports_mlflow():
    """MLflow is touched in one layer (docs/ARCHITECTURE.md): tgo/tracking.py."""
    import ast

    importers = set()
    for path in (ROOT / "tgo").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                importers.add(path.name)
    assert importers == {"tracking.py"}
