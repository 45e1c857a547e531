"""The package's structure is what docs/ARCHITECTURE.md draws: its module list is the layer order
(data flows down it, nothing imports upward), it names every module, MLflow is imported in one
module, and the commands are peers. The list is read from the document itself, so the picture
cannot drift from the code."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("analysis", "compare", "series", "sweep", "study")  # peers: none imports another


def _modules() -> dict[str, Path]:
    """tgo's modules by dotted name (recursive: subpackages count)."""
    out = {}
    for path in sorted((ROOT / "tgo").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The tgo modules `path` imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tgo":
                found |= {f"tgo.{a.name}" for a in node.names if f"tgo.{a.name}" in modules}
            elif node.module.startswith("tgo."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tgo.")}
    return {m for m in found if m in modules}


def _documented_order() -> list[list[str]]:
    """docs/ARCHITECTURE.md's module list, top to bottom: each line's modules (one or several)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"```\n(.*?)```", text, re.S).group(1)
    rows = []
    for line in block.splitlines():
        names = re.match(r"((?:tgo/[\w/]+\.py(?:, )?)+)", line)
        if names:
            rows.append([n.removesuffix(".py").replace("/", ".").removesuffix(".__init__") for n in names.group(1).split(", ")])
    return rows


def test_architecture_lists_every_module_once():
    listed = [m for row in _documented_order() for m in row]
    assert len(listed) == len(set(listed)), "a module is listed twice in docs/ARCHITECTURE.md"
    assert sorted(listed) == sorted(set(_modules()) - {"tgo"}), "docs/ARCHITECTURE.md must list every module of tgo/"


def _upward(modules: dict[str, Path]) -> list[str]:
    """Every import that runs up (or sideways) the documented order, as "a -> b"."""
    rank = {m: i for i, row in enumerate(_documented_order()) for m in row}
    return [f"{a} -> {b}" for a in rank for b in sorted(_imports(modules[a], modules)) if rank[b] <= rank[a]]


def test_nothing_imports_upward():
    upward = _upward(_modules())
    assert not upward, "imports that run up (or sideways) the layer order of docs/ARCHITECTURE.md: " + ", ".join(upward)


def test_the_commands_are_peers():
    modules = _modules()
    for name in COMMANDS:
        others = {f"tgo.{o}" for o in COMMANDS if o != name}
        assert not _imports(modules[f"tgo.{name}"], modules) & others, f"tgo.{name} imports another command"


def test_the_layer_test_sees_an_upward_import(tmp_path):
    """The check can fail: a low module (keys) importing a high one (train) is reported."""
    modules = _modules()
    fake = tmp_path / "keys.py"
    fake.write_text(modules["tgo.keys"].read_text() + "\nfrom tgo import train  # noqa\n")
    assert "tgo.keys -> tgo.train" in _upward({**modules, "tgo.keys": fake})


def test_only_tracking_imports_mlflow():
    """MLflow is touched in one layer (docs/ARCHITECTURE.md): tgo/tracking.py."""
    importers = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                importers.add(name)
    assert importers == {"tgo.tracking"}


def test_tags_are_spelled_in_the_vocabulary_only():
    """The run protocol can be found with one grep: tgo.* tag and attribute names are string
    literals in tgo/keys.py only (messages and docstrings may mention them in backticks)."""
    spelled = {}
    for name, path in _modules().items():
        if name == "tgo.keys":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"tgo\.[a-z_]+\.?", node.value):
                spelled.setdefault(name, []).append(node.value)
    assert not spelled, f"tag names outside tgo/keys.py: {spelled}"
