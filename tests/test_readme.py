"""The README's exact commands (the embedded default and what follows from it) and its Python blocks,
run as written: see tests/readme_runner.py for the rules."""

import subprocess
import sys

import mlflow
import pytest
from readme_runner import SKIP, classify, environment, readme_blocks, readme_commands, run_command


@pytest.mark.slow
def test_every_exact_readme_command_and_python_block_runs(tmp_path):
    commands = readme_commands()
    assert "mlflow run . --env-manager local" in commands and "pytest" in commands
    env = environment(tmp_path)
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    ran, run_id = [], ""
    for command in commands:
        kind, line = classify(command)
        if kind != "exact":
            continue
        if "<run_id>" in line:
            assert run_id, f"{command}: no run made yet to stand for <run_id>"
            line = line.replace("<run_id>", run_id)
        proc = run_command(line, env, tmp_path)
        if command == "mlflow run . --env-manager local":
            (default,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
            assert default.info.status == "FINISHED" and default.data.params["preset"] == "demo"
            assert int(default.data.params["config.epochs"]) == 10
            run_id = default.info.run_id
        if command.startswith("mlflow run . -e analyze"):
            # The analysis is the launcher run of `mlflow run`, a child of the training run, and
            # the training run points at it.
            analysis_id = client.get_run(run_id).data.tags["tgo.analysis_run"]
            analysis = client.get_run(analysis_id)
            assert analysis.data.params["run_id"] == run_id and analysis.data.tags["mlflow.parentRunId"] == run_id
            assert analysis.info.status == "FINISHED" and "finding 1:" in proc.stdout
            assert "figures/correlation_final_cls.png" in {a.path for a in client.list_artifacts(analysis_id, "figures")}
        ran.append(command)
    assert all(reason for reason in SKIP.values())
    assert {"mlflow run . --env-manager local", "tgo train --help"} <= set(ran), ran
    assert any(c.startswith("mlflow run . -e analyze") for c in ran) and any(c.startswith("papermill") for c in ran), ran
    # The Python blocks, as written, in the same store (where the analyses are the latest runs).
    blocks = readme_blocks("python")
    assert len(blocks) >= 2
    for block in blocks:
        proc = subprocess.run([sys.executable, "-c", block], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README Python block failed:\n{block}\n{proc.stderr[-3000:]}"
        if "get_metric_history" in block:
            assert "[(0, " in proc.stdout and "(10, " in proc.stdout, proc.stdout  # the demo's 11 epochs


def test_readme_commands_are_all_classified():
    kinds = [classify(c)[0] for c in readme_commands()]
    assert set(kinds) == {"skip", "smoke", "exact"}
