"""Every command in the README's code blocks that can run on this machine is run here, so that the
README cannot drift from the code. Each command falls under exactly one rule (an unclassified one
fails the test):

- SKIP: needs what this machine lacks (ImageNet under /data, a PostgreSQL server on another host,
  `...` to fill in), or is what .ci/run itself runs (the install line, pytest).
- SMOKE: a training, sweep or study command whose epochs as written take minutes each on a CPU: run
  as written plus the smoke preset (`-P preset=smoke` / `--preset smoke`), every other option kept.
- everything else runs exactly as written (the embedded default `mlflow run . --env-manager local`
  included), in a fresh folder with its own tracking store, `<run_id>` replaced by the id of the
  embedded default run; `.` and `notebooks/` point at this checkout.
"""

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
SKIP = {
    'pip install -e ".[dev]"': "the install line: .ci/run runs it",
    "pytest": "the test command: .ci/run runs it",
    "/data/": "needs ImageNet on this machine",
    "db-host": "needs a PostgreSQL server on another host",
    "...": "has a value for the reader to fill in",
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
    for needle, reason in SKIP.items():
        if needle in command:
            return "skip", reason
    if command.startswith("mlflow run") and any(s in command for s in SMOKE):
        return "smoke", command + " -P preset=smoke"
    if command.startswith("tgo ") and any(s in command for s in SMOKE):
        return "smoke", command + " --preset smoke"
    return "exact", command


def test_every_readme_command_runs(tmp_path):
    commands = readme_commands()
    assert "mlflow run . --env-manager local" in commands and "pytest" in commands
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONPATH=str(ROOT))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(key, None)
    subprocess.run([sys.executable, "-c", "import mlflow; mlflow.MlflowClient().search_experiments()"], env=env, cwd=tmp_path, check=True)
    ran, skipped = [], []
    run_id = ""
    for command in commands:
        kind, line = classify(command)
        if kind == "skip":
            skipped.append(command)
            continue
        if "<run_id>" in line:
            assert run_id, f"{command}: no run made yet to stand for <run_id>"
            line = line.replace("<run_id>", run_id)
        line = re.sub(r"^mlflow run \. ", f"mlflow run {ROOT} ", line).replace("notebooks/", f"{ROOT}/notebooks/")
        argv = shlex.split(line)
        argv[0] = os.path.join(os.path.dirname(sys.executable), argv[0])  # the tool of this environment
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        print(f"{time.perf_counter() - start:6.1f} s  {line}")
        assert proc.returncode == 0, f"README command failed: {line}\n{proc.stderr[-3000:]}"
        if command == "mlflow run . --env-manager local":
            mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
            try:
                (default,) = mlflow.search_runs(experiment_names=["Default"], output_format="list")
            finally:
                mlflow.set_tracking_uri(None)
            assert default.info.status == "FINISHED" and default.data.params["preset"] == "demo"
            assert int(default.data.params["config.epochs"]) == 10
            run_id = default.info.run_id
        if command.startswith("mlflow run . -e analyze"):
            # The analysis is the launcher run of `mlflow run`, a child of the training run, and
            # the training run points at it.
            client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
            analysis_id = client.get_run(run_id).data.tags["tgo.analysis_run"]
            analysis = client.get_run(analysis_id)
            assert analysis.data.params["run_id"] == run_id and analysis.data.tags["mlflow.parentRunId"] == run_id
            assert analysis.info.status == "FINISHED" and "finding 1:" in proc.stdout
            assert "figures/correlation_final_cls.png" in {a.path for a in client.list_artifacts(analysis_id, "figures")}
        ran.append(command)
    assert len(ran) >= 10 and all(reason for reason in SKIP.values())
    # The Python blocks, as written, in the same store.
    for block in readme_blocks("python"):
        proc = subprocess.run([sys.executable, "-c", block], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README Python block failed:\n{block}\n{proc.stderr[-3000:]}"


def test_readme_names_the_classified_commands():
    kinds = {classify(c)[0] for c in readme_commands()}
    assert kinds == {"skip", "smoke", "exact"}
