"""Runs the README's commands, so that the README cannot drift from the code (tests/test_readme.py
and tests/test_readme_smoke.py, two files so that pytest-xdist runs the two halves side by side).

Each command falls under exactly one rule (an unclassified one fails the test):
- SKIP: needs what this machine lacks (ImageNet under /data, a PostgreSQL server on another host,
  `...` to fill in), or is what .ci/run itself runs (the install line, pytest).
- SMOKE: a training, sweep or study command whose epochs as written take minutes each on a CPU: run
  as written plus the smoke preset (`-P preset=smoke` / `--preset smoke`), every other option kept.
  These need nothing from other commands (test_readme_smoke.py).
- EXACT: everything else, run exactly as written (the embedded default `mlflow run . --env-manager
  local` included), in order, in a fresh folder with its own tracking store, `<run_id>` replaced by
  the id of the embedded default run; then the README's Python blocks in the same store
  (test_readme.py). `.` and `notebooks/` point at this checkout.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from helpers import ROOT, sqlite_store, subprocess_env

SKIP = {
    'pip install -e ".[dev]"': "the install line: .ci/run runs it",
    "pytest": "the test command: .ci/run runs it",
    "ruff check": "the lint command: .ci/run runs it",
    "/data/": "needs ImageNet on this machine",
    "db-host": "needs a PostgreSQL server on another host",
    "...": "has a value for the reader to fill in",
    # The same analysis of the same run as the `mlflow run . -e analyze` line before it (which is run);
    # the `tgo analyze` command itself is run by tests/test_scale_out.py against a tracking server.
    "tgo analyze <run_id>": "the same analysis as the mlflow run line above it",
}
SMOKE = ("-e train", "-e sweep", "-e study", "tgo train --preset", "tgo sweep", "tgo study")


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def readme_commands() -> list[str]:
    lines = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()  # the README's comments
            if line:
                lines.append(line)
    return lines


def classify(command: str) -> tuple[str, str]:
    """("skip" | "smoke" | "exact", the line to run)."""
    for needle, reason in SKIP.items():
        if needle in command:
            return "skip", reason
    if command.startswith("mlflow run") and any(s in command for s in SMOKE):
        return "smoke", command + " -P preset=smoke"
    if command.startswith("tgo ") and any(s in command for s in SMOKE):
        return "smoke", command + " --preset smoke"
    return "exact", command


def environment(folder: Path) -> dict[str, str]:
    """A fresh sqlite tracking store in `folder` (schema created once, before any command), this
    checkout on the path, and no MLflow run inherited from the caller."""
    return subprocess_env(sqlite_store(folder))


def run_command(line: str, env: dict[str, str], folder: Path) -> subprocess.CompletedProcess:
    """Run one README line (already classified and filled in) in `folder`; fail with its stderr."""
    line = re.sub(r"^mlflow run \. ", f"mlflow run {ROOT} ", line).replace("notebooks/", f"{ROOT}/notebooks/")
    argv = shlex.split(line)
    argv[0] = os.path.join(os.path.dirname(sys.executable), argv[0])  # the tool of this environment
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=folder, capture_output=True, text=True, timeout=900)
    print(f"{time.perf_counter() - start:6.1f} s  {line}")
    assert proc.returncode == 0, f"README command failed: {line}\n{proc.stderr[-3000:]}"
    return proc
