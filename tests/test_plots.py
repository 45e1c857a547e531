"""What the figures show, read back from the drawn artists: error bands and bars at tgo's own
interval (Student's t with K - 1 degrees of freedom, K the probe's folds), and log-scale axes
labelled with plain numbers. Reference values come from scipy, not from tgo."""

import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from tgo import plots, runs

K = 5
EPOCHS = [0, 1, 2, 4]


def _band(ax) -> dict[float, tuple[float, float]]:
    """x -> (lowest, highest) y of the one filled band on `ax` (fill_between's polygon)."""
    (band,) = ax.collections
    out: dict[float, list[float]] = {}
    for x, y in band.get_paths()[0].vertices:
        out.setdefault(round(float(x), 9), []).append(float(y))
    return {x: (min(ys), max(ys)) for x, ys in out.items()}


def _table(se: float | list[float] = 0.02, folds: float = K) -> pd.DataFrame:
    value = np.array([0.9, 0.7, 0.55, 0.5])
    return pd.DataFrame({"epoch": EPOCHS, "site": "block_01", "mean_cosine": value, "se": se, "folds": folds})


def test_a_band_of_standard_errors_is_the_t_interval_with_k_minus_1_degrees_of_freedom():
    table = _table(se=[0.01, 0.02, 0.03, 0.04])
    fig = plots.per_site_over_epochs(table, "mean_cosine", "mean cosine", "tokens", se="se", folds="folds")
    band = _band(fig.axes[0])
    q = scipy.stats.t.ppf(0.975, K - 1)  # 2.78 at K = 5, not 1.96
    for row in table.itertuples():
        assert band[row.epoch] == (pytest.approx(row.mean_cosine - q * row.se), pytest.approx(row.mean_cosine + q * row.se))
    # one K for the whole table does the same
    fig = plots.per_site_over_epochs(table.drop(columns="folds"), "mean_cosine", "mean cosine", "tokens", se="se", folds=K)
    assert _band(fig.axes[0]) == band


def test_without_k_there_is_no_band():
    fig = plots.per_site_over_epochs(_table(folds=np.nan), "mean_cosine", "mean cosine", "tokens", se="se", folds="folds")
    assert not fig.axes[0].collections  # se alone cannot say how wide the interval is
    fig = plots.per_site_over_epochs(_table(se=np.nan), "mean_cosine", "mean cosine", "tokens", se="se", folds="folds")
    assert not fig.axes[0].collections


def test_token_interaction_band_from_the_spectra_uses_their_folds():
    """The analysis's token figure: runs.token_table gives each row's K, the figure its t band."""
    rng = np.random.default_rng(0)
    spectra = {}
    for epoch in EPOCHS:
        reps = {site: 0.5 + 0.05 * rng.normal(size=K) for site in ("block_00", "block_01")}
        spectra[epoch] = SimpleNamespace(token_interaction={site: float(r.mean()) for site, r in reps.items()}, token_interaction_replicates=reps)
    table = runs.token_table(spectra)
    assert (table.folds == K).all()
    fig = plots.per_site_over_epochs(table, "mean_cosine", "mean cosine", "tokens", se="se", folds="folds")
    ax = fig.axes[0]
    q = scipy.stats.t.ppf(0.975, K - 1)
    for site, band in zip(("block_00", "block_01"), ax.collections):  # one band per site, in site order
        for epoch in EPOCHS:
            r = spectra[epoch].token_interaction_replicates[site]
            se = np.sqrt((K - 1) / K * np.sum((r - r.mean()) ** 2))  # the jackknife, by hand
            ys = [y for x, y in band.get_paths()[0].vertices if x == epoch]
            assert (min(ys), max(ys)) == (pytest.approx(r.mean() - q * se), pytest.approx(r.mean() + q * se))


def test_cross_run_cka_error_bars_are_the_t_interval_of_the_probe_folds():
    sites = ["block_00", "block_01", "final"]
    cka = pd.DataFrame({"epoch": 3, "site": sites, "view": "cls", "cka": [0.6, 0.8, 0.9], "se": [0.01, 0.02, 0.05],
                        "folds": [4, 4, 4], "n_images": 40})
    fig = plots.cross_run_cka(cka, "CKA")
    (bars,) = fig.axes[0].containers
    segments = bars.lines[2][0].get_segments()  # one vertical bar per site, bottom to top
    q = scipy.stats.t.ppf(0.975, 4 - 1)
    for row, seg in zip(cka.itertuples(), segments):
        assert sorted(seg[:, 1]) == [pytest.approx(row.cka - q * row.se), pytest.approx(row.cka + q * row.se)]


def _tick_labels(ax) -> list[str]:
    """The y tick labels drawn inside the axis's view (matplotlib also keeps ticks beyond it)."""
    ax.figure.canvas.draw()
    lo, hi = ax.get_ylim()
    return [label.get_text() for minor in (False, True)
            for loc, label in zip(ax.yaxis.get_ticklocs(minor=minor), ax.get_yticklabels(minor=minor))
            if lo <= loc <= hi and label.get_text()]


@pytest.mark.parametrize("ranks", [[(30.0, 40.0), (45.0, 52.0), (60.0, 70.0)], [(1.5, 2.0), (2.2, 2.5), (2.8, 3.0)]])
def test_effective_rank_on_a_narrow_log_range_is_labelled_with_plain_numbers(ranks):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = [(epoch, site, view, "effective_rank", value) for epoch, pair in enumerate(ranks)
            for site, value in zip(("block_00", "final"), pair) for view in ("cls", "mean")]
    geometry = pd.DataFrame(rows, columns=["epoch", "site", "view", "observable", "value"])
    fig = plots.observable_over_epochs(geometry, "effective_rank")
    FigureCanvasAgg(fig)
    for ax in fig.axes[:2]:
        assert ax.get_yscale() == "log"
        labels = _tick_labels(ax)
        assert len(labels) >= 2, labels  # a log axis over this range labels its minor ticks
        for text in labels:
            assert "10^" not in text and "times" not in text and "$" not in text, labels
            assert re.fullmatch(r"\d+(\.\d+)?", text), labels
        lo, hi = ax.get_ylim()
        assert all(lo <= float(t) <= hi for t in labels) and len(set(labels)) == len(labels)
