"""Comparing two runs: the statistics against independent computations, their false-positive rate on
noise and power on a clear difference, and `tgo compare` / `mlflow run -e compare` on tiny runs."""

import re

import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.special
import scipy.stats
import yaml
from mlflow.tracking import MlflowClient

from helpers import ROOT, mlflow_run, tracking_store
from tgo import cli, uncertainty
from tgo.compare import (TESTED, adjust, cross_cka, cross_intrinsic_dimension, differing_at, hedges_g, matched_epochs, run_differences, seed_differences,
                         side_summary)
from tgo.findings import ALPHA, benjamini_hochberg
from tgo.probe import FeatureRows
from tgo.representations import KeptEpoch
from tgo.spectral import OBSERVABLE_NAMES

SITES = [("block_00", "cls"), ("block_01", "cls"), ("final", "cls"), ("final", "mean")]
K, N = 5, 40


# --------------------------------------------------------------------------------------------------
# synthetic runs: each "observable" is the mean of per-image contributions, jackknifed over K folds
# --------------------------------------------------------------------------------------------------


def _run(contributions: dict, epochs=(0,)):
    """A geometry table and its replicates from per-image contributions (site, view) -> (N, 16),
    the same at every epoch, or (epochs, N, 16), one draw per epoch."""
    fold = np.arange(N) % K
    rows, reps = [], {}
    for (site, view), x in contributions.items():
        for i, epoch in enumerate(epochs):
            xe = x[i] if x.ndim == 3 else x
            value = xe.mean(axis=0)
            r = np.stack([xe[fold != k].mean(axis=0) for k in range(K)])
            se = uncertainty.jackknife_se(r)
            reps.setdefault((site, view), {})[epoch] = r
            rows += [(epoch, site, view, name, value[j], se[j]) for j, name in enumerate(OBSERVABLE_NAMES)]
    return pd.DataFrame(rows, columns=["epoch", "site", "view", "observable", "value", "se"]), reps


def _pair(rng, shift=0.0, shared=1.0, noise=1.0, draws=1):
    """Two runs probed on the same images: a shared per-image effect plus each run's own noise; with
    draws > 1, each epoch is an independent draw of the pair."""
    shape = (len(SITES), draws, N, len(OBSERVABLE_NAMES))
    image = rng.normal(size=shape) * shared
    a = {sv: 10 + image[i] + noise * rng.normal(size=shape[1:]) for i, sv in enumerate(SITES)}
    b = {sv: 10 + shift + image[i] + noise * rng.normal(size=shape[1:]) for i, sv in enumerate(SITES)}
    if draws == 1:
        a, b = {k: v[0] for k, v in a.items()}, {k: v[0] for k, v in b.items()}
    epochs = tuple(range(draws))
    return _run(a, epochs), _run(b, epochs)


def test_paired_standard_error_is_the_jackknife_of_the_fold_differences():
    rng = np.random.default_rng(0)
    (ga, ra), (gb, rb) = _pair(rng, shift=0.3, shared=3.0)
    paired = run_differences(ga, gb, ra, rb, paired=True).set_index(["site", "view", "observable"])
    independent = run_differences(ga, gb, ra, rb, paired=False).set_index(["site", "view", "observable"])
    # n_components_* left out (TESTED also names the tokens view's mean_cosine, which these runs lack)
    assert set(paired.index.get_level_values("observable")) == set(TESTED) - {"mean_cosine"}
    for site, view in SITES:
        for name in ("effective_rank", "alpha"):
            col = OBSERVABLE_NAMES.index(name)
            d_k = rb[(site, view)][0][:, col] - ra[(site, view)][0][:, col]
            se = np.sqrt((K - 1) / K * np.sum((d_k - d_k.mean()) ** 2))  # by hand
            row = paired.loc[(site, view, name)]
            a = ga.set_index(["site", "view", "observable"]).value[(site, view, name)]
            b = gb.set_index(["site", "view", "observable"]).value[(site, view, name)]
            assert row.difference == pytest.approx(b - a) and row.relative == pytest.approx((b - a) / abs(a))
            assert row.se == pytest.approx(se, rel=1e-12) and row.t == pytest.approx((b - a) / se)
            assert row.p == pytest.approx(2 * scipy.stats.t.sf(abs(b - a) / se, K - 1))
            assert row.method == "paired jackknife" and row.df == K - 1
            half = scipy.stats.t.ppf(0.975, K - 1) * se
            assert (row.ci_low, row.ci_high) == (pytest.approx(b - a - half), pytest.approx(b - a + half))
            ind = independent.loc[(site, view, name)]
            assert ind.se == pytest.approx(np.hypot(row.se_a, row.se_b)) and ind.method == "independent jackknife"
    # The shared image effect cancels in the paired standard error.
    assert (paired.se < independent.se).mean() > 0.9


def test_replicates_with_different_fold_counts_are_not_paired():
    rng = np.random.default_rng(1)
    (ga, ra), (gb, rb) = _pair(rng)
    rb = {key: {e: r[:4] for e, r in by_epoch.items()} for key, by_epoch in rb.items()}  # K = 4 on one side
    out = run_differences(ga, gb, ra, rb, paired=True)
    assert (out.method == "independent jackknife").all() and (out.df == 3).all()  # the smaller K
    none = run_differences(ga, gb)  # no replicates: differences without tests
    assert none.p.isna().all() and (none.method == "no standard error").all()


def test_welch_test_interval_and_hedges_g_match_independent_computations():
    rng = np.random.default_rng(2)
    runs_a = [_run({sv: 10 + rng.normal(size=(N, 16)) for sv in SITES}, epochs=(0, 2))[0] for _ in range(3)]
    runs_b = [_run({sv: 10.5 + 2 * rng.normal(size=(N, 16)) for sv in SITES}, epochs=(0, 2))[0] for _ in range(4)]
    out = seed_differences(runs_a, runs_b)
    assert set(out.epoch) == {0, 2} and (out.method == "Welch t across runs").all()
    for row in out.sample(12, random_state=0).itertuples():
        pick = lambda t: t[(t.epoch == row.epoch) & (t.site == row.site) & (t.view == row.view) & (t.observable == row.observable)].value.item()  # noqa: E731
        xa, xb = np.array([pick(t) for t in runs_a]), np.array([pick(t) for t in runs_b])
        ref = scipy.stats.ttest_ind(xb, xa, equal_var=False)
        ci = ref.confidence_interval(0.95)
        assert (row.t, row.p, row.df) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue), pytest.approx(ref.df))
        assert (row.ci_low, row.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))
        assert row.difference == pytest.approx(xb.mean() - xa.mean())
        m = len(xa) + len(xb) - 2
        sp = np.sqrt(((len(xa) - 1) * xa.var(ddof=1) + (len(xb) - 1) * xb.var(ddof=1)) / m)
        j = scipy.special.gamma(m / 2) / (np.sqrt(m / 2) * scipy.special.gamma((m - 1) / 2))
        assert row.hedges_g == pytest.approx(j * (xb.mean() - xa.mean()) / sp)
        assert j == pytest.approx(1 - 3 / (4 * m - 1), rel=0.01)  # Hedges' approximation
    # One run against several: that run is one more draw of the other side's distribution.
    one = seed_differences(runs_a[:1], runs_b)
    row = one.iloc[5]
    xb = np.array([t[(t.epoch == row.epoch) & (t.site == row.site) & (t.view == row.view) & (t.observable == row.observable)].value.item() for t in runs_b])
    t = (xb.mean() - row.a) / (xb.std(ddof=1) * np.sqrt(1 + 1 / len(xb)))
    assert row.t == pytest.approx(t) and row.p == pytest.approx(2 * scipy.stats.t.sf(abs(t), len(xb) - 1))
    assert np.isnan(hedges_g(np.ones((3, 1)), np.ones((3, 2)), axis=1)).all()  # m = 1: no unbiased g


def test_benjamini_hochberg_runs_per_epoch_and_the_largest_effects_come_first():
    rng = np.random.default_rng(3)
    runs_a = [_run({sv: 10 + rng.normal(size=(N, 16)) for sv in SITES}, epochs=(0, 1))[0] for _ in range(3)]
    runs_b = [_run({sv: 12 + rng.normal(size=(N, 16)) for sv in SITES}, epochs=(0, 1))[0] for _ in range(3)]
    out = adjust(seed_differences(runs_a, runs_b))
    for epoch in (0, 1):
        at = out[out.epoch == epoch]
        assert np.allclose(at.q, benjamini_hochberg(at.p.to_numpy()), equal_nan=True)
        assert (at.differs == (at.q <= ALPHA)).all()
    top = differing_at(out, 1)
    assert len(top) and (top.epoch == 1).all() and top.differs.all()
    assert (np.diff(top.hedges_g.abs().to_numpy()) <= 0).all()
    assert matched_epochs(runs_a, [runs_b[0][runs_b[0].epoch == 1]]) == [1]


def test_one_run_summary_interval_is_the_t_interval_of_its_folds():
    """The figures' bands for one run per side: value +- t_{K-1, 0.975} se with K the rows of that
    site's replicates (4 at one site here, 5 elsewhere); no interval where K or se is unknown."""
    rng = np.random.default_rng(8)
    table, reps = _run({sv: 10 + rng.normal(size=(N, 16)) for sv in SITES}, epochs=(0, 2))
    reps[("block_00", "cls")] = {e: r[:4] for e, r in reps[("block_00", "cls")].items()}  # as if probed with K = 4
    summary = side_summary([table], 1, [2], [reps])
    assert (summary.side == 1).all() and set(summary.epoch) == {2} and len(summary) == len(table[table.epoch == 2])
    merged = summary.merge(table, on=["epoch", "site", "view", "observable"], suffixes=("", "_table"))
    for row in merged.itertuples():
        k = 4 if row.site == "block_00" else K
        half = scipy.stats.t.ppf(0.975, k - 1) * row.se
        assert (row.low, row.high) == (pytest.approx(row.value - half), pytest.approx(row.value + half))
    no_k = side_summary([table], 0)  # without replicates K is unknown
    assert no_k.low.isna().all() and no_k.high.isna().all()
    no_se = side_summary([table.assign(se=np.nan)], 0, None, [reps])  # a run without folds
    assert no_se.low.isna().all() and no_se.high.isna().all()


def _declared(out: pd.DataFrame) -> tuple[float, float]:
    """Over the epochs (each an independent comparison): the share of comparisons that declare
    anything different, and the mean share of tests declared different."""
    by_epoch = adjust(out).groupby("epoch").differs
    return float(by_epoch.any().mean()), float(by_epoch.mean().mean())


@pytest.mark.parametrize("paired", [True, False])
def test_two_runs_from_one_distribution_are_rarely_declared_different_and_a_clear_difference_is_found(paired):
    """400 pairs of runs drawn alike (one per epoch: Benjamini-Hochberg runs per epoch): the share of
    comparisons declaring any difference among their 52 tests stays near 5%; a shift of 1.2
    per-image standard deviations of one run (paired: t about 5 with 4 degrees of freedom) or 2
    (independent) is found in almost every test."""
    rng = np.random.default_rng(4 if paired else 5)
    (ga, ra), (gb, rb) = _pair(rng, draws=400)
    any_declared, share = _declared(run_differences(ga, gb, ra, rb, paired=paired))
    assert any_declared <= ALPHA + 0.03 and share <= ALPHA, (any_declared, share)
    (ga, ra), (gb, rb) = _pair(rng, shift=1.2 if paired else 2.0, draws=20)
    assert _declared(run_differences(ga, gb, ra, rb, paired=paired))[1] >= 0.8


def test_sweeps_from_one_distribution_are_rarely_declared_different_and_a_clear_difference_is_found():
    """The same for sweeps of 4 seeds a side (Welch's t test): a shift of 3 seed-to-seed standard
    deviations is found in almost every test."""
    rng = np.random.default_rng(6)
    keys = pd.DataFrame([(e, s, v, o) for e in range(200) for s, v in SITES for o in OBSERVABLE_NAMES],
                        columns=["epoch", "site", "view", "observable"])

    def sweep(mean, seeds=4):  # one value per run, epoch and observable (each run's estimate), spread 1 across seeds
        return [keys.assign(value=mean + rng.normal(size=len(keys)), se=np.nan) for _ in range(seeds)]

    any_declared, share = _declared(seed_differences(sweep(10), sweep(10)))
    assert any_declared <= ALPHA + 0.04 and share <= ALPHA, (any_declared, share)
    assert _declared(seed_differences(sweep(10), sweep(13)))[1] >= 0.8


def _kept(features: dict, position: np.ndarray, folds=K) -> KeptEpoch:
    return KeptEpoch(features, FeatureRows(position, np.arange(len(position)) % folds, folds))


def test_intrinsic_dimension_is_paired_only_where_both_runs_put_the_images_in_the_same_folds():
    """The paired jackknife of ID_b - ID_a needs the same folds in both runs: with run B probed in
    other folds (or none) the epoch is left out, not crashed on; with the same folds it is tested."""
    g = np.random.default_rng(3)
    n, position = 60, np.arange(60)
    x = {("final", "mean"): g.standard_normal((n, 6)).astype(np.float16)}
    y = {("final", "mean"): g.standard_normal((n, 6)).astype(np.float16)}
    same = cross_intrinsic_dimension({0: _kept(x, position)}, {0: _kept(y, position)})
    assert len(same) == 1 and np.isfinite(same.se.iloc[0]) and same.df.iloc[0] == K - 1
    for other in (1, K + 1):  # no folds; other folds
        assert cross_intrinsic_dimension({0: _kept(x, position)}, {0: _kept(y, position, folds=other)}).empty


def test_cka_between_runs_with_its_jackknife_and_what_cannot_be_compared():
    from tgo.similarity import linear_cka

    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, 12))
    y = x @ rng.normal(size=(12, 12)) + 0.5 * rng.normal(size=(N, 12))
    pos = np.arange(N)
    a = {0: _kept({("final", "cls"): x.astype(np.float16), ("pos_embed", "cls"): np.ones((N, 12), np.float16)}, pos),
         3: _kept({("final", "cls"): x.astype(np.float16)}, pos)}
    b = {0: _kept({("final", "cls"): y.astype(np.float16), ("pos_embed", "cls"): np.ones((N, 12), np.float16)}, pos),
         3: _kept({("final", "cls"): y.astype(np.float16)}, pos[::-1].copy())}  # other images
    table, notes = cross_cka(a, b)
    assert list(zip(table.epoch, table.site, table.view)) == [(0, "final", "cls")]  # pos_embed/cls has no variance
    xa, yb = x.astype(np.float16).astype(float), y.astype(np.float16).astype(float)
    fold = np.arange(N) % K
    reps = [linear_cka(xa[fold != k], yb[fold != k]) for k in range(K)]
    assert table.cka[0] == pytest.approx(linear_cka(xa, yb)) and table.se[0] == pytest.approx(uncertainty.jackknife_se(np.array(reps)))
    assert any("[3]" in n and "line up" in n for n in notes)
    itself, _ = cross_cka(a, a)
    assert np.allclose(itself.cka, 1.0) and np.allclose(itself.se, 0.0, atol=1e-12)
    assert "No epoch" in cross_cka(a, {})[1][0]


def test_mlproject_compare_parameters_reach_tgo_compare_and_repeat_its_help():
    from mlflow.projects._project_spec import load_project

    entry = load_project(str(ROOT)).get_entry_point("compare")
    argv = __import__("shlex").split(entry.compute_command({"run_a": "aaa", "run_b": "bbb", "figure_format": "svg"}, storage_dir=None))
    assert argv[:2] == ["python", "entrypoints/compare.py"]
    args = cli.build_parser().parse_args(["compare", *argv[2:]])
    assert (args.run_a, args.run_b, args.figure_format, args.log, args.figures) == ("aaa", "bbb", "svg", True, True)
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["compare"]["parameters"]
    assert set(spec) == set(cli.COMPARE_HELP) and "default" not in spec["run_a"] and "default" not in spec["run_b"]
    lines = (ROOT / "MLproject").read_text().split("  compare:\n", 1)[1].splitlines()
    for above, line in zip(lines, lines[1:]):
        found = re.match(r"\s+(\w+): \{type:", line)
        if found:
            assert above.strip() == f"# {cli.COMPARE_HELP[found.group(1)]}", found.group(1)


# --------------------------------------------------------------------------------------------------
# end to end: two tiny runs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(trained_smoke_run, tmp_path_factory):
    """Two smoke runs (seeds 0 and 1, one epoch, features kept at both epochs): the shared smoke run
    (conftest.SMOKE_RUN, which also has weight spectra) and a second one trained here in its store."""
    folder = tmp_path_factory.mktemp("compare")
    uri = trained_smoke_run.uri
    with tracking_store(uri):
        from tgo.train import run

        a = trained_smoke_run.result.run_id  # run(preset="smoke", epochs=1, feature_epochs="all", seed=0, ...)
        b = run(preset="smoke", epochs=1, feature_epochs="all", seed=1, lr=0.01, experiment="compare").run_id
        yield a, b, folder, uri


def _all_runs() -> list:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.slow
def test_tgo_compare_logs_a_comparison_run_that_links_both(two_runs, capsys):
    a, b, folder, _ = two_runs
    assert cli.main(["compare", a, b, "--output_dir", str(folder / "ab")]) == 0
    out = capsys.readouterr().out
    assert "matched epochs" in out and "CKA between the runs at epoch 1" in out and "comparison run" in out
    client = MlflowClient()
    comparison_id = client.get_run(a).data.tags["tgo.comparison_run"]
    assert client.get_run(b).data.tags["tgo.comparison_run"] == comparison_id
    run = client.get_run(comparison_id)
    tags = run.data.tags
    assert tags["tgo.kind"] == "comparison" and tags["tgo.compared_runs"] == f"{a},{b}" and (tags["tgo.run_a"], tags["tgo.run_b"]) == (a, b)
    assert "mlflow.parentRunId" not in tags and a in tags["mlflow.note.content"] and b in tags["mlflow.note.content"]
    assert run.info.status == "FINISHED" and run.info.experiment_id == client.get_run(a).info.experiment_id
    assert run.data.metrics["compare/matched_epochs"] == 2 and run.data.metrics["compare/tests"] > 50
    assert 0 <= run.data.metrics["compare/differing"] <= run.data.metrics["compare/tests"]
    assert "cka/final/mean" in run.data.metrics and "cka/pos_embed/cls" not in run.data.metrics
    names = {f.path for sub in ("figures", "tables", "report") for f in client.list_artifacts(comparison_id, sub)} | {
        f.path for f in client.list_artifacts(comparison_id)}
    assert {"figures/epochs_final_cls.png", "figures/depth_profile.png", "figures/cka_between_runs.png", "tables/differences.csv",
            "tables/cka.csv", "report/report.md", "report/report.html", "comparison.json"} <= names
    report = (folder / "ab" / "report" / "report.md").read_text()
    assert "What differs at epoch 1" in report and "seed-to-seed" in report and "CKA between the runs" in report
    table = pd.read_csv(folder / "ab" / "tables" / "differences.csv")
    assert set(table.epoch) == {0, 1} and table.method.str.startswith("paired jackknife").all()  # the same probe images and folds
    # Token interaction (TGO-II) is tested beside the observables, with its own paired jackknife:
    # against numpy on the two runs' spectra files.
    from tgo.probe import ProbeResult
    from tgo.tracking import download

    tokens = table[(table.view == "tokens") & (table.epoch == 1)].set_index("site")
    assert set(tokens.index) == {"patch_embed", "pos_embed", "block_00", "block_01", "final"}
    ra, rb = (ProbeResult.load(download(r, "geometry/spectra/epoch_0001.npz", folder / f"tok_{r}")) for r in (a, b))
    d = rb.token_interaction["final"] - ra.token_interaction["final"]
    se = uncertainty.jackknife_se(rb.token_interaction_replicates["final"] - ra.token_interaction_replicates["final"])
    assert tokens.loc["final", "difference"] == pytest.approx(d) and tokens.loc["final", "se"] == pytest.approx(se)
    assert tokens.loc["final", "p"] == pytest.approx(float(uncertainty.t_test(d, se, K)))
    # So is the intrinsic dimension at the kept epochs: TwoNN refitted without each fold, paired.
    from tgo.similarity import twonn

    dims = table[(table.observable == "intrinsic_dim") & (table.epoch == 1)].set_index(["site", "view"])
    assert ("final", "mean") in dims.index and ("pos_embed", "cls") not in dims.index
    path = {r: download(r, "geometry/features/epoch_0001.npz", folder / f"feat_{r}") for r in (a, b)}
    rows = ProbeResult.load_feature_rows(path[a])
    xa, xb = (ProbeResult.load_features(path[r])[("final", "mean")].astype(float)[np.argsort(rows.position)] for r in (a, b))
    fold = rows.fold[np.argsort(rows.position)]
    reps = [[twonn(x[fold != k]) for k in range(rows.folds)] for x in (xa, xb)]
    assert dims.loc[("final", "mean"), "difference"] == pytest.approx(twonn(xb) - twonn(xa), rel=1e-9)
    assert dims.loc[("final", "mean"), "se"] == pytest.approx(uncertainty.jackknife_se(np.subtract(reps[1], reps[0])), rel=1e-9)


@pytest.mark.slow
def test_a_run_compared_with_itself_differs_nowhere_and_has_cka_1_at_every_site(two_runs):
    from tgo.compare import compare

    a, _, folder, _ = two_runs
    result = compare(a, a, output_dir=folder / "aa", log=False, figures=False)
    assert result.differing.empty and (result.differences.difference == 0).all() and (result.differences.p == 1).all()
    last = result.cka[result.cka.epoch == 1]
    assert {"block_00", "block_01", "final", "patch_embed"} <= set(last.site)
    assert np.allclose(result.cka.cka, 1.0) and result.figures == [] and result.comparison_run_id == ""


@pytest.mark.slow
def test_sweep_parents_are_compared_across_their_seed_runs(two_runs):
    from tgo import tracking
    from tgo.compare import compare

    a, b, folder, _ = two_runs
    experiment = MlflowClient().get_run(a).info.experiment_id
    parent_a = MlflowClient().create_run(experiment, tags={"tgo.kind": "sweep", "tgo.seed_runs": f"{a},{b}"}).info.run_id
    parent_b = MlflowClient().create_run(experiment, tags={"tgo.kind": "sweep", "tgo.seed_runs": f"{b},{a}"}).info.run_id
    result = compare(parent_a, parent_b, output_dir=folder / "sweeps", log=False, figures=False)
    assert result.method == "across runs" and result.runs_a == [a, b] and result.runs_b == [b, a]
    assert result.differing.empty and np.allclose(result.differences.difference, 0, atol=1e-12)
    assert any("first seed run of each side" in n for n in result.notes)
    one = compare(a, parent_b, output_dir=folder / "one", log=False, figures=False)
    assert (one.differences.method == "t of one run against the other side's runs").all()
    tracking.finish(parent_a), tracking.finish(parent_b)


@pytest.mark.slow
def test_bad_input_is_explained_exits_2_and_creates_no_run(two_runs, capsys):
    from tgo import tracking

    a, _, folder, _ = two_runs
    empty = tracking.new_run("compare", "not trained", {"tgo.kind": "train"})
    unfinished = tracking.new_run("compare", "sweep parent", {"tgo.kind": "sweep"})
    before = {r.info.run_id for r in _all_runs()}
    for argv, message in [(["nope", a], "run_a: no run 'nope'"), ([a, empty], "run_b: run " + empty + " has no geometry"),
                          ([unfinished, a], "sweep parent whose seeds have not all finished"),
                          ([a, a, "--figure_format", "gif"], "figure_format")]:
        assert cli.main(["compare", *argv, "--output_dir", str(folder / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tgo: error: ") and message in err and "Traceback" not in err, err
    assert {r.info.run_id for r in _all_runs()} == before
    assert "tgo.comparison_run" not in MlflowClient().get_run(empty).data.tags


@pytest.mark.slow
def test_mlflow_run_compare_logs_into_its_launcher_run(two_runs, tmp_path):
    a, b, _, uri = two_runs
    proc = mlflow_run("compare", "launched", uri, tmp_path, f"run_a={a}", f"run_b={b}", "figure_format=svg", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (launcher,) = mlflow.search_runs(experiment_names=["launched"], output_format="list")
    assert launcher.data.tags["tgo.kind"] == "comparison" and launcher.data.params == {"run_a": a, "run_b": b, "figure_format": "svg"}
    assert launcher.info.status == "FINISHED" and "mlflow.parentRunId" not in launcher.data.tags
    assert MlflowClient().get_run(a).data.tags["tgo.comparison_run"] == launcher.info.run_id
    assert "figures/cka_between_runs.svg" in {f.path for f in MlflowClient().list_artifacts(launcher.info.run_id, "figures")}
