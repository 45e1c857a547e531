"""Alarms in studies and sweeps: a study prunes a trial whose alarm with action stop fires, and
counts it apart from the pruner's prunes; a sweep names the seeds an alarm stopped.

The collapses are measured, not assumed (the smoke preset on the CPU, seed 0): the head view's
rankme is 18.6 at initialisation; lr 0.03 brings it to 2.7 at epoch 1 (standard error 0.3), lr 3e-4
keeps it at 12.3 and 11.9 (epochs 1, 2), lr 1e-9 learns nothing. At lr 0.01, seed 0 falls to 2.2 at
epoch 1 (se 0.04) while seed 2 stays at 4.9 and 4.5 (se 0.2 and 0.3). Every threshold below sits
many standard errors from these values."""

import math
import warnings

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import metric_steps
from tgo import cli
from tgo.storage import open_storage

COLLAPSE = "collapse: head/rankme < 0.3*init"


@pytest.mark.slow
def test_a_trial_whose_stop_alarm_fires_is_pruned_and_counted_apart_from_the_pruners(store, tmp_path):
    from tgo.study import study

    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: categorical, choices: [0.0003, 1.0e-9, 0.03]}\n")
    storage = f"journal:{tmp_path / 'alarm.journal'}"
    # The trials chosen: first one that collapses (the median pruner cannot judge it: no trial has
    # completed yet, so only its alarm can prune it), then two that learn, then one the pruner
    # stops at epoch 1 (val/acc1 at chance, below the others' median).
    result = study(4, search_space=space, storage=storage, study_name="alarm", preset="smoke", epochs=2, experiment="studies",
                   alarms=COLLAPSE, alarm_action="stop", enqueue=[{"lr": lr} for lr in (0.03, 0.0003, 0.0003, 1e-9)])
    s = optuna.load_study(study_name="alarm", storage=open_storage(storage))
    trials = {t.number: t for t in s.get_trials()}
    assert [trials[n].state for n in range(4)] == [TrialState.PRUNED, TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[0].user_attrs["tgo.pruned_by"] == "alarm"
    assert trials[3].user_attrs["tgo.pruned_by"] == "pruner" and "MedianPruner" in trials[3].user_attrs["tgo.pruned_because"]

    client = MlflowClient()
    collapsed = client.get_run(trials[0].user_attrs["mlflow_run_id"])
    tags = collapsed.data.tags
    assert collapsed.info.status == "KILLED" and tags["tgo.trial_state"] == "PRUNED" and tags["tgo.pruned_by"] == "alarm"
    assert "tgo.stopped_early" in tags and "tgo.stopped_by" not in tags  # pruned by the study, not stopped FINISHED by train
    history = metric_steps(collapsed.info.run_id)
    assert sorted(history["val/loss"]) == [0, 1]  # of 2: ended at the epoch the alarm fired
    assert history["alarm/collapse"] == {0: 0.0, 1: 1.0}
    # The note names the alarm, its epoch and its numbers: the run's own rankme at epoch 1 against
    # 0.3 x its value at epoch 0, as the run's metrics have them.
    rankme = history["geom/final/cls/rankme"]
    assert rankme[1] < 0.3 * rankme[0]  # the measured collapse this test relies on
    note = tags["mlflow.note.content"]
    assert "pruned by an alarm at epoch 1 (alarm_action=stop): alarm collapse at epoch 1: final/cls/rankme" in note
    assert f"{rankme[1]:.4g}" in note and f"{0.3 * rankme[0]:.4g}" in note, note
    assert trials[0].user_attrs["tgo.pruned_because"] in note

    pruned = client.get_run(trials[3].user_attrs["mlflow_run_id"])
    assert pruned.info.status == "KILLED" and pruned.data.tags["tgo.pruned_by"] == "pruner"
    assert "MedianPruner" in pruned.data.tags["mlflow.note.content"]
    # A trial whose alarm does not fire completes, its alarm tested and 0 at every epoch.
    kept = client.get_run(trials[1].user_attrs["mlflow_run_id"])
    assert kept.info.status == "FINISHED" and kept.data.tags["tgo.trial_state"] == "COMPLETE" and "tgo.alarm" not in kept.data.tags
    assert metric_steps(kept.info.run_id)["alarm/collapse"] == {0: 0.0, 1: 0.0, 2: 0.0}

    # The summary counts them apart: the trials table, the parent's metrics, a note (which tgo
    # study prints).
    parent = result.parent_run_id
    counts = client.get_run(parent).data.metrics
    assert (counts["study/complete"], counts["study/pruned_by_pruner"], counts["study/pruned_by_alarm"], counts["study/fail"]) == (2, 1, 1, 0)
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="tables/trials.csv"))
    assert list(table.pruned_by.fillna("")) == list(result.trials.pruned_by) == ["alarm", "", "", "pruner"]
    assert [n for n in result.notes if n.startswith("trial ")] == [f"trial 0 {trials[0].user_attrs['tgo.pruned_because']}."]


def test_the_intermediate_values_figure_draws_alarm_pruned_trials_apart():
    """Optuna's own figure, marked: the alarm-pruned trial dashed with x markers, each pruned line
    labelled by what pruned it, and the counts under the title."""
    from optuna.distributions import FloatDistribution
    from optuna.visualization.matplotlib import plot_intermediate_values

    from tgo.study import _mark_pruned

    s = optuna.create_study()
    ends = [(TrialState.COMPLETE, {}), (TrialState.PRUNED, {"tgo.pruned_by": "pruner"}), (TrialState.PRUNED, {"tgo.pruned_by": "alarm"}),
            (TrialState.PRUNED, {"tgo.surplus": True})]
    for state, attrs in ends:
        s.add_trial(optuna.trial.create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None,
                                              params={"lr": 0.1}, distributions={"lr": FloatDistribution(0.01, 1)},
                                              intermediate_values={1: 0.5, 2: 0.7}, user_attrs=attrs))
    from tgo.study import pruned_by

    trials = pd.DataFrame({"number": [t.number for t in s.trials], "state": [t.state.name for t in s.trials],
                           "pruned_by": [pruned_by(t) for t in s.trials]})
    assert list(trials.pruned_by) == ["", "pruner", "alarm", "surplus"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot_intermediate_values(s)
    _mark_pruned(ax.figure, trials)
    lines = {str(line.get_label()): line for line in ax.get_lines()}
    assert set(lines) == {"Trial0", "Trial1 (pruned by the pruner)", "Trial2 (pruned by an alarm)", "Trial3"}
    alarm = lines["Trial2 (pruned by an alarm)"]
    assert alarm.get_linestyle() == "--" and alarm.get_marker() == "x"
    assert all(line.get_linestyle() == "-" for label, line in lines.items() if "alarm" not in label)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines)
    assert ax.get_title().endswith("1 trial(s) pruned by the pruner, 1 by an alarm")


@pytest.mark.slow
def test_a_sweep_names_the_seeds_an_alarm_stopped(store, capsys):
    # lr 0.01: seed 0's rankme falls to 2.2 at epoch 1, seed 2's stays at 4.9 and 4.5 (above 3.5).
    argv = ["sweep", "--seeds", "0,2", "--storage", "journal:sweep.journal", "--study_name", "stopped", "--preset", "smoke",
            "--epochs", "2", "--lr", "0.01", "--experiment", "sweeps", "--alarms", "collapse: head/rankme < 3.5", "--alarm_action", "stop"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "seed 0's run" in out and "stopped by alarm collapse at epoch 1 of 2" in out and "seed 2's run" not in out
    client = MlflowClient()
    (parent,) = mlflow.search_runs(experiment_names=["sweeps"], filter_string="tags.`tgo.kind` = 'sweep'", output_format="list")
    assert parent.data.tags["tgo.stopped_seeds"] == '{"0": {"alarms": ["collapse"], "epoch": 1, "of": 2}}'
    runs = {int(r.data.params["config.seed"]): r for r in mlflow.search_runs(
        experiment_names=["sweeps"], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list")}
    assert runs[0].info.status == runs[2].info.status == "FINISHED"  # a stopped seed is complete: a sweep prunes nothing
    seed0, seed2 = metric_steps(runs[0].info.run_id), metric_steps(runs[2].info.run_id)
    assert sorted(seed0["val/loss"]) == [0, 1] and sorted(seed2["val/loss"]) == [0, 1, 2]
    # Per epoch: epoch 2's mean is seed 2's alone, not averaged with seed 0's last (epoch 1) value.
    key = "geom/final/cls/rankme"
    mean = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, f"seeds/mean/{key}")}
    assert mean[1] == pytest.approx((seed0[key][1] + seed2[key][1]) / 2)
    assert mean[2] == pytest.approx(seed2[key][2]) and not math.isclose(mean[2], (seed0[key][1] + seed2[key][2]) / 2)
