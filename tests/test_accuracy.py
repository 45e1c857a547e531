"""What the geometry says about accuracy (tgo.accuracy): the table against scipy on the same
numbers, Holm and Benjamini-Hochberg against hand computations, the picks against numpy's argmax,
the false-positive rate on noise and the power on a clear relation; and `tgo analyze` on the
session's smoke run, through the command, logging the table and the report's section."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import warnings

import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.stats
from mlflow.tracking import MlflowClient

from helpers import store_copy, subprocess_env
from tgo import accuracy as A
from tgo.spectral import OBSERVABLE_NAMES

ALPHA = 0.05
EXPECTED = {  # TGO-I's directions (findings 1-4) and RankMe's, written out here
    "effective_rank": 1, "participation_ratio": 1, "spectral_entropy": 1, "spectral_flatness": 1,
    "spectral_anisotropy": -1, "cosine_anisotropy": -1, "alpha": -1, "rankme": 1,
}


def _geometry(values: dict[tuple[str, str, str], np.ndarray], epochs) -> pd.DataFrame:
    """The tidy geometry table of (site, view, observable) -> one value per epoch."""
    rows = [(int(e), s, v, o, float(y), np.nan) for (s, v, o), ys in values.items() for e, y in zip(epochs, ys)]
    return pd.DataFrame(rows, columns=["epoch", "site", "view", "observable", "value", "se"])


def _noise_run(rng, epochs: int, sites=(("final", "cls"),)) -> tuple[pd.DataFrame, dict[int, float]]:
    """Every observable at every site/view independent noise, and accuracy independent of it."""
    values = {(s, v, o): rng.normal(size=epochs) for s, v in sites for o in OBSERVABLE_NAMES}
    return _geometry(values, range(epochs)), dict(enumerate(rng.normal(50, 5, size=epochs)))


def _row(table: pd.DataFrame, site: str, view: str, observable: str) -> pd.Series:
    (i,) = np.flatnonzero((table.site == site) & (table.view == view) & (table.observable == observable))
    return table.iloc[i]


def _permutation_p(x, y, resamples=np.inf) -> float:
    """scipy's permutation test of Spearman's rho: over every pairing (n_resamples=inf), or random ones."""
    rx = scipy.stats.rankdata(x) - (len(x) + 1) / 2

    def rho(b, axis=-1):  # Pearson's r of the ranks, for a stack of pairings at once
        rb = scipy.stats.rankdata(b, axis=axis)
        rb = rb - rb.mean(axis=axis, keepdims=True)
        return (rb * rx).sum(axis=axis) / np.sqrt((rb**2).sum(axis=axis) * (rx**2).sum())

    assert rho(np.asarray(y)) == pytest.approx(scipy.stats.spearmanr(x, y).statistic)
    test = scipy.stats.permutation_test((y,), rho, permutation_type="pairings", n_resamples=resamples, vectorized=True, rng=np.random.default_rng(99))
    return test.pvalue


@pytest.mark.parametrize("epochs", [4, 6, 12])
def test_rho_and_p_are_scipy_on_the_same_numbers(epochs):
    """rho is scipy's spearmanr; p is scipy's exact permutation test up to 8 epochs (ties included)
    and, above, a permutation test over 9999 random pairings, within the Monte Carlo error of
    scipy's own (other pairings); a monotone 4-point series gets the exact 1/12, not the t
    approximation's 0."""
    rng = np.random.default_rng(epochs)
    acc = np.round(rng.normal(50, 3, size=epochs))  # rounded: tied accuracies
    acc[1] = acc[0]
    values = {("final", "cls", o): acc * rng.uniform(-1, 1) + rng.normal(size=epochs) for o in OBSERVABLE_NAMES[:6]}
    values[("final", "cls", "alpha")] = -acc + 0.01 * np.arange(epochs)  # monotone in accuracy, with the tie broken
    values[("block_00", "patch", "rankme")] = np.floor(rng.normal(size=epochs) * 2)  # tied values
    table = A.over_epochs(_geometry(values, range(epochs)), pd.Series(acc, index=range(epochs)))
    assert len(table) == len(values)
    for (site, view, name), y in values.items():
        row = _row(table, site, view, name)
        rho, p_t = scipy.stats.spearmanr(acc, y)
        assert row.n == epochs and row.rho == pytest.approx(rho, abs=1e-12)
        if epochs <= 8:
            assert row.p_method == "exact" and row.p == pytest.approx(_permutation_p(acc, y), rel=1e-9)
        else:
            reference = _permutation_p(acc, y, 9999)
            assert row.p_method == "permutation" and abs(row.p - reference) <= 5 * np.sqrt(reference / 9999) + 3e-4, (row.p, reference)
            if p_t > 0.001:
                assert row.p == pytest.approx(p_t, abs=0.1 * p_t + 0.005)  # near the t approximation, off the far tail
    if epochs == 4:
        strict = pd.Series([1.0, 2.0, 3.0, 4.0])
        one = A.over_epochs(_geometry({("final", "cls", "effective_rank"): strict.to_numpy() ** 2}, range(4)), strict)
        assert one.rho.iloc[0] == pytest.approx(1.0) and one.p.iloc[0] == pytest.approx(2 / math.factorial(4))
        assert scipy.stats.spearmanr(strict, strict**2).pvalue < 1e-6  # what the t approximation would have said


def test_holm_and_benjamini_hochberg_against_hand_computations():
    """Holm across the observables of each site/view, BH across the site/views on each one's
    smallest Holm p, recomputed here by their textbook definitions; some rows significant, some not."""
    rng = np.random.default_rng(3)
    epochs = 12
    acc = np.linspace(40, 70, epochs) + rng.normal(0, 1, epochs)
    sites = [("block_00", "cls"), ("block_01", "mean"), ("final", "cls"), ("final", "mean")]
    strength = {"block_00": 0.0, "block_01": 0.6, "final": 3.0}
    values = {(s, v, o): strength[s] * (acc - acc.mean()) / acc.std() * (j % 3 == 0) + rng.normal(size=epochs)
              for s, v in sites for j, o in enumerate(OBSERVABLE_NAMES)}
    table = A.over_epochs(_geometry(values, range(epochs)), dict(enumerate(acc)))
    smallest = {}
    for site, view in sites:
        part = table[(table.site == site) & (table.view == view)]
        p = part.p.to_numpy()
        m, order = len(p), np.argsort(p)
        holm = np.empty(m)
        running = 0.0
        for i, j in enumerate(order):  # adj_(i) = max_{k <= i} min(1, (m - k + 1) p_(k)), i from 1
            running = max(running, min(1.0, (m - i) * p[j]))
            holm[j] = running
        np.testing.assert_allclose(part.p_holm, holm, rtol=1e-12)
        assert (part.significant == (holm < ALPHA)).all()
        smallest[(site, view)] = holm.min()
    keys = sorted(smallest, key=smallest.get)
    m = len(keys)
    q = {}
    for i in range(m, 0, -1):  # q_(i) = min_{k >= i} min(1, m p_(k) / k)
        q[keys[i - 1]] = min(min(1.0, m * smallest[keys[i - 1]] / i), q.get(keys[i], 1.0) if i < m else 1.0)
    passing = [i for i in range(1, m + 1) if smallest[keys[i - 1]] <= i * ALPHA / m]  # step-up: the largest such i
    cutoff = smallest[keys[max(passing) - 1]] if passing else -1.0
    for (site, view), qi in q.items():
        part = table[(table.site == site) & (table.view == view)]
        np.testing.assert_allclose(part.q, qi, rtol=1e-12)
        assert (part.significant_everywhere == (part.p_holm <= cutoff)).all()
    assert table.significant.any() and not table.significant.all()
    assert table.significant_everywhere.any() and not table[table.site == "block_00"].significant.any()


def test_picks_are_numpys_argmax_in_the_expected_or_in_sample_direction():
    rng = np.random.default_rng(5)
    epochs = np.array([0, 1, 2, 4, 8, 16])  # probed epochs that are not 0..n-1
    acc = rng.normal(50, 5, size=len(epochs))
    values = {("final", "cls", o): rng.normal(size=len(epochs)) for o in OBSERVABLE_NAMES}
    tied = np.array([3.0, 5.0, 1.0, 5.0, 5.0, 0.0])
    values[("final", "cls", "effective_rank")] = tied  # a tie at the top: the earliest epoch wins
    values[("final", "cls", "spectral_anisotropy")] = -tied
    extra = {e: 99.0 for e in (3, 5)}  # val/acc1 at epochs without geometry: left out
    table = A.over_epochs(_geometry(values, epochs), {**dict(zip(epochs, acc)), **extra})
    best = epochs[np.argmax(acc)]
    for name, y in values.items():
        row = _row(table, *name)
        expected = EXPECTED.get(name[2])
        direction = expected if expected is not None else np.sign(scipy.stats.spearmanr(acc, y).statistic)
        assert row.direction == direction and row.direction_from == ("in-sample" if expected is None else "TGO-I" if name[2] != "rankme" else "RankMe")
        i = np.argmax(direction * y)
        assert row.pick == epochs[i] and row.accuracy_at_pick == pytest.approx(acc[i])
        assert row.accuracy_pick == best and row.accuracy_best == pytest.approx(acc.max()) and row.agree == (epochs[i] == best)
        assert row.n == len(epochs)
    assert _row(table, "final", "cls", "effective_rank").pick == 1 and _row(table, "final", "cls", "spectral_anisotropy").pick == 1


def test_constant_series_give_nan_quietly_and_are_never_significant():
    epochs = 7
    acc = dict(enumerate(np.arange(epochs) * 3.0 + 10))
    values = {("final", "cls", o): np.arange(epochs, dtype=float) for o in OBSERVABLE_NAMES}
    values[("final", "cls", "alpha")] = np.full(epochs, 0.7)
    values[("pos_embed", "cls", "effective_rank")] = np.zeros(epochs)  # a view without variance
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConstantInputWarning, no RuntimeWarning
        table = A.over_epochs(_geometry(values, range(epochs)), acc)
        flat = A.over_epochs(_geometry(values, range(epochs)), {e: 12.5 for e in range(epochs)})  # accuracy that never moves
    for name in (("final", "cls", "alpha"), ("pos_embed", "cls", "effective_rank")):
        row = _row(table, *name)
        assert np.isnan(row.rho) and np.isnan(row.p) and not row.significant and pd.isna(row.pick) and not row.agree
    assert flat.rho.isna().all() and not flat.significant.any() and (flat.accuracy_pick == 0).all()
    assert "does not change" in A.summary(flat)


def _share_with_any_significant(rng, runs: int, epochs: int) -> float:
    hits = 0
    for _ in range(runs):
        geometry, acc = _noise_run(rng, epochs)
        hits += bool(A.over_epochs(geometry, acc).significant.any())
    return hits / runs


@pytest.mark.parametrize("epochs", [6, 12])  # the exact p, and the t approximation
def test_on_noise_a_site_view_has_a_significant_observable_at_most_alpha_of_the_time(epochs):
    """Geometry independent of accuracy, 16 observables at a site/view: after Holm, the share of
    runs where any observable is called significant is at most alpha plus the binomial margin."""
    runs = 200
    share = _share_with_any_significant(np.random.default_rng(epochs), runs, epochs)
    margin = scipy.stats.binom.ppf(0.999, runs, ALPHA) / runs  # 0.1% one-sided
    assert share <= margin, f"{share:.3f} of noise runs had a significant observable (bound {margin:.3f})"


def test_a_clear_monotone_relation_is_found_and_picks_the_same_epoch():
    rng = np.random.default_rng(11)
    epochs, runs, found, agreed = 10, 40, 0, 0
    for _ in range(runs):
        acc = np.sort(rng.normal(60, 10, size=epochs))  # accuracy rising over training
        values = {("final", "cls", o): rng.normal(size=epochs) for o in OBSERVABLE_NAMES}
        values[("final", "cls", "effective_rank")] = acc + rng.normal(0, 2, size=epochs)
        values[("final", "cls", "alpha")] = 3 - acc / 30 + rng.normal(0, 0.05, size=epochs)
        table = A.over_epochs(_geometry(values, range(epochs)), dict(enumerate(acc)))
        rows = table[table.observable.isin(["effective_rank", "alpha"])]
        found += int(rows.significant.all())
        agreed += int(rows.agree.sum())
    assert found / runs >= 0.9 and agreed / (2 * runs) >= 0.5


def test_the_summary_names_the_observables_that_chose_the_epoch_accuracy_chose():
    epochs = 10
    acc = np.array([10, 20, 30, 40, 50, 60, 70, 80, 90, 90.0])  # saturated: epochs 8 and 9 tie, accuracy picks 8
    noise = np.random.default_rng(1)
    values = {("final", "cls", o): noise.normal(size=epochs) for o in OBSERVABLE_NAMES}
    values[("final", "cls", "rankme")] = acc + np.eye(epochs)[8]  # highest at epoch 8: agrees
    values[("final", "cls", "effective_rank")] = acc + 0.1 * np.arange(epochs)  # highest at 9: tied with accuracy's best
    values[("final", "cls", "spectral_anisotropy")] = acc.copy()  # rises with accuracy: against TGO-I, picks epoch 0
    values[("final", "cls", "alpha")] = -np.arange(epochs) + 3 * np.eye(epochs)[8] + 3 * np.eye(epochs)[9]  # lowest at 7
    table = A.over_epochs(_geometry(values, range(epochs)), dict(enumerate(acc)))
    row = _row(table, "final", "cls", "effective_rank")
    assert row.pick == 9 and not row.agree and row.as_good
    text = A.summary(table)
    assert "highest at epoch 8 (90)" in text and "4 of 16 observables track val/acc1" in text
    assert "rankme (rho 0.997) would have chosen epoch 8, as accuracy did" in text
    assert "effective_rank would have chosen epoch 9, where val/acc1 is as high" in text
    assert "the others would have chosen worse, epoch 0 (val/acc1 10): spectral_anisotropy (against TGO-I's direction); epoch 7 (val/acc1 80): alpha." in text
    short = A.over_epochs(_geometry(values, range(epochs)).query("epoch < 4"), dict(enumerate(acc)))
    text = A.summary(short)
    assert "no observable tracks val/acc1" in text and "the smallest p that 4 epochs allow is 0.0833" in text and "takes 6 epochs" in text
    assert A.summary(short.iloc[:0]).startswith("No epoch has both")
    tied = A.over_epochs(_geometry(values, range(epochs)).query("epoch < 8"), {**dict(enumerate(acc)), **dict.fromkeys(range(5), 50.0)})  # 5 tied: 5! pairings at the extreme
    assert (tied.p_floor[tied.rho.notna()] > 2 / math.factorial(8)).all() and "and the ties of val/acc1 allow" in A.summary(tied)


def test_over_runs_correlates_the_runs_last_epochs_and_picks_a_run():
    """A sweep's seeds (or a study's trials): each run's last epoch, ties to the first run given."""
    rng = np.random.default_rng(2)
    labels = [7, 3, 5, 1, 9, 2]  # not sorted: the order given decides ties
    acc = {r: a for r, a in zip(labels, [71.0, 75.0, 75.0, 60.0, 66.0, 73.0])}
    rows = []
    for r in labels:
        for e in (0, 1, 2):
            for o in OBSERVABLE_NAMES:
                value = acc[r] + rng.normal() if o == "effective_rank" else rng.normal()
                rows.append((r, e, "final", "cls", o, value if e == 2 else 1e6))  # only the last epoch counts
    per_run = pd.DataFrame(rows, columns=["run", "epoch", "site", "view", "observable", "value"])
    last = A.at_last_epoch(per_run)
    assert (last.epoch == 2).all() and len(last) == len(labels) * len(OBSERVABLE_NAMES)
    table = A.over_runs(last, acc)
    y = last[last.observable == "effective_rank"].set_index("run").loc[labels].value.to_numpy()
    a = np.array([acc[r] for r in labels])
    row = _row(table, "final", "cls", "effective_rank")
    assert row.rho == pytest.approx(scipy.stats.spearmanr(a, y).statistic) and row.p == pytest.approx(_permutation_p(a, y))
    assert row.accuracy_pick == 3 and row.pick == labels[int(np.argmax(y))] and row.n == len(labels)
    assert "highest at seed 3" in A.summary(table, unit="seed")


@pytest.mark.slow
def test_tgo_analyze_logs_the_table_and_reports_which_observables_chose_the_checkpoint(trained_smoke_run, tmp_path):
    """Through the command, on a copy of the session's smoke run (epochs 0 and 1, with val/acc1):
    tables/accuracy_correlation.csv is an artifact of the analysis run, its picks are numpy's argmax
    on the run's own geometry and val/acc1 history, and the report has the section."""
    uri = store_copy(trained_smoke_run, tmp_path)
    run_id = trained_smoke_run.result.run_id
    proc = subprocess.run([sys.executable, "-m", "tgo", "analyze", run_id, "--no-figures"], env=subprocess_env(uri),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "tgo: accuracy: val/acc1 is highest at epoch" in proc.stdout
    client = MlflowClient(uri)
    child = client.get_run(client.get_run(run_id).data.tags["tgo.analysis_run"])
    assert "tables/accuracy_correlation.csv" in {a.path for a in client.list_artifacts(child.info.run_id, "tables")}
    mlflow.set_tracking_uri(uri)
    try:
        fetch = lambda path: mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path=path, dst_path=tmp_path / "got")  # noqa: E731
        table = pd.read_csv(fetch("tables/accuracy_correlation.csv"))
        geometry = pd.read_csv(fetch("tables/geometry.csv"))
        report = open(fetch("report/report.md")).read()
    finally:
        mlflow.set_tracking_uri(None)
    acc1 = {m.step: m.value for m in client.get_metric_history(run_id, "val/acc1")}
    epochs = sorted(set(geometry.epoch) & set(acc1))
    assert epochs == [0, 1]
    measured = geometry[["site", "view", "observable"]].drop_duplicates()
    assert len(table) == len(measured) and (table.n == 2).all() and table.rho.isna().all()  # 2 epochs: no rank correlation
    best = epochs[int(np.argmax([acc1[e] for e in epochs]))]
    assert (table.accuracy_pick == best).all()
    for name, direction in EXPECTED.items():
        y = geometry[(geometry.site == "final") & (geometry.view == "cls") & (geometry.observable == name)].sort_values("epoch").value.to_numpy()
        row = _row(table, "final", "cls", name)
        assert row.direction == direction
        assert row.pick == epochs[int(np.argmax(direction * y))] if np.ptp(y) else pd.isna(row.pick)
    assert "## What the geometry says about accuracy" in report and "a rank correlation needs 3 epochs, there are 2" in report
    assert "tables/accuracy_correlation.csv" in report and re.search(r"^\| effective_rank +\| +2 \|", report, re.M)  # the head view's rows
