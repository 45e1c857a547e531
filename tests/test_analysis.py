"""The analysis entry point on a tiny training run made here, and its verdicts on constructed data."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.stats
from mlflow.tracking import MlflowClient
from PIL import Image

from helpers import image_tree, sqlite_store, tracking_store
from tgo.analysis import AnalysisError, analyze
from tgo.errors import ConfigError
from tgo.spectral import OBSERVABLE_NAMES
from tgo.tracking import TrackingError

pytestmark = pytest.mark.slow  # every test trains a run or reads the one trained here
EPOCHS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One smoke training run (weights at every epoch) in a store of its own."""
    folder = tmp_path_factory.mktemp("analysis")
    with tracking_store(sqlite_store(folder)) as uri:
        from tgo.train import run

        result = run(preset="smoke", epochs=EPOCHS, checkpoint_epochs="all", experiment="analysis", weight_spectra=True)
        yield result, folder, uri


@pytest.fixture(scope="module")
def analysed(trained):
    result, folder, _ = trained
    return analyze(result.run_id, output_dir=folder / "out")


def test_every_figure_is_a_readable_png(analysed):
    names = {p.name for p in analysed.figures}
    for name in OBSERVABLE_NAMES:
        assert f"epochs_{name}.png" in names and f"heatmap_{name}.png" in names
    assert {"eigenspectra_final_cls.png", "singular_values_final_cls.png", "correlation_final_cls.png", "depth_profile.png",
            "accuracy_correlation.png"} <= names
    assert {"cka_sites_mean.png", "cka_sites_cls.png", "svcca_sites_mean.png", "cka_epochs_mean.png", "cka_epochs_cls.png",
            "intrinsic_dim.png", "token_interaction.png", "weight_alpha.png"} <= names  # TGO-II
    for path in analysed.figures:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("L"), dtype=float)
            assert img.width >= 400 and img.height >= 300, path.name
        assert pixels.std() > 10, f"{path.name} looks blank"
        assert (pixels < 128).mean() > 0.005, f"{path.name} has almost no ink"


def test_table_has_one_row_per_epoch_site_view_observable(analysed, trained):
    result, _, _ = trained
    g = analysed.geometry
    site_views = 5 * 3 - 1  # patch_embed, pos_embed, block_00, block_01, final; no patch_embed/cls
    assert len(g) == (EPOCHS + 1) * site_views * len(OBSERVABLE_NAMES)
    assert not g.duplicated(["epoch", "site", "view", "observable"]).any()
    csv = pd.read_csv(analysed.output_dir / "tables" / "geometry.csv")
    assert len(csv) == len(g) and list(csv.columns) == ["epoch", "site", "view", "observable", "value", "se"]
    # Every value carries its jackknife standard error, logged for final/cls beside the estimate.
    assert (g.se.notna() & (g.se >= 0)).all()
    se_history = MlflowClient().get_metric_history(result.run_id, "geom_se/final/cls/effective_rank")
    final = g[(g.site == "final") & (g.view == "cls") & (g.observable == "effective_rank")]
    assert dict(zip(final.epoch, final.se)) == pytest.approx({m.step: m.value for m in se_history})
    # The table holds what the run logged as metrics.
    history = MlflowClient().get_metric_history(result.run_id, "geom/block_01/patch/effective_rank")
    logged = {m.step: m.value for m in history}
    rows = g[(g.site == "block_01") & (g.view == "patch") & (g.observable == "effective_rank")]
    assert dict(zip(rows.epoch, rows.value)) == pytest.approx(logged)


def test_trend_statistics_match_scipy(analysed):
    g, t = analysed.geometry, analysed.trends
    for site, view, name in [("final", "cls", "effective_rank"), ("block_00", "patch", "spectral_anisotropy"), ("final", "mean", "alpha")]:
        series = g[(g.site == site) & (g.view == view) & (g.observable == name)].sort_values("epoch")
        row = t[(t.site == site) & (t.view == view) & (t.observable == name)].iloc[0]
        rho, p = scipy.stats.spearmanr(series.epoch, series.value)
        assert row.spearman_rho == pytest.approx(rho) and row.spearman_p == pytest.approx(p)
        tau, p_tau = scipy.stats.kendalltau(series.epoch, series.value)
        assert row.kendall_tau == pytest.approx(tau) and row.trend_p == pytest.approx(p_tau)
        assert row["first"] == series.value.iloc[0] and row["last"] == series.value.iloc[-1]
        steps = np.sign(np.diff(series.value.to_numpy()))
        assert row.consistency == pytest.approx(max((steps > 0).mean(), (steps < 0).mean()))


def test_verdicts_come_with_their_tests_and_method(analysed):
    # The smoke run has 4 probed epochs: the change test decides, against its paired error.
    for f in analysed.findings[:4]:
        assert f.verdict in ("supported", "contradicted", "mixed", "inconclusive")
        assert f.method == "change only (fewer than 5 epochs)" and "+-" in f.evidence
        assert all(np.isfinite(t["change_se"]) and t["change_se"] > 0 for t in f.tests)
    assert analysed.findings[4].method == "paired standard errors"
    assert set(analysed.everywhere.finding) == {1, 2, 3, 4} and analysed.everywhere.q.notna().all()
    md = analysed.report_md.read_text()
    assert "**Method.**" in md and "Benjamini-Hochberg" in md and "Holm" in md


def test_report_and_the_runs_are_linked_both_ways(analysed, trained):
    result, _, _ = trained
    html = analysed.report_html.read_text()
    assert "TGO-I findings" in html and html.count("data:image/png;base64,") == len(analysed.figures)
    md = analysed.report_md.read_text()
    assert "| 1 |" in md and "../figures/epochs_effective_rank.png" in md
    for f in analysed.findings:
        assert f.verdict in html and f.verdict in md
    client = MlflowClient()
    child = client.get_run(analysed.analysis_run_id)
    assert child.data.tags["mlflow.parentRunId"] == result.run_id and child.data.tags["tgo.kind"] == "analysis"
    assert client.get_run(result.run_id).data.tags["tgo.analysis_run"] == analysed.analysis_run_id
    top = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"figures", "tables", "report", "findings.json"} <= top
    assert set(child.data.metrics) == {f"finding/{i}" for i in range(1, 9)}
    assert "TGO-II findings" in html and "| 8 |" in md
    saved = json.loads((analysed.output_dir / "findings.json").read_text())
    assert [f["verdict"] for f in saved] == [f.verdict for f in analysed.findings]


def test_tgo2_tables_are_the_kept_features_measured_independently(analysed, trained, tmp_path):
    """The TGO-II tables against numpy on the features the run kept (downloaded here), and findings
    6-8 judged with their standard errors."""
    from tgo.probe import ProbeResult
    from tgo.tracking import download

    result, _, _ = trained
    kept = {e: ProbeResult.load_features(download(result.run_id, f"geometry/features/epoch_{e:04d}.npz", tmp_path / str(e)))
            for e in (0, EPOCHS)}

    def cka(x, y):  # debiased linear CKA from its N x N Gram matrices (Song et al. 2012, eq. 5), independently
        def hsic(k, l):
            n = len(k)
            k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
            return (np.sum(k * l) + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * k.sum(0) @ l.sum(0)) / (n * (n - 3))
        k, l = x @ x.T, y @ y.T
        return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))

    f = {key: x.astype(float) for key, x in kept[EPOCHS].items()}
    sites = analysed.tgo2["site_similarity"]
    row = sites[(sites.epoch == EPOCHS) & (sites.view == "mean") & (sites.site_a == "block_00") & (sites.site_b == "final")]
    assert row.cka.iloc[0] == pytest.approx(cka(f[("block_00", "mean")], f[("final", "mean")]), rel=1e-8)
    csv = pd.read_csv(analysed.output_dir / "tables" / "site_similarity.csv")
    assert len(csv) == len(sites) and set(csv.epoch) == set(range(EPOCHS + 1))  # every pair at every kept epoch
    epochs = analysed.tgo2["epoch_similarity"]
    first = epochs[(epochs.epoch == 0) & (epochs.site == "block_01") & (epochs.view == "cls")].cka_last.iloc[0]
    assert first == pytest.approx(cka(kept[0][("block_01", "cls")].astype(float), f[("block_01", "cls")]), rel=1e-8)
    spec = analysed.tgo2["specialisation"].set_index("site")
    assert spec.loc["block_01", "cka_first_last"] == pytest.approx(cka(kept[0][("block_01", "mean")].astype(float), f[("block_01", "mean")]), rel=1e-8)
    assert (spec.se > 0).all()
    dims = analysed.tgo2["intrinsic_dim"]
    logged = MlflowClient().get_run(result.run_id).data.metrics["intrinsic_dim/final/cls"]
    assert dims[(dims.epoch == EPOCHS) & (dims.site == "final") & (dims.view == "cls")].intrinsic_dim.iloc[0] == pytest.approx(logged, rel=1e-9)
    tokens = analysed.tgo2["tokens"]
    assert (tokens.se > 0).all() and len(tokens) == (EPOCHS + 1) * 5
    alpha = analysed.tgo2["weights"]
    assert set(alpha.kind) >= {"qkv", "proj", "fc1", "fc2"} and set(alpha.epoch) == set(range(EPOCHS + 1))
    by_number = {f.number: f for f in analysed.findings}
    assert "+-" in by_number[6].evidence and by_number[6].method.startswith("change only")  # 2 blocks: no trend test
    assert by_number[7].method.startswith("paired") and "+-" in by_number[7].evidence
    assert by_number[8].method.startswith("non-inferiority") and "block_01" in by_number[8].evidence


def test_the_correlation_with_accuracy_is_scipys_on_the_runs_own_numbers(analysed, trained):
    """Over the run's 4 probed epochs, each with val/acc1: rho is scipy's spearmanr of the logged
    geometry against the logged val/acc1, p the exact permutation p over all 4! pairings (enumerated
    here), and the picks numpy's argmax; the table is written and the report has its section."""
    import itertools

    result, _, _ = trained
    acc1 = {m.step: m.value for m in MlflowClient().get_metric_history(result.run_id, "val/acc1")}
    table, g = analysed.accuracy, analysed.geometry
    assert len(table) == len(g[["site", "view", "observable"]].drop_duplicates()) and (table.n == EPOCHS + 1).all()
    epochs = sorted(acc1)
    x = np.array([acc1[e] for e in epochs])
    for site, view, name in [("final", "cls", "effective_rank"), ("block_00", "patch", "stable_rank"), ("final", "mean", "alpha")]:
        y = g[(g.site == site) & (g.view == view) & (g.observable == name)].set_index("epoch").value.loc[epochs].to_numpy()
        row = table[(table.site == site) & (table.view == view) & (table.observable == name)].iloc[0]
        rho = scipy.stats.spearmanr(x, y).statistic
        null = [scipy.stats.spearmanr(x, y[list(p)]).statistic for p in itertools.permutations(range(len(y)))]
        p = min(1.0, 2 * min(np.mean(np.array(null) >= rho - 1e-12), np.mean(np.array(null) <= rho + 1e-12)))
        assert row.rho == pytest.approx(rho) and row.p == pytest.approx(p) and row.p_method == "exact"
        direction = {"effective_rank": 1, "alpha": -1}.get(name, np.sign(rho))
        assert row.pick == epochs[int(np.argmax(direction * y))] and row.accuracy_pick == epochs[int(np.argmax(x))]
    assert not table.significant.any()  # 4 epochs: the exact p is at least 1/12
    csv = pd.read_csv(analysed.output_dir / "tables" / "accuracy_correlation.csv")
    assert len(csv) == len(table)
    md = analysed.report_md.read_text()
    assert "## What the geometry says about accuracy" in md and analysed.accuracy_summary in md and "takes 6 epochs" in md


def test_reprobe_on_more_images(trained):
    result, folder, _ = trained
    again = analyze(result.run_id, probe_size=48, output_dir=folder / "reprobe", log=False, figures=False)
    assert "re-probe" in again.source and "48" in again.source
    assert sorted(again.geometry.epoch.unique()) == list(range(EPOCHS + 1))
    logged = analyze(result.run_id, probe_size=32, output_dir=folder / "same", log=False, figures=False).geometry
    # Re-probing the same 32 images reproduces what was logged.
    ref = MlflowClient().get_metric_history(result.run_id, "geom/final/cls/stable_rank")
    rows = logged[(logged.site == "final") & (logged.view == "cls") & (logged.observable == "stable_rank")]
    assert dict(zip(rows.epoch, rows.value)) == pytest.approx({m.step: m.value for m in ref}, rel=1e-6)


def test_a_run_without_spectra_is_read_from_its_metric_histories(trained):
    _, folder, _ = trained
    client = MlflowClient()
    exp = client.get_experiment_by_name("analysis").experiment_id
    rid = client.create_run(exp).info.run_id
    rng = np.random.default_rng(1)
    metrics = []
    for e in range(3):
        for site in ("block_00", "final"):
            for view in ("cls", "mean"):
                for name in OBSERVABLE_NAMES:
                    metrics.append(mlflow.entities.Metric(f"geom/{site}/{view}/{name}", float(rng.uniform(1, 2)), 0, e))
    client.log_batch(rid, metrics=metrics)
    out = analyze(rid, output_dir=folder / "metrics-only", log=False, sites=["final/cls"])
    assert out.source == "the run's logged metrics" and len(out.geometry) == len(metrics)
    assert out.geometry.se.isna().all() and any("no standard errors" in n for n in out.notes)
    assert out.findings[0].method in ("no test (too few epochs, no standard errors)",) and out.findings[4].verdict == "inconclusive"
    assert any("still running" in n for n in out.notes)
    assert any("Covariance figures skipped" in n for n in out.notes)
    # no val/acc1 (as a probe run made by tgo probe): said in one sentence, no table
    assert out.accuracy.empty and "logged no val/acc1" in out.accuracy_summary
    assert out.accuracy_summary in out.report_md.read_text() and not (out.output_dir / "tables" / "accuracy_correlation.csv").exists()


def test_bad_input_is_explained_and_writes_nothing_to_the_run(trained, tmp_path):
    result, folder, _ = trained
    client = MlflowClient()
    before = client.get_run(result.run_id).data.tags
    with pytest.raises(TrackingError, match="no run 'ffffffffffffffffffffffffffffffff'"):
        analyze("f" * 32, log=False)
    empty = client.create_run(client.get_experiment_by_name("analysis").experiment_id).info.run_id
    client.log_metric(empty, "val/acc1", 50.0, step=0)
    with pytest.raises(AnalysisError, match="has no geometry"):
        analyze(empty)
    with pytest.raises(AnalysisError, match="were not measured"):
        analyze(result.run_id, sites=["block_07/cls"], output_dir=tmp_path / "x")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ConfigError, match="torch sees no CUDA GPU"):  # the one device check (tgo.runtime)
            analyze(result.run_id, probe_size=16, device="cuda", output_dir=tmp_path / "z")
    with pytest.raises(AnalysisError, match="exceeds the 64 images"):
        analyze(result.run_id, probe_size=1000, output_dir=tmp_path / "y")
    assert client.get_run(result.run_id).data.tags == before


def test_reprobe_refuses_other_data_and_runs_without_weights(tmp_path, monkeypatch):
    from tgo.train import run

    uri = sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        image_tree(tmp_path / "tree", classes=("a", "b"), per_class=6)
        trained = run(preset="smoke", dataset="imagefolder", data_dir=str(tmp_path / "tree"), num_classes=0, epochs=1, probe_size=8, batch_size=4)
        image_tree(tmp_path / "other", classes=("a", "b"), per_class=6, size=20)
        with pytest.raises(AnalysisError, match="is not the data run"):
            analyze(trained.run_id, data_dir=str(tmp_path / "other"), log=False)
        bare = run(preset="smoke", epochs=1, checkpoint_epochs="none")
        with pytest.raises(AnalysisError, match="has no saved weights to re-probe"):
            analyze(bare.run_id, probe_size=16, log=False)
        assert "tgo.analysis_run" not in MlflowClient().get_run(trained.run_id).data.tags
    finally:
        mlflow.set_tracking_uri(None)
