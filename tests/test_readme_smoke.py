"""The README's training, sweep and study commands, as written plus the smoke preset: see
tests/readme_runner.py for the rules."""

import mlflow
import pytest
from readme_runner import classify, environment, readme_commands, run_command

pytestmark = pytest.mark.slow  # trains, sweeps and studies through the README's commands


def test_every_smoke_readme_command_runs(tmp_path):
    env = environment(tmp_path)
    lines = [line for kind, line in map(classify, readme_commands()) if kind == "smoke"]
    assert any("-e sweep" in line for line in lines) and any("-e study" in line for line in lines)
    for line in lines:
        run_command(line, env, tmp_path)
    runs = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()]
    )
    # Every run finished, but a study's pruned trials, which end as KILLED and say so.
    ended = [r.info.status == "FINISHED" or (r.info.status == "KILLED" and r.data.tags.get("tgo.trial_state") == "PRUNED") for r in runs]
    assert runs and all(ended), [(r.info.run_name, r.info.status, r.data.tags.get("tgo.trial_state")) for r in runs]
