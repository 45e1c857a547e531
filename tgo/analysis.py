"""A training run's geometry -> tidy tables -> trend statistics, TGO-I verdicts, figures, a report.

    from tgo.analysis import analyze
    result = analyze(run_id)                      # what the run logged
    result = analyze(run_id, probe_size=1000)     # re-probe its saved weights on more images
    result.findings, result.trends, result.report_html

Everything is read through the tracking API (a local store or a tracking server): the run, its
config and probe record, its spectra artifacts (all epochs in one download; the metric histories,
one call per key, only where a run has no spectra), its weights for a re-probe. The result is
logged as an analysis run, a child of the training run (mlflow.parentRunId), with the training
run tagged `tgo.analysis_run` once the analysis has succeeded; bad input writes nothing to it.

Statistics per site, view and observable (columns of `trends`, `tgo.findings.trend_table`): first
and last value with their jackknife standard errors, the paired first-to-last change test, the
Mann-Kendall trend test with Sen's slope, Spearman's rho (for reference), the share of steps in the
dominant direction, and the combined p that the verdicts use. The verdicts and their method:
`tgo.findings`; the definitions of the observables: docs/METRICS.md.

What the geometry says about accuracy (`tgo.accuracy.over_epochs`, for a run that logged val/acc1):
per site, view and observable, Spearman's rho with val/acc1 over the probed epochs with its test
(Holm across a site/view's observables, Benjamini-Hochberg across the site/views, as for the
verdicts), and the epoch each observable would pick as the best checkpoint next to the one
accuracy picks (`accuracy`, tables/accuracy_correlation.csv, a report section).

TGO-II (`tgo.tgo2.judge`): from the features the run kept (`tgo.representations`), its token
interaction (the spectra files) and its weight spectra (metric histories): CKA/SVCCA tables and
heat maps, intrinsic dimension, token and weight-alpha figures, and findings 6-8.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
from tqdm.auto import tqdm

import tgo
from tgo import accuracy, findings, outputs, plots, representations, runs, tgo2, tracking
from tgo.errors import AnalysisError, is_disk_full
from tgo.findings import Finding
from tgo.keys import HEAD_VIEW, Tag, finding_key, head_name, site_order
from tgo.outputs import OutputFolder, Written
from tgo.probe import ProbeResult
from tgo.report import VERDICT_COLORS, Document
from tgo.reprobe import reprobe
from tgo.runtime import resolve_device
from tgo.spectral import OBSERVABLE_NAMES


@dataclass
class Analysis(Written):
    """What `analyze` returns: the run's tables, its verdicts, and what it wrote (`Written`)."""

    run_id: str
    geometry: pd.DataFrame  # epoch, site, view, observable, value, se (jackknife; NaN without folds)
    scalars: pd.DataFrame  # epoch, key, value
    trends: pd.DataFrame  # tgo.findings.trend_table
    findings: list[Finding]
    source: str  # "logged" or "re-probe (N images)"
    analysis_run_id: str = ""
    everywhere: pd.DataFrame = field(default_factory=pd.DataFrame)  # findings 1-4 at every site/view
    head: tuple[str, str] = HEAD_VIEW  # the view that feeds the classifier head
    tgo2: dict[str, pd.DataFrame] = field(default_factory=dict)  # TGO-II's tables (TGO2.tables)
    accuracy: pd.DataFrame = field(default_factory=pd.DataFrame)  # tgo.accuracy.over_epochs; empty without val/acc1
    accuracy_summary: str = ""  # its sentences in the report (tgo.accuracy.summary), or why there is no table


# --------------------------------------------------------------------------------------------------
# TGO-II's figures
# --------------------------------------------------------------------------------------------------


def _tgo2_figures(study: tgo2.TGO2, label: str, out: OutputFolder) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {
        "Similarity between sites": [],
        "Similarity over training": [],
        "Intrinsic dimension": [],
        "Token interaction": [],
        "Weight spectra": [],
    }
    t = study.tables
    for view in ("mean", "cls"):
        if "site_similarity" in t and (t["site_similarity"].view == view).any():
            groups["Similarity between sites"].append(
                out.figure(plots.similarity_heatmaps(t["site_similarity"], view, "cka", label), f"cka_sites_{view}")
            )
        if "epoch_similarity" in t and (t["epoch_similarity"].view == view).any():
            groups["Similarity over training"].append(
                out.figure(plots.similarity_over_training(t["epoch_similarity"], view, label), f"cka_epochs_{view}")
            )
    if "site_similarity" in t and (t["site_similarity"].view == "mean").any():
        groups["Similarity between sites"].append(
            out.figure(plots.similarity_heatmaps(t["site_similarity"], "mean", "svcca", label), "svcca_sites_mean")
        )
    if "intrinsic_dim" in t and t["intrinsic_dim"].intrinsic_dim.notna().any():
        groups["Intrinsic dimension"].append(
            out.figure(
                plots.per_site_over_epochs(
                    t["intrinsic_dim"],
                    "intrinsic_dim",
                    "TwoNN intrinsic dimension",
                    f"Intrinsic dimension over training - {label}",
                    panel="view",
                ),
                "intrinsic_dim",
            )
        )
    if len(t["tokens"]):
        groups["Token interaction"].append(
            out.figure(
                plots.per_site_over_epochs(
                    t["tokens"],
                    "mean_cosine",
                    "mean cosine of distinct patch tokens",
                    f"Token interaction over training - {label}",
                    se="se",
                    folds="folds",
                ),
                "token_interaction",
            )
        )
    weights = t.get("weights", pd.DataFrame(columns=["observable", "value"]))
    alpha = weights[weights.observable == "alpha"].dropna(subset=["value"])
    if len(alpha):
        groups["Weight spectra"].append(
            out.figure(
                plots.per_site_over_epochs(
                    alpha, "value", "WeightWatcher alpha", f"Power-law exponent of the weight spectra - {label}", panel="kind"
                ),
                "weight_alpha",
            )
        )
    return groups


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def _document(
    a: Analysis, title: str, figure_groups: dict[str, list[Path]], tgo2_groups: dict[str, list[Path]], accuracy_figures: list[Path]
) -> Document:
    """The analysis report: TGO-I's verdicts and their method, the everywhere counts, the most
    significant changes, what the geometry says about accuracy, and the figures; then TGO-II's
    verdicts, method and figures."""
    doc = Document(title).paragraph(f"Source of the geometry: {a.source}.")
    for note in a.notes:
        doc.note(note)
    tgo1_found, tgo2_found = [f for f in a.findings if f.number <= 5], [f for f in a.findings if f.number > 5]
    doc.heading("TGO-I findings").paragraph(f"Findings 1-4 are judged at {head_name(a.head)}, the view that feeds the head.")
    doc.findings(tgo1_found).paragraph(findings.METHOD.format(alpha=findings.ALPHA, min_trend=findings.MIN_TREND_EPOCHS), lead="Method.")
    if len(a.everywhere):
        counts = a.everywhere.pivot_table(index="finding", columns="verdict", values="site", aggfunc="count", fill_value=0)
        counts = counts.reindex(columns=list(VERDICT_COLORS), fill_value=0).reset_index()
        doc.heading("Everywhere: site/views per verdict (Benjamini-Hochberg)").table(counts)
        doc.paragraph("Per site/view: tables/everywhere.csv.")
    columns = ["site", "view", "observable", "first", "last", "change", "change_se", "change_p", "kendall_tau", "trend_p", "p"]
    doc.heading("Most significant changes").table(a.trends.sort_values("p").head(15)[columns])
    doc.paragraph("All tests: tables/trends.csv; all values and standard errors: tables/geometry.csv.")
    _accuracy_section(doc, a, accuracy_figures)
    for heading, paths in figure_groups.items():
        doc.figures(heading, paths)
    if tgo2_found:
        doc.heading("TGO-II findings").findings(tgo2_found)
        doc.paragraph(findings.METHOD_TGO2.format(alpha=findings.ALPHA, margin=findings.TOKEN_MARGIN), lead="Method.")
        doc.paragraph(
            "Tables: site_similarity.csv (CKA and SVCCA of every pair of sites at every kept epoch), epoch_similarity.csv, "
            "intrinsic_dim.csv, specialisation.csv, tokens.csv, weights.csv."
        )
        for heading, paths in tgo2_groups.items():
            doc.figures(heading, paths, level=3)
    return doc


ACCURACY_HEADING = "What the geometry says about accuracy"
ACCURACY_COLUMNS = [
    "observable",
    "n",
    "rho",
    "p",
    "p_holm",
    "significant",
    "direction",
    "direction_from",
    "pick",
    "agree",
    "accuracy_at_pick",
]


def _accuracy_section(doc: Document, a: Analysis, figures: list[Path]) -> None:
    """The rank correlation of each observable with val/acc1: the method, the summary sentences,
    the head view's rows (every site/view in tables/accuracy_correlation.csv) and the heat map;
    for a run without val/acc1, the sentence that says so."""
    doc.heading(ACCURACY_HEADING)
    if a.accuracy.empty:
        doc.paragraph(a.accuracy_summary)
        return
    doc.headline(a.accuracy_summary)
    doc.paragraph(accuracy.method("epoch"), lead="Method.")
    site, view = a.head
    head = a.accuracy[(a.accuracy.site == site) & (a.accuracy.view == view)]
    doc.paragraph(f"At {site}/{view}, the view that feeds the head, sorted by Holm p:")
    doc.table(head.sort_values("p_holm")[ACCURACY_COLUMNS], empty=f"{site}/{view} was not measured.")
    doc.paragraph("Every site/view, with Benjamini-Hochberg's q: tables/accuracy_correlation.csv.")
    doc.figures("Rank correlation with accuracy", figures, level=3)


# --------------------------------------------------------------------------------------------------
# the entry point's function
# --------------------------------------------------------------------------------------------------


def _default_sites(measured: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """final/cls and the middle block's patch view (or its mean, or cls view), where measured."""
    chosen = [HEAD_VIEW] if HEAD_VIEW in measured else []
    blocks = site_order({s for s, _ in measured if s.startswith("block_")})
    if blocks:
        middle = blocks[len(blocks) // 2]
        view = next((v for v in ("patch", "mean", "cls") if (middle, v) in measured), None)
        assert view is not None  # middle is a measured site, and every measured view is cls, patch or mean (keys.VIEWS)
        chosen.append((middle, view))
    return chosen or sorted(measured)[:1]


def analyze(
    run_id: str,
    *,
    probe_size: int = 0,
    data_dir: str = "",
    probe_seed: int | None = None,
    sites: Sequence[str] | None = None,
    device: str = "auto",
    output_dir: str | Path | None = None,
    log: bool = True,
    figures: bool = True,
    figure_format: Literal["png", "pdf", "svg"] = "png",
) -> Analysis:
    """Analyse a training run's geometry: tables, trend statistics, TGO-I verdicts, figures, report.

    Args:
        run_id: the training run.
        probe_size, data_dir, probe_seed: re-probe the run's saved weights on probe_size images
            (0: use what the run logged) of its data (data_dir: where that data lies now).
        sites: "<site>/<view>" pairs for the spectra and covariance figures (default: final/cls
            and the middle block's patch view).
        device: for a re-probe.
        output_dir: where to keep the files (default: none: a temporary folder, removed once they are
            logged or when this fails; with log=False kept, less its downloads, as the only copy).
        log: log everything as an analysis run, a child of the training run.
        figures: draw the figures (False: tables, statistics and verdicts only, much faster).
        figure_format: png, pdf or svg (for papers: pdf or svg).
    """
    plots.check_format(figure_format)
    resolve_device(device)  # checked before any work: torch would fail deep inside a re-probe
    tracking.check_tracking()
    run = tracking.get_run(run_id)
    runs.check_active(run, AnalysisError)
    # a temporary folder goes once logged, or when this fails; kept (less its downloads) when nothing is logged
    with OutputFolder(output_dir, prefix="tgo-analysis-", figure_format=figure_format, keep=not log) as out:
        download = out.download
        notes: list[str] = []
        if run.info.status == "RUNNING":
            notes.append(f"Run {run_id} is still running: this analyses the epochs logged so far.")
        elif run.info.status != "FINISHED":
            notes.append(f"Run {run_id} ended as {run.info.status}: this analyses the epochs it logged.")
        chosen: list[tuple[str, str]] | None = None
        if sites:
            parts = [s.split("/") for s in sites]
            if any(len(p) != 2 for p in parts):
                raise AnalysisError(f"sites: expected <site>/<view> pairs such as final/cls, got {list(sites)}.")
            chosen = [(site, view) for site, view in parts]

        spectra: dict[int, ProbeResult] = {}
        covariances: dict[int, ProbeResult] = {}
        if probe_size or data_dir:
            spectra, size = reprobe(run_id, download, probe_size, data_dir, probe_seed, device, None, keep_covariance=chosen or [HEAD_VIEW])
            covariances = spectra
            geometry, source = runs.geometry_table(spectra), f"re-probe of the saved weights on {size} validation images"
        else:
            geometry, source, spectra = runs.read_geometry(run, download)
        if geometry.empty:
            raise AnalysisError(f"run {run_id} has no epochs of geometry yet.")
        all_sites = site_order(geometry.site)
        chosen = chosen or _default_sites(set(zip(geometry.site, geometry.view)))
        unknown = [f"{s}/{v}" for s, v in chosen if not ((geometry.site == s) & (geometry.view == v)).any()]
        if unknown:
            raise AnalysisError(f"sites: {unknown} were not measured; measured sites are {all_sites} with views cls, patch, mean.")
        scalars = runs.scalar_table(run_id, runs.SCALARS)
        replicates, head = runs.replicates_of(spectra), runs.head_of(spectra)
        if not replicates:
            notes.append(
                "This run has no standard errors (logged before tgo measured them, or probe_folds=1): findings "
                "1-4 are judged by the trend test alone and finding 5 is left inconclusive. Re-probe its saved "
                "weights (probe_size) to get them."
            )
        trends = findings.trend_table(geometry, replicates)
        wide = findings.everywhere(trends)
        acc1 = scalars[scalars.key == accuracy.ACCURACY_KEY]
        if acc1.empty:
            accuracy_table = pd.DataFrame(columns=accuracy.COLUMNS)
            accuracy_summary = (
                f"This run logged no {accuracy.ACCURACY_KEY} (a probe run made by tgo probe has none): "
                "there is no accuracy to correlate the geometry with."
            )
        else:
            accuracy_table = accuracy.over_epochs(geometry, dict(zip(acc1.epoch, acc1.value)))
            accuracy_summary = accuracy.summary(accuracy_table, head)
        result = Analysis(
            run_id,
            geometry,
            scalars,
            trends,
            findings.judge(geometry, replicates, head, trends=trends, wide=wide),
            source,
            notes=notes,
            output_dir=out.root,
            everywhere=wide,
            head=head,
            accuracy=accuracy_table,
            accuracy_summary=accuracy_summary,
        )

        # TGO-II (findings 6-8): the kept features, token interaction and weight spectra
        study = tgo2.judge(representations.read_kept(run_id, download / "features"), spectra, runs.weight_table(run), head)
        result.findings += study.findings
        result.notes += study.notes
        result.tgo2 = study.tables

        # covariance structure at the first and last epoch: a re-probe of those weights (cheap) unless done
        epochs = sorted(geometry.epoch.unique())
        if figures and not covariances and len(epochs) >= 1:
            try:
                covariances, _ = reprobe(run_id, download, 0, "", None, device, [epochs[0], epochs[-1]], keep_covariance=chosen)
            except Exception as err:  # noqa: BLE001 - the figure is optional; say why it is missing
                if is_disk_full(err):  # but a full disk is the folder's, and stops the analysis (OutputFolder)
                    raise
                notes.append(f"Covariance figures skipped: {err}")

        _write_tables(result, out)

        # ---- figures (views without variance, such as pos_embed/cls, would only flatten the axes) ----
        rank = geometry[geometry.observable == "effective_rank"].groupby(["site", "view"]).value.max()
        flat = [f"{s}/{v}" for (s, v), value in rank.items() if value == 0]
        shown = geometry[~(geometry.site + "/" + geometry.view).isin(flat)]
        if flat:
            notes.append(f"Left out of the figures (no variance at any epoch): {', '.join(flat)}.")
        label = run.info.run_name or run_id[:8]
        groups = _tgo1_figures(shown, spectra, covariances, chosen, label, int(epochs[-1]), out) if figures else {}
        tgo2_groups = _tgo2_figures(study, label, out) if figures else {}
        shown_rho = result.accuracy[~(result.accuracy.site + "/" + result.accuracy.view).isin(flat)]
        accuracy_figures = (
            [out.figure(plots.accuracy_correlation_heatmap(shown_rho, label), "accuracy_correlation")]
            if figures and shown_rho.rho.notna().any()
            else []
        )
        result.figures = [p for paths in (*groups.values(), accuracy_figures, *tgo2_groups.values()) for p in paths]
        doc = _document(result, f"Geometry of run {label} ({run_id})", groups, tgo2_groups, accuracy_figures)
        result.report_html, result.report_md = doc.write(out.root)
        out.file("findings.json", json.dumps([f.__dict__ for f in result.findings], indent=2, default=float))

        if log:
            result.analysis_run_id = _log(result, run, out)
        out.as_logged(result)
    return result


def _write_tables(result: Analysis, out: OutputFolder) -> None:
    """The analysis's tables: geometry (also as Parquet, where pandas can), trends, everywhere, the
    correlation with accuracy (where the run has val/acc1), each finding's tests, scalars and TGO-II's tables (the full CKA and SVCCA matrices among them)."""
    out.table(result.geometry, "geometry")
    out.table(result.trends, "trends")
    out.table(result.everywhere, "everywhere")
    if not result.accuracy.empty:
        out.table(result.accuracy, "accuracy_correlation")
    out.table(pd.DataFrame([t | {"finding": f.number} for f in result.findings for t in f.tests]), "finding_tests")
    out.table(result.scalars, "scalars")
    for name, table in result.tgo2.items():
        out.table(table, name)
    out.parquet(result.geometry, "geometry")


def _tgo1_figures(
    shown: pd.DataFrame,
    spectra: dict[int, ProbeResult],
    covariances: dict[int, ProbeResult],
    chosen: Sequence[tuple[str, str]],
    label: str,
    last_epoch: int,
    out: OutputFolder,
) -> dict[str, list[Path]]:
    """TGO-I's figures, by report section: every observable over epochs and as a site x epoch heat
    map, the chosen sites' spectra and correlation structure, and the depth profile at the last epoch.

    Args:
        shown: the geometry table, less the views without variance.
        spectra: epoch -> the probe's result (spectra of every site and view); may be empty.
        covariances: epoch -> a probe's result that kept the chosen sites' covariances; may be empty.
        chosen: the (site, view) pairs of the spectra and covariance figures.
        label: the run's name in the titles.
        last_epoch: the epoch of the depth profile.
        out: where the figures go.
    """
    groups: dict[str, list[Path]] = {
        "Observables over training": [],
        "Site x epoch heat maps": [],
        "Eigenspectra over training": [],
        "Covariance structure": [],
        "Depth profile": [],
    }
    observables = [o for o in OBSERVABLE_NAMES if o in set(shown.observable)]
    for name in tqdm(observables, desc="figures", leave=False, disable=None):
        groups["Observables over training"].append(out.figure(plots.observable_over_epochs(shown, name, label), f"epochs_{name}"))
        groups["Site x epoch heat maps"].append(out.figure(plots.site_epoch_heatmap(shown, name, label), f"heatmap_{name}"))
    for site, view in chosen:
        if spectra:
            eig = {e: r[(site, view)].eigenvalues for e, r in spectra.items() if (site, view) in r.geometry}
            sv = {e: r[(site, view)].singular_values for e, r in spectra.items() if (site, view) in r.geometry}
            groups["Eigenspectra over training"].append(
                out.figure(
                    plots.spectra_over_training(eig, f"Eigenspectrum of {site}/{view} over training", "eigenvalue of the covariance"),
                    f"eigenspectra_{site}_{view}",
                )
            )
            groups["Eigenspectra over training"].append(
                out.figure(
                    plots.spectra_over_training(sv, f"Singular values of the centered {site}/{view} over training", "singular value"),
                    f"singular_values_{site}_{view}",
                )
            )
        cov_epochs = sorted(e for e, r in covariances.items() if (site, view) in r.geometry and r[(site, view)].covariance is not None)
        if len(cov_epochs) >= 2:
            first, last = cov_epochs[0], cov_epochs[-1]
            cov_first, cov_last = covariances[first][(site, view)].covariance, covariances[last][(site, view)].covariance
            assert cov_first is not None and cov_last is not None  # cov_epochs holds only the epochs that kept it
            groups["Covariance structure"].append(
                out.figure(
                    plots.correlation_first_last(
                        cov_first, cov_last, (first, last), f"Correlation structure of {site}/{view}, first and last epoch"
                    ),
                    f"correlation_{site}_{view}",
                )
            )
    groups["Depth profile"].append(out.figure(plots.depth_profile(shown, last_epoch, label), "depth_profile"))
    return groups


def _log(result: Analysis, run, out: OutputFolder) -> str:
    """An analysis run, child of the training run, holding every file; tags link both ways."""
    tags = {Tag.KIND: "analysis", Tag.ANALYZED_RUN: result.run_id, Tag.VERSION: tgo.__version__, Tag.SOURCE: result.source}
    analysis_id = tracking.open_child_run(result.run_id, f"analysis of {run.info.run_name or result.run_id[:8]}", tags)
    with outputs.failing_run(analysis_id, "analysis", f"tgo analyze {result.run_id}", f"training run {result.run_id} and its artifacts"):
        out.log(analysis_id, files=("findings.json",))
        tracking.log_metrics(analysis_id, {finding_key(f.number): f.score for f in result.findings}, step=int(result.geometry.epoch.max()))
    tracking.finish(analysis_id)
    tracking.set_tags(result.run_id, {Tag.ANALYSIS_RUN: analysis_id})
    return analysis_id
