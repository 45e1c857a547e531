"""Tidy tables -> matplotlib figures. Each function takes data, returns a Figure, and draws nothing
it was not given; `save` writes it as PNG, PDF or SVG (by the file's suffix). Figures are made as
matplotlib.figure.Figure objects, not through pyplot: no backend is chosen and no global state is
touched, in a script, a notebook or a server. The tables are those of `tgo.analysis`:
geometry: columns epoch, site, view, observable, value.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tgo import uncertainty
from tgo.errors import ConfigError
from tgo.keys import site_order
from tgo.spectral import OBSERVABLE_NAMES

FIGURE_FORMATS = ("png", "pdf", "svg")  # figure_format of the analysis and sweep figures


def check_format(figure_format: str) -> str:
    """`figure_format` when it is one of FIGURE_FORMATS, else a ConfigError that names the choices
    (each command checks it once, before any work)."""
    if figure_format not in FIGURE_FORMATS:
        raise ConfigError(f"figure_format: {figure_format!r} is not one of {', '.join(FIGURE_FORMATS)}.")
    return figure_format


VIEW_TITLES = {"cls": "CLS token", "patch": "patch tokens", "mean": "mean-pooled patch tokens"}
LABELS = {
    "effective_rank": "effective rank",
    "rankme": "RankMe",
    "stable_rank": "stable rank",
    "participation_ratio": "participation ratio",
    "spectral_entropy": "spectral entropy (nats)",
    "spectral_entropy_norm": "normalised spectral entropy",
    "spectral_flatness": "spectral flatness",
    "spectral_anisotropy": "spectral anisotropy (lambda_1 / sum)",
    "cosine_anisotropy": "cosine anisotropy",
    "alpha": "power-law decay alpha",
    "alpha_r2": "alpha fit r2",
    "n_components_90": "components for 90% variance",
    "n_components_95": "components for 95% variance",
    "n_components_99": "components for 99% variance",
    "mean_abs_correlation": "mean |correlation|",
}
LOG_SCALE = {"effective_rank", "rankme", "stable_rank", "participation_ratio", "n_components_90", "n_components_95", "n_components_99"}


def save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _site_colors(sites: Sequence[str]) -> dict[str, tuple]:
    cmap = matplotlib.colormaps.get_cmap("viridis")
    n = max(len(sites) - 1, 1)
    return {site: cmap(i / n) for i, site in enumerate(sites)}


def _plain_log_labels(axis: matplotlib.axis.Axis) -> None:
    """Label a log axis in plain numbers (30, 40, 60) instead of the log scale's mathtext (3 x 10^1):
    ranks often span less than a decade, where matplotlib labels the minor ticks too. LogFormatter
    keeps the log scale's choice of which ticks get a label (every one over a narrow range, the
    decades alone over a wide one), so a wide axis gains no crowded labels."""
    axis.set_major_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))


def observable_over_epochs(geometry: pd.DataFrame, observable: str, run_label: str = "") -> Figure:
    """One panel per view; one line per site (coloured from the first site to the final norm)."""
    data = geometry[geometry.observable == observable]
    views = [v for v in VIEW_TITLES if v in set(data.view)]
    sites = site_order(data.site)
    colors = _site_colors(sites)
    fig = Figure(figsize=(5.2 * len(views), 4.2))
    axes = fig.subplots(1, len(views), squeeze=False, sharey=False)
    for ax, view in zip(axes[0], views):
        for site in sites:
            line = data[(data.view == view) & (data.site == site)].sort_values("epoch")
            if line.empty:
                continue
            bold = site == "final"
            ax.plot(
                line.epoch,
                line.value,
                color=colors[site],
                lw=2.4 if bold else 1.2,
                label=site,
                marker="o" if len(line) < 15 else None,
                ms=3,
            )
        ax.set_title(VIEW_TITLES[view])
        ax.set_xlabel("epoch (0 = initialisation)")
        ax.set_ylabel(LABELS.get(observable, observable))
        if observable in LOG_SCALE and (data[data.view == view].value > 0).all():
            ax.set_yscale("log")
            _plain_log_labels(ax.yaxis)
        ax.grid(alpha=0.3)
    fullest = max(axes[0], key=lambda ax: len(ax.get_lines()))  # the cls panel has no patch_embed line
    handles, labels = fullest.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), title="site", fontsize=8)
    fig.suptitle(f"{LABELS.get(observable, observable)} over training{' - ' + run_label if run_label else ''}")
    fig.tight_layout()
    return fig


def site_epoch_heatmap(geometry: pd.DataFrame, observable: str, run_label: str = "") -> Figure:
    """Site x epoch heat map of one observable, one panel per view (its own colour scale)."""
    data = geometry[geometry.observable == observable]
    views = [v for v in VIEW_TITLES if v in set(data.view)]
    sites = site_order(data.site)
    fig = Figure(figsize=(5.2 * len(views), 0.32 * len(sites) + 2.2))
    axes = fig.subplots(1, len(views), squeeze=False)
    for ax, view in zip(axes[0], views):
        grid = data[data.view == view].pivot_table(index="site", columns="epoch", values="value").reindex(sites)
        epochs = list(grid.columns)
        im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_yticks(range(len(sites)), sites, fontsize=8)
        step = max(1, len(epochs) // 10)
        ax.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs[::step]])
        ax.set_xlabel("epoch")
        ax.set_title(VIEW_TITLES[view])
        fig.colorbar(im, ax=ax, label=LABELS.get(observable, observable), shrink=0.85)
    fig.suptitle(f"{LABELS.get(observable, observable)}: site x epoch{' - ' + run_label if run_label else ''}")
    fig.tight_layout()
    return fig


def spectra_over_training(spectra: dict[int, np.ndarray], title: str, ylabel: str) -> Figure:
    """Log-log rank against value for each epoch's spectrum, coloured from first to last epoch."""
    epochs = sorted(spectra)
    cmap = matplotlib.colormaps.get_cmap("plasma")
    norm = matplotlib.colors.Normalize(vmin=epochs[0], vmax=max(epochs[-1], epochs[0] + 1))
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    for epoch in epochs:
        values = np.asarray(spectra[epoch], dtype=float)
        values = values[values > 0]
        if values.size:
            ax.loglog(np.arange(1, values.size + 1), values, color=cmap(norm(epoch)), lw=1.2)
    ax.set_xlabel("rank i")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="epoch")
    fig.tight_layout()
    return fig


def correlation_first_last(first: np.ndarray, last: np.ndarray, epochs: tuple[int, int], title: str) -> Figure:
    """Correlation matrices R = C / sqrt(diag C diag C^T) at the first and last epoch, side by side,
    features in the order of an average-linkage clustering of the last epoch's 1 - |R| (scipy), so
    that groups of correlated features show as blocks."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    def corr_of(cov):
        sd = np.sqrt(np.clip(np.diag(cov), 1e-300, None))
        return np.clip(cov / np.outer(sd, sd), -1, 1)

    distance = 1 - np.abs(corr_of(last))
    np.fill_diagonal(distance, 0)
    order = leaves_list(linkage(squareform(np.clip((distance + distance.T) / 2, 0, None), checks=False), "average"))
    fig = Figure(figsize=(11, 4.8))
    axes = fig.subplots(1, 2)
    for ax, cov, epoch in zip(axes, (first, last), epochs):
        corr = corr_of(cov)[np.ix_(order, order)]
        im = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(f"epoch {epoch}: mean |r| = {np.abs(corr[~np.eye(len(corr), dtype=bool)]).mean():.3f}")
        ax.set_xlabel("feature (clustered at the last epoch)")
        ax.set_ylabel("feature")
    fig.colorbar(im, ax=axes, label="correlation", shrink=0.85)
    fig.suptitle(title)
    return fig


def depth_profile(geometry: pd.DataFrame, epoch: int, run_label: str = "") -> Figure:
    """Each observable against site (depth) at one epoch, one line per view."""
    data = geometry[geometry.epoch == epoch]
    observables = [o for o in OBSERVABLE_NAMES if o in set(data.observable)]
    sites = site_order(data.site)
    cols = 5
    rows = int(np.ceil(len(observables) / cols))
    fig = Figure(figsize=(4.0 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    markers = {"cls": "o", "patch": "s", "mean": "^"}
    for ax, observable in zip(axes.flat, observables):
        for view in VIEW_TITLES:
            line = data[(data.observable == observable) & (data.view == view)].set_index("site").reindex(sites)
            if line.value.notna().any():
                ax.plot(range(len(sites)), line.value, marker=markers[view], ms=3, lw=1.2, label=view)
        ax.set_title(LABELS.get(observable, observable), fontsize=10)
        ax.set_xticks(range(len(sites)), [s.replace("block_", "b") for s in sites], rotation=90, fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(observables) :]:
        ax.axis("off")
    axes.flat[0].legend(title="view", fontsize=8)
    fig.suptitle(f"Depth profile at epoch {epoch}{' - ' + run_label if run_label else ''} (x: site, from patch embedding to final norm)")
    fig.tight_layout()
    return fig


def mean_and_band(summary: pd.DataFrame, observable: str, n_seeds: int) -> Figure:
    """Mean across seeds with its 95% confidence band, one line per site, one panel per view.
    `summary` has columns epoch, site, view, observable, mean, ci95_low, ci95_high."""
    data = summary[summary.observable == observable]
    views = [v for v in VIEW_TITLES if v in set(data.view)]
    sites = site_order(data.site)
    colors = _site_colors(sites)
    fig = Figure(figsize=(5.2 * len(views), 4.2))
    axes = fig.subplots(1, len(views), squeeze=False)
    for ax, view in zip(axes[0], views):
        for site in sites:
            part = data[(data.view == view) & (data.site == site)].sort_values("epoch")
            if part.empty:
                continue
            ax.plot(part.epoch, part["mean"], color=colors[site], lw=1.8, label=site)
            ax.fill_between(part.epoch, part.ci95_low, part.ci95_high, color=colors[site], alpha=0.2, lw=0)
        ax.set_title(VIEW_TITLES[view])
        ax.set_xlabel("epoch (0 = initialisation)")
        ax.set_ylabel(LABELS.get(observable, observable))
        ax.grid(alpha=0.3)
    fullest = max(axes[0], key=lambda ax: len(ax.get_lines()))
    fig.legend(*fullest.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), title="site", fontsize=8)
    fig.suptitle(f"{LABELS.get(observable, observable)}: mean and 95% confidence band over {n_seeds} seeds")
    fig.tight_layout()
    return fig


def accuracy_correlation_heatmap(table: pd.DataFrame, run_label: str = "", key: str = "val/acc1") -> Figure:
    """Site x observable heat map of Spearman's rho between each observable and accuracy, one panel
    per view, on one scale from -1 to 1 (blank where rho is undefined: a constant series); a dot
    marks the cells significant across the site/views (Benjamini-Hochberg). `table`: columns
    site, view, observable, rho, significant_everywhere (tgo.accuracy.over_epochs)."""
    views = [v for v in VIEW_TITLES if v in set(table.view)]
    sites = site_order(table.site)
    names = [o for o in OBSERVABLE_NAMES if o in set(table.observable)]
    fig = Figure(figsize=(0.42 * len(names) * len(views) + 2.5, 0.32 * len(sites) + 3.2))
    axes = fig.subplots(1, len(views), squeeze=False)
    image = None
    for i, (ax, view) in enumerate(zip(axes[0], views)):
        part = table[table.view == view]
        grid = part.pivot_table(index="site", columns="observable", values="rho", dropna=False).reindex(index=sites, columns=names)
        marked = part[part.significant_everywhere.astype(bool)]
        image = ax.imshow(grid.to_numpy(dtype=float), vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto", interpolation="nearest")
        ax.plot([names.index(o) for o in marked.observable], [sites.index(s) for s in marked.site], "k.", ms=5)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(sites)), sites if i == 0 else [""] * len(sites), fontsize=8)
        ax.set_title(VIEW_TITLES[view])
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=f"Spearman's rho with {key}")
    fig.suptitle(f"Rank correlation of each observable with {key} (dot: significant everywhere){' - ' + run_label if run_label else ''}")
    return fig


# --------------------------------------------------------------------------------------------------
# TGO-II: similarity, intrinsic dimension, token interaction, weight spectra (tables of
# tgo.representations and tgo.analysis)
# --------------------------------------------------------------------------------------------------


def _short(site: str) -> str:
    return site.replace("block_", "b").replace("patch_embed", "patch").replace("pos_embed", "pos")


def _spread(epochs: Sequence[int], most: int) -> list[int]:
    """At most `most` of the epochs, evenly spread, the first and last always among them."""
    epochs = sorted(epochs)
    if len(epochs) <= most:
        return epochs
    return sorted({epochs[int(round(i))] for i in np.linspace(0, len(epochs) - 1, most)})


def similarity_heatmaps(table: pd.DataFrame, view: str, measure: str = "cka", run_label: str = "", most: int = 9) -> Figure:
    """Site x site heat maps of CKA (or SVCCA) at kept epochs (at most `most`, spread from the first
    to the last), one panel per epoch, on one colour scale from 0 to 1. `table`: columns epoch,
    view, site_a, site_b and the measure (tgo.representations.similarity_tables)."""
    data = table[table.view == view]
    epochs = _spread(data.epoch.unique(), most)
    sites = site_order(data.site_a)
    cols = min(3, len(epochs))
    rows = int(np.ceil(len(epochs) / cols))
    fig = Figure(figsize=(4.2 * cols + 1.0, 3.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, epoch in zip(axes.flat, epochs):
        grid = data[data.epoch == epoch].pivot_table(index="site_a", columns="site_b", values=measure).reindex(index=sites, columns=sites)
        image = ax.imshow(grid.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ticks = [_short(s) for s in sites]
        ax.set_xticks(range(len(sites)), ticks, rotation=90, fontsize=7)
        ax.set_yticks(range(len(sites)), ticks, fontsize=7)
        ax.set_title(f"epoch {epoch}", fontsize=10)
    for ax in list(axes.flat)[len(epochs) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="debiased linear CKA" if measure == "cka" else "SVCCA")
    name = "Debiased linear CKA" if measure == "cka" else "SVCCA"
    fig.suptitle(f"{name} between sites ({VIEW_TITLES.get(view, view)}){' - ' + run_label if run_label else ''}")
    return fig


def similarity_over_training(table: pd.DataFrame, view: str, run_label: str = "") -> Figure:
    """Each site's CKA with itself at the last kept epoch, and with the previous kept epoch, against
    epoch (tgo.representations.similarity_tables); one line per site."""
    data = table[table.view == view]
    sites = site_order(data.site)
    colors = _site_colors(sites)
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, column, title in (
        (axes[0], "cka_last", "with itself at the last kept epoch"),
        (axes[1], "cka_previous", "with itself at the previous kept epoch"),
    ):
        for site in sites:
            line = data[data.site == site].sort_values("epoch").dropna(subset=[column])
            if not line.empty:
                ax.plot(line.epoch, line[column], color=colors[site], lw=2.4 if site == "final" else 1.2, marker="o", ms=3, label=site)
        ax.set_xscale("symlog", linthresh=1)  # kept epochs are log-spaced by default: 0, 1, 2, 4, ...
        kept = sorted(data.epoch.unique())
        ax.set_xticks(_spread(kept, 8), [str(e) for e in _spread(kept, 8)])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("kept epoch (symmetric log scale)")
        ax.set_ylabel("debiased linear CKA")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    return _site_legend(
        fig, axes, f"How far each site's representation moves ({VIEW_TITLES.get(view, view)}){' - ' + run_label if run_label else ''}"
    )


def per_site_over_epochs(
    table: pd.DataFrame,
    value: str,
    ylabel: str,
    title: str,
    panel: str | None = None,
    se: str | None = None,
    folds: str | int | None = None,
) -> Figure:
    """One line per site against epoch, one panel per value of the column `panel` (e.g. view or
    matrix kind); where `se` names a column of jackknife standard errors, a band of the 95%
    interval value +- t_{K-1} se (`tgo.uncertainty.half_width`), K the probe's folds: `folds`, one
    K for the table or the column that holds each row's. No band where se or K is unknown: a
    standard error estimated from K replicates says nothing about the width without K."""
    panels = list(dict.fromkeys(table[panel])) if panel else [None]
    fig = Figure(figsize=(min(5.2 * len(panels), 22), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, name in zip(axes, panels):
        data = table if panel is None else table[table[panel] == name]
        sites = site_order(data.site)
        colors = _site_colors(sites)
        for site in sites:
            line = data[data.site == site].sort_values("epoch").dropna(subset=[value])
            if line.empty:
                continue
            ax.plot(
                line.epoch,
                line[value],
                color=colors[site],
                lw=2.4 if site == "final" else 1.2,
                marker="o" if len(line) < 15 else None,
                ms=3,
                label=site,
            )
            if se:
                k = line[folds] if isinstance(folds, str) else np.nan if folds is None else folds
                half = uncertainty.half_width(line[se], k)
                if np.isfinite(half).any():
                    ax.fill_between(line.epoch, line[value] - half, line[value] + half, color=colors[site], alpha=0.15, lw=0)
        ax.set_xlabel("epoch (0 = initialisation)")
        ax.set_ylabel(ylabel)
        if name is not None:
            ax.set_title(VIEW_TITLES.get(name, name))
        ax.grid(alpha=0.3)
    return _site_legend(fig, axes, title)


def _site_legend(fig: Figure, axes: Sequence, title: str) -> Figure:
    """The per-site figures' finish: one legend of the sites (from the panel that drew most) beside the panels, and the title."""
    fig.legend(
        *max(axes, key=lambda a: len(a.get_lines())).get_legend_handles_labels(),
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        title="site",
        fontsize=8,
    )
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# comparing two runs (tgo.compare)
# --------------------------------------------------------------------------------------------------

SIDE_STYLES = ({"color": "#1f77b4", "marker": "o"}, {"color": "#d62728", "marker": "s"})  # run A, run B


def compare_over_epochs(summary: pd.DataFrame, site: str, view: str, observables: Sequence[str], labels: Sequence[str]) -> Figure:
    """Two runs side by side at one site and view: one panel per observable, one line per run with
    its interval as a band. `summary` has columns side (0 for run A, 1 for B), epoch, site, view,
    observable, value, low, high (low/high NaN where there is no interval)."""
    data = summary[(summary.site == site) & (summary.view == view)]
    observables = [o for o in observables if o in set(data.observable)]
    fig = Figure(figsize=(4.2 * max(len(observables), 1), 3.8))
    axes = fig.subplots(1, max(len(observables), 1), squeeze=False)
    for ax, observable in zip(axes[0], observables):
        for side, label in enumerate(labels):
            line = data[(data.observable == observable) & (data.side == side)].sort_values("epoch")
            if line.empty:
                continue
            style = SIDE_STYLES[side % 2]
            ax.plot(
                line.epoch, line.value, color=style["color"], marker=style["marker"] if len(line) < 15 else None, ms=4, lw=1.6, label=label
            )
            if line.low.notna().any():
                ax.fill_between(line.epoch, line.low, line.high, color=style["color"], alpha=0.18, lw=0)
        ax.set_title(LABELS.get(observable, observable), fontsize=10)
        ax.set_xlabel("epoch (0 = initialisation)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return _two_runs_legend(fig, axes[0][0], f"{site}/{view} over training, both runs (bands: 95% intervals)")


def compare_depth_profile(summary: pd.DataFrame, epoch: int, observables: Sequence[str], labels: Sequence[str]) -> Figure:
    """Two runs at one epoch, site by site: one row per view, one panel per observable, one line
    per run with error bars (its interval). `summary` as in `compare_over_epochs`."""
    data = summary[summary.epoch == epoch]
    views = [v for v in VIEW_TITLES if v in set(data.view)]
    observables = [o for o in observables if o in set(data.observable)]
    fig = Figure(figsize=(4.0 * max(len(observables), 1), 2.9 * max(len(views), 1) + 0.6))
    axes = fig.subplots(max(len(views), 1), max(len(observables), 1), squeeze=False)
    for row, view in zip(axes, views):
        sites = site_order(data[data.view == view].site)  # the cls view has no patch_embed
        for ax, observable in zip(row, observables):
            for side, label in enumerate(labels):
                line = data[(data.view == view) & (data.observable == observable) & (data.side == side)].set_index("site").reindex(sites)
                if not line.value.notna().any():
                    continue
                style = SIDE_STYLES[side % 2]
                x = np.arange(len(sites)) + (0.08 if side else -0.08)
                err = np.vstack([line.value - line.low, line.high - line.value])
                ax.errorbar(
                    x,
                    line.value,
                    yerr=np.where(np.isfinite(err), err, 0),
                    color=style["color"],
                    marker=style["marker"],
                    ms=3.5,
                    lw=1.2,
                    capsize=2,
                    label=label,
                )
            ax.set_title(f"{LABELS.get(observable, observable)} ({view})", fontsize=9)
            ax.set_xticks(range(len(sites)), [s.replace("block_", "b") for s in sites], rotation=90, fontsize=7)
            ax.grid(alpha=0.3)
    return _two_runs_legend(
        fig, axes[0][0], f"Depth profile at epoch {epoch}, both runs (x: site, from patch embedding to final norm; bars: 95% intervals)"
    )


def _two_runs_legend(fig: Figure, ax, title: str) -> Figure:
    """The comparison figures' finish: one legend for both runs under the panels, and the title."""
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=2, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def cross_run_cka(cka: pd.DataFrame, title: str) -> Figure:
    """Debiased linear CKA between two runs' features at each site: one panel per view, x the sites
    in forward order, one line per epoch with error bars (the 95% interval t_{K-1} se of its
    jackknife over K folds). `cka` has columns epoch, site, view, cka, se, folds (K)."""
    views = [v for v in VIEW_TITLES if v in set(cka.view)]
    epochs = sorted(cka.epoch.unique())
    cmap = matplotlib.colormaps.get_cmap("plasma")
    fig = Figure(figsize=(5.6 * max(len(views), 1), 4.2))
    axes = fig.subplots(1, max(len(views), 1), squeeze=False)
    for ax, view in zip(axes[0], views):
        sites = site_order(cka[cka.view == view].site)
        for i, epoch in enumerate(epochs):
            line = cka[(cka.view == view) & (cka.epoch == epoch)].set_index("site").reindex(sites)
            if not line.cka.notna().any():
                continue
            err = uncertainty.half_width(line.se, line.folds)
            ax.errorbar(
                range(len(sites)),
                line.cka,
                yerr=np.where(np.isfinite(err), err, 0),
                marker="o",
                ms=3.5,
                lw=1.3,
                capsize=2,
                color=cmap(i / max(len(epochs) - 1, 1) * 0.85),
                label=f"epoch {epoch}",
            )
        ax.set_title(VIEW_TITLES[view])
        ax.set_xticks(range(len(sites)), [s.replace("block_", "b") for s in sites], rotation=90, fontsize=8)
        ax.set_ylabel("debiased linear CKA between the runs")
        ax.axhline(1.0, color="#888", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
