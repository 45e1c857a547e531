"""Two runs (or two sweep parents) -> which sites and observables differ at matched epochs, with
effect sizes, the CKA between the runs' features at each site, figures and a report.

    from tgo.compare import compare
    result = compare(run_a, run_b)          # training runs, or sweep parents (their seed runs)
    result.differences, result.differing, result.cka, result.report_html

Each argument is a training run, or a sweep parent (its tag `tgo.seed_runs` lists its seed runs).
Everything is read through the tracking API, with the readers of `tgo.runs` (spectra and their
jackknife replicates) and `tgo.representations` (kept features). The result is logged as a
comparison run (`tgo.kind=comparison`) that links both runs equally: it is the child of neither
(no mlflow.parentRunId); it names both in tags `tgo.run_a`, `tgo.run_b`, `tgo.compared_runs` and
in its note, and each compared run (or parent) gets a tag `tgo.comparison_run` pointing at it (the
latest comparison, when a run is compared several times). Bad input writes nothing to the store.

Matched epochs are those every compared run probed. At each, for every site, view and observable
(`tgo.spectral.OBSERVABLE_NAMES` less the integer-valued n_components_*, which have step-like
replicates, and less the views without variance at every epoch, such as pos_embed/cls), and for
each site's token interaction (TGO-II: view `tokens`, observable `mean_cosine`, with its own
jackknife replicates), the difference d = b - a is tested (and, one run per side, the TwoNN
intrinsic dimension at the epochs both kept features of: `cross_intrinsic_dimension`):

- One run per side: the jackknife over the probe's K folds (`tgo.uncertainty`). When both runs
  were probed on the same images with the same folds (equal `tgo.probe_fingerprint` tags, probe
  seeds and fold counts) and kept replicates with the same K, the replicates pair fold by fold and
  se(d) is the jackknife of theta_b,(k) - theta_a,(k) (`paired_se`): the sampling noise the two
  runs share (the same images) cancels. Otherwise se(d) = sqrt(se_a^2 + se_b^2) (independent
  samples). The test: t = d / se(d) against Student's t with K - 1 degrees of freedom
  (`tgo.uncertainty.t_test`; with unequal K, the smaller: never more degrees of freedom than the
  Welch-Satterthwaite approximation would give). Effect sizes: d, d / |a| and t. This covers the
  probe's image sampling only, not seed-to-seed variation: two seeds of one setting differ
  "significantly" wherever training noise moved them. Compare sweep parents for that.
- Several runs per side (sweep parents): Welch's t test (Welch 1947; scipy.stats.ttest_ind with
  equal_var=False) on the runs' values, the mean difference with its Welch interval, and Hedges' g
  (Hedges 1981),

      g = J (mean_b - mean_a) / s_p,   s_p^2 = ((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2),
      J = Gamma(m/2) / (sqrt(m/2) Gamma((m - 1)/2)) ~ 1 - 3 / (4m - 1),   m = n_a + n_b - 2,

  the standardised mean difference with its small-sample bias corrected (NaN for m < 2). One run against several
  (a run against a sweep parent): the single run is one more draw, t = (mean_b - a) /
  (s_b sqrt(1 + 1/n_b)) with n_b - 1 degrees of freedom (Student's two-sample test with the
  variance estimated from the sweep's runs alone), and g with s_p = s_b.

Multiple comparisons: Benjamini-Hochberg (1995) across every site/view/observable test of an
epoch (`tgo.findings.benjamini_hochberg`); a difference is declared at q <= `tgo.findings.ALPHA`.
On two runs drawn from the same distribution, at most about 5% of comparisons declare anything
(tests/test_compare.py).

CKA between the runs: at every epoch both runs kept features of (`geometry/features/`), when both
were probed on the same images (equal fingerprints and probe-set positions), the debiased linear CKA
(`tgo.similarity.linear_cka`, Kornblith et al. 2019) between run A's and run B's features at each
site and view, with its leave-one-fold-out jackknife standard error (`tgo.similarity.jackknife`,
folds of run A's probe). 1 means the runs represent the probe images alike up to a rotation and
scale. For sweep parents: between the first seed run of each side.

Welch, B. L. (1947). The generalization of "Student's" problem when several different population
variances are involved. Biometrika 34. Hedges, L. V. (1981). Distribution theory for Glass's
estimator of effect size and related estimators. J. Educ. Stat. 6(2). Benjamini, Y. & Hochberg, Y.
(1995). Controlling the false discovery rate. JRSS B 57. Kornblith, S., Norouzi, M., Lee, H. &
Hinton, G. (2019). Similarity of neural network representations revisited. ICML.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import pandas as pd
import scipy.special
import scipy.stats
from tqdm.auto import tqdm

import tgo
from tgo import plots, runs, tracking, uncertainty
from tgo.errors import AnalysisError, CompareError
from tgo.findings import ALPHA, Replicates, benjamini_hochberg
from tgo.keys import HEAD_VIEW, TOKEN_OBSERVABLE, TOKEN_VIEW, Tag, compare_key, cross_cka_key, site_order
from tgo.outputs import OutputFolder, Written, failing_run
from tgo.report import Document
from tgo.spectral import OBSERVABLE_NAMES

if TYPE_CHECKING:
    from tgo.probe import ProbeResult
    from tgo.representations import KeptEpoch

TESTED = tuple(o for o in OBSERVABLE_NAMES if not o.startswith("n_components_")) + (TOKEN_OBSERVABLE,)  # token interaction (TGO-II) too
KEY_OBSERVABLES = ("effective_rank", "spectral_entropy", "spectral_anisotropy", "participation_ratio")
KEYS = ["epoch", "site", "view", "observable"]
COLUMNS = [
    *KEYS,
    "a",
    "b",
    "difference",
    "relative",
    "se",
    "se_a",
    "se_b",
    "sd_a",
    "sd_b",
    "n_a",
    "n_b",
    "df",
    "t",
    "hedges_g",
    "ci_low",
    "ci_high",
    "p",
    "q",
    "differs",
    "method",
]
SCOPE_NOTE = (
    "With one run per side, the standard errors cover the probe's image sampling only, not seed-to-seed "
    "variation: two seeds of one setting differ wherever training noise moved them. Compare two sweep "
    "parents (several seeds each) to test a difference between settings."
)


@dataclass
class Comparison(Written):
    """What `compare` returns: the matched epochs, the tests and the CKA, and what it wrote (`Written`)."""

    run_a: str  # as given: a training run or a sweep parent
    run_b: str
    runs_a: list[str]  # the training runs behind each side
    runs_b: list[str]
    method: str  # "jackknife" (one run per side) or "across runs" (several on a side)
    epochs: list[int]  # matched: probed by every run of both sides
    differences: pd.DataFrame  # COLUMNS: one row per epoch, site, view and observable tested
    differing: pd.DataFrame  # the significant rows at the last matched epoch, largest effect first
    cka: pd.DataFrame  # epoch, site, view, cka, se, folds, n_images
    summary: pd.DataFrame  # side (0 = A, 1 = B), epoch, site, view, observable, value, low, high (95%)
    labels: tuple[str, str] = ("A", "B")
    head: tuple[str, str] = HEAD_VIEW
    comparison_run_id: str = ""

    @property
    def last_epoch(self) -> int | None:
        return self.epochs[-1] if self.epochs else None


# --------------------------------------------------------------------------------------------------
# the pure core: tables in, tables out (numpy, scipy, pandas)
# --------------------------------------------------------------------------------------------------


def matched_epochs(tables_a: Sequence[pd.DataFrame], tables_b: Sequence[pd.DataFrame]) -> list[int]:
    """The epochs probed by every run of both sides (geometry tables with an epoch column)."""
    common: set[int] | None = None
    for table in [*tables_a, *tables_b]:
        epochs = {int(e) for e in table.epoch.unique()}
        common = epochs if common is None else common & epochs
    return sorted(common or ())


def flat_views(tables: Sequence[pd.DataFrame]) -> set[tuple[str, str]]:
    """(site, view) pairs without variance (effective rank 0) at every epoch of some run: nothing to
    compare there (pos_embed/cls, which is the same learned token for every image)."""
    if not tables:
        return set()
    long = pd.concat([t.loc[t.observable == "effective_rank", ["site", "view", "value"]].assign(run=i) for i, t in enumerate(tables)])
    rank = long.groupby(["run", "site", "view"]).value.max()
    return {(site, view) for (_, site, view), value in rank.items() if not value > 0}


def _testable(table: pd.DataFrame, epochs: Sequence[int], flat: set[tuple[str, str]]) -> pd.DataFrame:
    keep = table.epoch.isin(epochs) & table.observable.isin(TESTED)
    if flat:
        keep &= ~(table.site + "/" + table.view).isin({f"{site}/{view}" for site, view in flat})
    return table[keep]


def run_differences(
    geometry_a: pd.DataFrame,
    geometry_b: pd.DataFrame,
    replicates_a: Replicates | None = None,
    replicates_b: Replicates | None = None,
    *,
    paired: bool = False,
    epochs: Sequence[int] | None = None,
) -> pd.DataFrame:
    """One run against one: per epoch, site, view and observable, d = b - a with its jackknife
    standard error and t test (module docstring). Returns COLUMNS (q and differs unset: `adjust`).

    Args:
        geometry_a, geometry_b: geometry tables (epoch, site, view, observable, value, se).
        replicates_a, replicates_b: (site, view) -> epoch -> (K, len(OBSERVABLE_NAMES)) jackknife
            replicates ((K, 1) for the tokens view, `with_tokens`) (`tgo.runs.replicates_of`); they give K, and the paired standard error.
        paired: both runs were probed on the same images with the same folds: pair the replicates
            fold by fold where both have them with the same K.
        epochs: the epochs to test (default: those both tables have).
    """
    epochs = matched_epochs([geometry_a], [geometry_b]) if epochs is None else list(epochs)
    flat = flat_views([geometry_a, geometry_b])
    a, b = _testable(geometry_a, epochs, flat), _testable(geometry_b, epochs, flat)
    m = a[[*KEYS, "value", "se"]].merge(b[[*KEYS, "value", "se"]], on=KEYS, suffixes=("_a", "_b"))
    if m.empty:
        return pd.DataFrame(columns=COLUMNS)
    m = m.rename(columns={"value_a": "a", "value_b": "b"})
    m["difference"] = m.b - m.a
    with np.errstate(divide="ignore", invalid="ignore"):
        m["relative"] = np.where(m.a != 0, m.difference / m.a.abs(), np.nan)
    m["se"] = np.sqrt(m.se_a**2 + m.se_b**2)
    m["folds"], m["method"] = np.nan, "independent jackknife"
    column = {name: i for i, name in enumerate(OBSERVABLE_NAMES)}
    reps_a, reps_b = replicates_a or {}, replicates_b or {}
    for (epoch, site, view), rows in m.groupby(["epoch", "site", "view"]).groups.items():
        ra = reps_a.get((site, view), {}).get(epoch)
        rb = reps_b.get((site, view), {}).get(epoch)
        ks = [len(r) for r in (ra, rb) if r is not None]
        if not ks:
            m.loc[rows, "method"] = "no standard error"
            continue
        m.loc[rows, "folds"] = min(ks)
        if paired and ra is not None and rb is not None and ra.shape == rb.shape:
            # token interaction's replicates are one column (K, 1); the observables', OBSERVABLE_NAMES
            cols = [column[o] for o in m.loc[rows, "observable"]] if ra.shape[1] > 1 else [0] * len(rows)
            m.loc[rows, "se"] = uncertainty.paired_se(ra[:, cols], rb[:, cols])
            m.loc[rows, "method"] = "paired jackknife"
    m["df"] = m.folds - 1
    known = m.folds.notna() & m.se.notna()
    m["p"] = np.nan
    for k, rows in m[known].groupby("folds").groups.items():
        m.loc[rows, "p"] = uncertainty.t_test(m.loc[rows, "difference"], m.loc[rows, "se"], int(k))
    with np.errstate(divide="ignore", invalid="ignore"):
        m["t"] = np.where(m.se > 0, m.difference / m.se, np.where(m.difference == 0, 0.0, np.sign(m.difference) * np.inf))
    m.loc[~known, "t"] = np.nan
    half = uncertainty.half_width(m.se, m.folds)  # folds is NaN where no replicate gave K
    m["ci_low"], m["ci_high"] = m.difference - half, m.difference + half
    m["n_a"], m["n_b"] = 1, 1
    return m.reindex(columns=COLUMNS)


def hedges_g(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Hedges' g (Hedges 1981) of b against a along `axis`: J (mean_b - mean_a) / s_p with the
    pooled standard deviation s_p on m = n_a + n_b - 2 degrees of freedom and Hedges' exact
    correction J(m) = Gamma(m/2) / (sqrt(m/2) Gamma((m-1)/2)) (about 1 - 3 / (4m - 1)). NaN where
    s_p is 0 or m < 2 (at m = 1, J is 0: no unbiased g exists)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = a.shape[axis], b.shape[axis]
    ssa = np.var(a, axis=axis, ddof=0) * na
    ssb = np.var(b, axis=axis, ddof=0) * nb
    dof = na + nb - 2
    if dof < 2:
        return np.full(np.broadcast(ssa, ssb).shape, np.nan)
    sp = np.sqrt((ssa + ssb) / dof)
    j = np.exp(scipy.special.gammaln(dof / 2) - scipy.special.gammaln((dof - 1) / 2)) / np.sqrt(dof / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sp > 0, j * (b.mean(axis=axis) - a.mean(axis=axis)) / np.where(sp > 0, sp, 1.0), np.nan)


def seed_differences(
    runs_a: Sequence[pd.DataFrame], runs_b: Sequence[pd.DataFrame], *, epochs: Sequence[int] | None = None
) -> pd.DataFrame:
    """Several runs against several (or one against several): per epoch, site, view and observable,
    Welch's t test on the runs' values, the mean difference with its interval and Hedges' g
    (module docstring). Returns COLUMNS (q and differs unset: `adjust`).

    Args:
        runs_a, runs_b: one geometry table per run (epoch, site, view, observable, value).
        epochs: the epochs to test (default: those every run has).
    """
    if len(runs_a) + len(runs_b) < 3:
        raise ValueError("seed_differences needs several runs on at least one side; use run_differences for one against one.")
    epochs = matched_epochs(runs_a, runs_b) if epochs is None else list(epochs)
    flat = flat_views([*runs_a, *runs_b])

    tables = [*runs_a, *runs_b]
    long = _testable(pd.concat([t[[*KEYS, "value"]].assign(run=i) for i, t in enumerate(tables)], ignore_index=True), epochs, flat)
    both = long.set_index([*KEYS, "run"]).value.unstack("run").reindex(columns=range(len(tables))).dropna()
    if both.empty:
        return pd.DataFrame(columns=COLUMNS)
    na, nb = len(runs_a), len(runs_b)
    xa, xb = both.iloc[:, :na].to_numpy(float), both.iloc[:, na:].to_numpy(float)
    out = both.index.to_frame(index=False)
    ma, mb = xa.mean(axis=1), xb.mean(axis=1)
    sa = xa.std(axis=1, ddof=1) if na > 1 else np.full(len(out), np.nan)
    sb = xb.std(axis=1, ddof=1) if nb > 1 else np.full(len(out), np.nan)
    out["a"], out["b"], out["sd_a"], out["sd_b"], out["n_a"], out["n_b"] = ma, mb, sa, sb, na, nb
    out["difference"] = mb - ma
    with np.errstate(divide="ignore", invalid="ignore"):
        out["relative"] = np.where(ma != 0, out.difference / np.abs(ma), np.nan)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # rows without variance: NaN, not tested
        if na > 1 and nb > 1:
            test = scipy.stats.ttest_ind(xb, xa, axis=1, equal_var=False)
            ci = test.confidence_interval(0.95)
            out["t"], out["p"], out["df"] = test.statistic, test.pvalue, test.df
            out["ci_low"], out["ci_high"] = ci.low, ci.high
            out["se"] = np.sqrt(sa**2 / na + sb**2 / nb)
            out["method"] = "Welch t across runs"
        else:  # one run on a side: it is one more draw from the other side's distribution
            s, n = (sb, nb) if na == 1 else (sa, na)
            out["se"] = s * np.sqrt(1 + 1 / n)
            out["df"] = n - 1
            out["t"] = np.where(out.se > 0, out.difference / out.se, np.nan)
            out["p"] = 2 * scipy.stats.t.sf(np.abs(out.t), n - 1)
            half = scipy.stats.t.ppf(0.975, n - 1) * out.se
            out["ci_low"], out["ci_high"] = out.difference - half, out.difference + half
            out["method"] = "t of one run against the other side's runs"
    out["hedges_g"] = hedges_g(xa, xb, axis=1)
    out["se_a"], out["se_b"] = np.nan, np.nan
    return out.reindex(columns=COLUMNS)


def adjust(differences: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """Benjamini-Hochberg q-values across every test of an epoch, and `differs` (q <= alpha)."""
    out = differences.copy()
    out["q"] = np.nan
    for _, rows in out.groupby("epoch").groups.items():
        out.loc[rows, "q"] = benjamini_hochberg(out.loc[rows, "p"].to_numpy(float))
    out["differs"] = (out.q <= alpha).fillna(False).astype(bool)
    return out


def differing_at(differences: pd.DataFrame, epoch: int) -> pd.DataFrame:
    """The significant differences at `epoch`, largest effect first (|g| across runs, else |t|)."""
    rows = differences[(differences.epoch == epoch) & differences.differs].copy()
    effect = rows.hedges_g.abs().where(rows.hedges_g.notna(), rows.t.abs())
    return rows.assign(_effect=effect).sort_values("_effect", ascending=False).drop(columns="_effect").reset_index(drop=True)


def side_summary(
    tables: Sequence[pd.DataFrame], side: int, epochs: Sequence[int] | None = None, replicates: Sequence[Replicates] | None = None
) -> pd.DataFrame:
    """One side's value and 95% interval per epoch, site, view and observable, for the figures:
    one run, value +- t_{K-1} se (its jackknife over the probe's K folds, K the rows of its
    `replicates`, as `tgo.runs.replicates_of` and `with_tokens` give them; no interval where K or se
    is unknown); several, their mean with the t interval across runs."""
    keep = [t[t.epoch.isin(epochs)] if epochs is not None else t for t in tables]
    if len(keep) == 1:
        t = keep[0]
        out = t[[*KEYS, "value"]].copy()
        reps = replicates[0] if replicates else {}
        # each row's K: the geometry tables carry se alone, and K may differ by site (the tokens view)
        folds = [
            len(r) if (r := reps.get((site, view), {}).get(epoch)) is not None else np.nan
            for epoch, site, view in zip(t.epoch, t.site, t.view)
        ]
        half = uncertainty.half_width(t.se, np.asarray(folds, float))
        out["low"], out["high"] = t.value - half, t.value + half
    else:
        grouped = pd.concat(keep).groupby(KEYS).value
        out = grouped.agg(["mean", "std", "count"]).reset_index().rename(columns={"mean": "value"})
        half = scipy.stats.t.ppf(0.975, np.maximum(out["count"] - 1, 1)) * out["std"] / np.sqrt(out["count"])
        out["low"], out["high"] = out.value - half, out.value + half
        out = out.drop(columns=["std", "count"])
    return out.assign(side=side)[["side", *KEYS, "value", "low", "high"]]


def _aligned(kept_a: Mapping[int, KeptEpoch], kept_b: Mapping[int, KeptEpoch]) -> dict[int, list[tuple[str, str]]]:
    """The epochs both runs kept features of on the same images in the same order (both files
    record each row's place, and the places agree), each with the (site, view) pairs both have."""
    out = {}
    for epoch in sorted(set(kept_a) & set(kept_b)):
        ea, eb = kept_a[epoch], kept_b[epoch]
        if ea.rows is not None and eb.rows is not None and np.array_equal(ea.rows.position, eb.rows.position):
            out[epoch] = sorted(set(ea.features) & set(eb.features))
    return out


def cross_cka(kept_a: Mapping[int, KeptEpoch], kept_b: Mapping[int, KeptEpoch]) -> tuple[pd.DataFrame, list[str]]:
    """Debiased linear CKA between two runs' kept features at each epoch both kept, site and view,
    with its jackknife standard error; and notes on what could not be compared.

    Args:
        kept_a, kept_b: epoch -> `tgo.representations.KeptEpoch` (features keyed (site, view),
            rows in probe-set order with their folds), as `tgo.representations.read_kept` returns.
    """
    from tgo.similarity import jackknife, linear_cka

    rows, notes = [], []
    epochs = sorted(set(kept_a) & set(kept_b))
    if not epochs:
        notes.append("No epoch has kept features in both runs (feature_epochs): no CKA between the runs.")
    aligned = _aligned(kept_a, kept_b)
    skipped = [e for e in epochs if e not in aligned]
    for epoch in tqdm(sorted(aligned), desc="CKA between the runs", unit="epoch", leave=False, disable=None):
        ea, eb = kept_a[epoch], kept_b[epoch]
        assert ea.rows is not None  # _aligned keeps only epochs whose files both record their rows
        for site, view in aligned[epoch]:
            xa, xb = ea.features[(site, view)].astype(np.float64), eb.features[(site, view)].astype(np.float64)
            value, reps = jackknife(linear_cka, ea.rows.fold, ea.rows.folds, xa, xb)
            if not np.isfinite(value):  # a view without variance (pos_embed/cls)
                continue
            se = float(uncertainty.jackknife_se(reps)) if reps is not None else np.nan
            rows.append((epoch, site, view, value, se, ea.rows.folds, len(xa)))
    if skipped:
        notes.append(
            f"Kept features at epochs {skipped} do not line up image by image (another probe set, or files kept "
            "before tgo recorded each row's place): no CKA there."
        )
    table = pd.DataFrame(rows, columns=["epoch", "site", "view", "cka", "se", "folds", "n_images"])
    order = {s: i for i, s in enumerate(site_order(table.site))}
    table = table.sort_values(["epoch", "view", "site"], key=lambda c: c.map(order) if c.name == "site" else c).reset_index(drop=True)
    return table, notes


def cross_intrinsic_dimension(kept_a: Mapping[int, KeptEpoch], kept_b: Mapping[int, KeptEpoch]) -> pd.DataFrame:
    """TwoNN intrinsic dimension (TGO-II) of both runs at each epoch both kept features of, site and
    view, where they line up image by image: d = ID_b - ID_a against its paired jackknife error
    (TwoNN refitted without each fold of the shared probe images; Student t, K - 1 degrees of
    freedom). COLUMNS, observable "intrinsic_dim" (q and differs unset: `adjust`)."""
    from tgo.similarity import jackknife, twonn_or_nan

    rows = []
    for epoch, pairs in sorted(_aligned(kept_a, kept_b).items()):
        ea, eb = kept_a[epoch], kept_b[epoch]
        assert ea.rows is not None and eb.rows is not None  # _aligned keeps only epochs whose files both record their rows
        if ea.rows.folds < 2 or not np.array_equal(ea.rows.fold, eb.rows.fold):
            continue  # the paired jackknife needs both runs' images in the same folds (same probe_seed and probe_folds)
        for site, view in pairs:
            va, ra = jackknife(twonn_or_nan, ea.rows.fold, ea.rows.folds, ea.features[(site, view)].astype(np.float64))
            vb, rb = jackknife(twonn_or_nan, eb.rows.fold, eb.rows.folds, eb.features[(site, view)].astype(np.float64))
            if not (np.isfinite(va) and np.isfinite(vb)):  # no dimension to measure (pos_embed/cls)
                continue
            assert ra is not None and rb is not None  # K >= 2 folds, the same in both runs (above)
            k = ea.rows.folds
            d, se = vb - va, float(uncertainty.paired_se(ra, rb))
            half = uncertainty.t_quantile(k) * se
            rows.append(
                {
                    "epoch": epoch,
                    "site": site,
                    "view": view,
                    "observable": "intrinsic_dim",
                    "a": va,
                    "b": vb,
                    "difference": d,
                    "relative": d / abs(va) if va else np.nan,
                    "se": se,
                    "se_a": float(uncertainty.jackknife_se(ra)),
                    "se_b": float(uncertainty.jackknife_se(rb)),
                    "n_a": 1,
                    "n_b": 1,
                    "df": k - 1,
                    "t": d / se if se > 0 else np.nan,
                    "ci_low": d - half,
                    "ci_high": d + half,
                    "p": float(uncertainty.t_test(d, se, k)),
                    "method": "paired jackknife (TwoNN refitted per fold)",
                }
            )
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


# --------------------------------------------------------------------------------------------------
# reading the runs
# --------------------------------------------------------------------------------------------------


class _RunInfo(Protocol):
    @property
    def run_id(self) -> str: ...
    @property
    def run_name(self) -> str | None: ...
    @property
    def status(self) -> str: ...
    @property
    def experiment_id(self) -> str: ...
    @property
    def lifecycle_stage(self) -> str: ...


class _RunData(Protocol):
    @property
    def tags(self) -> dict[str, str]: ...


class _Run(Protocol):
    """What this module reads of an MLflow run (`tracking.get_run`; MLflow is imported in tgo.tracking only)."""

    @property
    def info(self) -> _RunInfo: ...
    @property
    def data(self) -> _RunData: ...


@dataclass
class _Side:
    given: str
    run: _Run  # the MLflow run given
    runs: list[_Run]  # the training runs behind it
    label: str
    tables: list[pd.DataFrame] = field(default_factory=list)
    replicates: list = field(default_factory=list)
    head: tuple[str, str] = HEAD_VIEW


def _resolve(run_id: str, which: str) -> _Side:
    """A training run -> [it]; a sweep parent -> its seed runs (tag tgo.seed_runs)."""
    try:
        run = tracking.get_run(run_id)
    except tracking.TrackingError as err:
        raise CompareError(f"{which}: {err}") from None
    runs.check_active(run, CompareError, f"{which}: ")
    tags = run.data.tags
    kind = tags.get(Tag.KIND, "")
    name = run.info.run_name or run_id[:8]
    if tags.get(Tag.SEED_RUNS):
        ids = [i for i in tags[Tag.SEED_RUNS].split(",") if i]
        members = []
        for seed_run in ids:
            try:
                members.append(tracking.get_run(seed_run))
            except tracking.TrackingError:
                raise CompareError(
                    f"{which}: sweep parent {run_id} lists seed run {seed_run}, which is not in the tracking "
                    f"store {tracking.store_name()} (deleted?)."
                ) from None
            runs.check_active(members[-1], CompareError, f"{which}: a seed run of sweep parent {run_id}: ")
        return _Side(run_id, run, members, f"{name} ({len(members)} seeds)")
    if kind == "sweep":
        raise CompareError(
            f"{which}: run {run_id} is a sweep parent whose seeds have not all finished (it has no tag "
            "tgo.seed_runs yet); finish the sweep (run its command again), or compare its seed runs."
        )
    if kind in ("study", "analysis", "comparison"):
        raise CompareError(
            f"{which}: run {run_id} is a {kind} run, not a training run or a sweep parent; give the id of "
            "a training run (tgo.kind=train) or of a sweep parent."
        )
    return _Side(run_id, run, [run], name)


def with_tokens(table: pd.DataFrame, replicates: dict, spectra: dict[int, ProbeResult]) -> tuple[pd.DataFrame, dict]:
    """A geometry table and its replicates with each site's token interaction added as the view
    `tokens`, observable `mean_cosine` (replicates (K, 1)), so that it is tested like the rest."""
    reps = dict(replicates)
    for epoch, result in spectra.items():
        for site, r in result.token_interaction_replicates.items():
            reps.setdefault((site, TOKEN_VIEW), {})[epoch] = np.asarray(r, float)[:, None]
    tokens = runs.token_table(spectra).rename(columns={TOKEN_OBSERVABLE: "value"}).assign(view=TOKEN_VIEW, observable=TOKEN_OBSERVABLE)
    tokens = tokens[["epoch", "site", "view", "observable", "value", "se"]]
    return (pd.concat([table, tokens], ignore_index=True) if len(tokens) else table), reps


def _read_side(side: _Side, which: str, folder: Path) -> None:
    for run in side.runs:
        run_id = run.info.run_id
        try:
            table, _, spectra = runs.read_geometry(run, folder / run_id)
        except AnalysisError as err:
            raise CompareError(f"{which}: {err}") from None
        if table.empty:
            raise CompareError(f"{which}: run {run_id} has no epochs of geometry yet; compare it once it has probed an epoch.")
        table, replicates = with_tokens(table, runs.replicates_of(spectra), spectra)
        side.tables.append(table)
        side.replicates.append(replicates)
        head = runs.head_of(spectra)
    side.head = head  # the last run read; every seed of a sweep has the same model


def _probe_identity(run: _Run, folder: Path) -> tuple[str, str, str]:
    """What makes two runs' probes the same images in the same folds: the probe set's fingerprint,
    and the probe seed and fold count of the run's config (as the analysis reads them)."""
    try:
        config = runs.read_config(run.info.run_id, folder / run.info.run_id)
    except tracking.TrackingError:  # not a tgo training run: nothing to pair on
        return "", "", ""
    return run.data.tags.get(Tag.PROBE_FINGERPRINT, ""), str(config.get("probe_seed", "")), str(config.get("probe_folds", ""))


def _same_images(run_a: _Run, run_b: _Run) -> bool:
    fa, fb = run_a.data.tags.get(Tag.PROBE_FINGERPRINT, ""), run_b.data.tags.get(Tag.PROBE_FINGERPRINT, "")
    return bool(fa) and fa == fb


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.4g}"


def _method_text(c: Comparison) -> str:
    if c.method == "jackknife":
        text = (
            "One run per side: each difference b - a is tested against its jackknife standard error over the probe's "
            "folds (paired fold by fold where both runs were probed on the same images with the same folds, else "
            "sqrt(se_a^2 + se_b^2)), Student's t with K - 1 degrees of freedom; effect sizes: the difference, its "
            "relative size d/|a| and t. " + SCOPE_NOTE
        )
    else:
        text = (
            "Several runs on a side: Welch's t test on the runs' values at each epoch (one run against a sweep: that run "
            "as one more draw of the sweep's distribution), the mean difference with its 95% Welch interval and "
            "Hedges' g (the standardised mean difference, small-sample corrected; |g| of 0.8 or more is large)."
        )
    return text + (
        f" Benjamini-Hochberg across the {int(c.differences[c.differences.epoch == c.last_epoch].p.notna().sum())} "
        f"tests of an epoch; a difference is declared at q <= {ALPHA}. Integer-valued observables (n_components_*) "
        "and views without variance are not tested."
    )


def _by_site(differences: pd.DataFrame, epoch: int | None) -> pd.DataFrame:
    """Per site and view at `epoch`, in forward order: tests, significant differences, and the
    observables that went up or down in run B."""
    at = differences[(differences.epoch == epoch) & differences.p.notna()]
    rows = []
    for (site, view), part in at.groupby(["site", "view"]):
        hit = part[part.differs]
        rows.append(
            {
                "site": site,
                "view": view,
                "tests": len(part),
                "differ": len(hit),
                "higher in B": ", ".join(hit[hit.difference > 0].observable),
                "lower in B": ", ".join(hit[hit.difference < 0].observable),
            }
        )
    table = pd.DataFrame(rows, columns=["site", "view", "tests", "differ", "higher in B", "lower in B"])
    order = {s: i for i, s in enumerate(site_order(table.site))}
    return table.sort_values(["site", "view"], key=lambda col: col.map(order) if col.name == "site" else col).reset_index(drop=True)


def _links(c: Comparison, side: _Side) -> str:
    exp = side.run.info.experiment_id
    return f"[{side.label}](#/experiments/{exp}/runs/{side.given})"


def _document(c: Comparison, sides: tuple[_Side, _Side], figure_groups: dict[str, list[Path]]) -> Document:
    """The comparison report: the runs and the headline, the differences at the last matched epoch
    (per site and view, then the largest), the method, the CKA between the runs and the figures."""
    a, b = sides
    last = c.last_epoch
    shown_cols = ["site", "view", "observable", "a", "b", "difference", "relative", "ci_low", "ci_high"]
    shown_cols += ["t", "q"] if c.method == "jackknife" else ["hedges_g", "t", "q"]
    top = c.differing.head(25)[shown_cols] if len(c.differing) else pd.DataFrame(columns=shown_cols)
    tested = c.differences[(c.differences.epoch == last) & c.differences.p.notna()] if last is not None else c.differences.iloc[:0]
    doc = Document(f"Comparison of {c.labels[0]} and {c.labels[1]}")
    doc.paragraph(
        f"Run A: {a.label}, {a.given} ({len(a.runs)} run{'s' if len(a.runs) > 1 else ''}). Run B: {b.label}, {b.given} "
        f"({len(b.runs)} run{'s' if len(b.runs) > 1 else ''}). Matched epochs: {c.epochs}."
    )
    doc.headline(
        f"At the last matched epoch ({last}), {len(c.differing)} of {len(tested)} site/view/observable tests differ "
        f"(Benjamini-Hochberg, q <= {ALPHA})."
    )
    for note in c.notes:
        doc.note(note)
    by_site = _by_site(c.differences, last)
    if len(by_site):
        doc.heading(f"Sites at epoch {last}").paragraph("Per site and view: significant differences among the observables tested there.")
        doc.table(by_site)
    doc.heading(f"What differs at epoch {last}").table(top, empty="Nothing differs significantly.")
    if len(c.differing) > len(top):
        doc.paragraph(f"({len(c.differing) - len(top)} more in tables/differences.csv.)")
    doc.paragraph(_method_text(c), lead="Method.")
    doc.paragraph("All tests: tables/differences.csv; both runs' values and intervals: tables/summary.csv.")
    cka_last = c.cka[c.cka.epoch == c.cka.epoch.max()] if len(c.cka) else c.cka
    if len(cka_last):
        cka_view = cka_last.pivot_table(index="site", columns="view", values="cka")
        doc.heading(f"CKA between the runs at epoch {int(cka_last.epoch.iloc[0])}")
        doc.paragraph(
            "Debiased linear CKA between run A's and run B's features of the same probe images (1: alike up to a rotation "
            "and scale); standard errors in tables/cka.csv."
        )
        doc.table(cka_view.reindex(site_order(cka_view.index)).reset_index())
    for heading, paths in figure_groups.items():
        doc.figures(heading, paths)
    return doc


# --------------------------------------------------------------------------------------------------
# the entry point's function
# --------------------------------------------------------------------------------------------------


def compare(
    run_a: str,
    run_b: str,
    *,
    output_dir: str | Path | None = None,
    log: bool = True,
    figures: bool = True,
    figure_format: Literal["png", "pdf", "svg"] = "png",
) -> Comparison:
    """Compare two training runs (or two sweep parents, or one of each) at their matched epochs:
    differences with effect sizes and tests, CKA between their features, figures, a report.

    Args:
        run_a, run_b: a training run, or a sweep parent (tag tgo.seed_runs: its seed runs).
        output_dir: where to keep the files (default: none: a temporary folder, removed once they are
            logged or when this fails; with log=False kept, less its downloads, as the only copy).
        log: log everything as a comparison run that links both (the child of neither: under
            `mlflow run`, the launcher run; else a new run in run_a's experiment), and tag both
            compared runs with `tgo.comparison_run`.
        figures: draw the figures (False: tables, tests and report only).
        figure_format: png, pdf or svg.
    """
    plots.check_format(figure_format)
    tracking.check_tracking()
    side_a, side_b = _resolve(run_a, "run_a"), _resolve(run_b, "run_b")
    # a temporary folder goes once logged, or when this fails; kept (less its downloads) when nothing is logged
    with OutputFolder(output_dir, prefix="tgo-compare-", figure_format=figure_format, keep=not log) as out:
        download = out.download
        _read_side(side_a, "run_a", download)
        _read_side(side_b, "run_b", download)
        epochs = matched_epochs(side_a.tables, side_b.tables)
        if not epochs:
            ea = sorted(set().union(*(set(t.epoch.unique()) for t in side_a.tables)))
            eb = sorted(set().union(*(set(t.epoch.unique()) for t in side_b.tables)))
            raise CompareError(
                f"the runs share no probed epoch (run_a probed {ea}, run_b {eb}); compare runs probed at common epochs (probe_every)."
            )
        notes: list[str] = []
        for side, which in ((side_a, "A"), (side_b, "B")):
            for run in side.runs:
                if run.info.status != "FINISHED":
                    notes.append(f"Run {which} {run.info.run_id} is {run.info.status}: this compares the epochs it logged.")
        if side_a.given == side_b.given:
            notes.append("Run A and run B are the same run: every difference is 0 and every CKA 1.")

        first_a, first_b = side_a.runs[0], side_b.runs[0]
        if len(side_a.runs) == 1 and len(side_b.runs) == 1:
            method = "jackknife"
            identity_a, identity_b = _probe_identity(first_a, download), _probe_identity(first_b, download)
            paired = bool(identity_a[0]) and identity_a == identity_b
            diffs = run_differences(
                side_a.tables[0], side_b.tables[0], side_a.replicates[0], side_b.replicates[0], paired=paired, epochs=epochs
            )
            notes.append(SCOPE_NOTE)
            if not paired:
                notes.append(
                    "The runs were not probed on the same images in the same folds (tgo.probe_fingerprint, probe_seed or "
                    "probe_folds differ): their standard errors combine as independent, sqrt(se_a^2 + se_b^2)."
                )
            if diffs.p.isna().all():
                notes.append(
                    "Neither run has jackknife replicates (probe_folds=1, or logged before tgo measured them): "
                    "differences are reported without tests."
                )
        else:
            method = "across runs"
            diffs = seed_differences(side_a.tables, side_b.tables, epochs=epochs)
            if min(len(side_a.runs), len(side_b.runs)) == 1:
                notes.append("One side is a single run: it is tested as one more draw from the other side's runs.")
        # ---- CKA (and, one run per side, intrinsic dimension) between the runs: the first seed run of each side ----
        cka = pd.DataFrame(columns=["epoch", "site", "view", "cka", "se", "folds", "n_images"])
        if not _same_images(first_a, first_b):
            notes.append("The runs were probed on different images (tgo.probe_fingerprint differs or is missing): no CKA between them.")
        else:
            from tgo.representations import read_kept

            kept_a = read_kept(first_a.info.run_id, download / "features")
            kept_b = kept_a if first_b.info.run_id == first_a.info.run_id else read_kept(first_b.info.run_id, download / "features")
            cka, cka_notes = cross_cka(kept_a, kept_b)
            notes += cka_notes
            if method != "jackknife" and len(cka):
                notes.append(
                    f"CKA between the runs: between the first seed run of each side ({first_a.info.run_id} and "
                    f"{first_b.info.run_id}), not every pair of seeds."
                )
            if method == "jackknife":
                dims = cross_intrinsic_dimension(kept_a, kept_b)
                if len(dims):
                    diffs = pd.concat([diffs, dims[dims.epoch.isin(epochs)]], ignore_index=True)
        diffs = adjust(diffs)
        last = epochs[-1]
        differing = differing_at(diffs, last)

        labels = (f"A: {side_a.label}", f"B: {side_b.label}")
        summary = pd.concat(
            [side_summary(side_a.tables, 0, epochs, side_a.replicates), side_summary(side_b.tables, 1, epochs, side_b.replicates)],
            ignore_index=True,
        )
        result = Comparison(
            run_a,
            run_b,
            [r.info.run_id for r in side_a.runs],
            [r.info.run_id for r in side_b.runs],
            method,
            epochs,
            diffs,
            differing,
            cka,
            summary,
            labels,
            side_a.head,
            notes=notes,
            output_dir=out.root,
        )

        out.table(diffs, "differences")
        out.table(cka, "cka")
        out.table(summary, "summary")
        groups = _figures(result, (side_a, side_b), out) if figures else {}
        result.figures = [p for paths in groups.values() for p in paths]
        result.report_html, result.report_md = _document(result, (side_a, side_b), groups).write(out.root)
        out.file("comparison.json", json.dumps(_summary_json(result), indent=2, default=float))
        if log:
            result.comparison_run_id = _log(result, (side_a, side_b), out)
        out.as_logged(result)
    return result


def _figures(c: Comparison, sides: tuple[_Side, _Side], out: OutputFolder) -> dict[str, list[Path]]:
    """The comparison's figures, by report section: the key observables of the head view over the
    matched epochs and by depth at the last one, both sides together; the CKA between the runs."""
    flat = flat_views([*sides[0].tables, *sides[1].tables])
    shown = c.summary[~pd.Series(list(zip(c.summary.site, c.summary.view))).isin(flat).to_numpy()]
    head_site, head_view = c.head
    groups: dict[str, list[Path]] = {"Observables over training, side by side": [], "Depth profile": [], "CKA between the runs": []}
    groups["Observables over training, side by side"].append(
        out.figure(plots.compare_over_epochs(shown, head_site, head_view, KEY_OBSERVABLES, c.labels), f"epochs_{head_site}_{head_view}")
    )
    groups["Depth profile"].append(out.figure(plots.compare_depth_profile(shown, c.epochs[-1], KEY_OBSERVABLES, c.labels), "depth_profile"))
    if len(c.cka):
        groups["CKA between the runs"].append(
            out.figure(
                plots.cross_run_cka(c.cka, f"Debiased linear CKA between {c.labels[0]} and {c.labels[1]} at each site"), "cka_between_runs"
            )
        )
    return groups


def _summary_json(c: Comparison) -> dict:
    last_cka = c.cka[c.cka.epoch == c.cka.epoch.max()] if len(c.cka) else c.cka
    return {
        "run_a": c.run_a,
        "run_b": c.run_b,
        "runs_a": c.runs_a,
        "runs_b": c.runs_b,
        "method": c.method,
        "matched_epochs": c.epochs,
        "last_epoch": c.last_epoch,
        "alpha": ALPHA,
        "tests_at_last_epoch": int(c.differences[(c.differences.epoch == c.last_epoch) & c.differences.p.notna()].shape[0]),
        "differing_at_last_epoch": json.loads(c.differing.to_json(orient="records")),
        "cka_at_last_common_kept_epoch": json.loads(last_cka.to_json(orient="records")),
        "notes": c.notes,
        "tgo_version": tgo.__version__,
    }


def _log(c: Comparison, sides: tuple[_Side, _Side], out: OutputFolder) -> str:
    """The comparison run, linked to both runs (tags and a note) but the child of neither."""
    a, b = sides
    assert c.last_epoch is not None  # compare() stops with a CompareError when no epoch matched
    note = (
        f"Comparison of {_links(c, a)} (run A, `{a.given}`) and {_links(c, b)} (run B, `{b.given}`) at matched epochs "
        f"{c.epochs}: {len(c.differing)} site/view/observable differences at epoch {c.last_epoch} "
        f"(Benjamini-Hochberg, q <= {ALPHA}). Report: report/report.html."
    )
    tags = {
        Tag.KIND: "comparison",
        Tag.COMPARED_RUNS: f"{c.run_a},{c.run_b}",
        Tag.RUN_A: c.run_a,
        Tag.RUN_B: c.run_b,
        Tag.COMPARE_METHOD: c.method,
        Tag.VERSION: tgo.__version__,
        "mlflow.note.content": note,
    }
    run_id = tracking.open_linked_run(c.run_a, f"compare {a.label} vs {b.label}"[:250], tags)
    compared = f"runs {c.run_a} and {c.run_b} and their artifacts" if c.run_a != c.run_b else f"run {c.run_a} and its artifacts"
    with failing_run(run_id, "comparison", f"tgo compare {c.run_a} {c.run_b}", compared):
        out.log(run_id, files=("comparison.json",))
        last = c.differences[c.differences.epoch == c.last_epoch]
        metrics: dict[str, float] = {
            compare_key("differing"): len(c.differing),
            compare_key("tests"): int(last.p.notna().sum()),
            compare_key("matched_epochs"): len(c.epochs),
        }
        tracking.log_metrics(run_id, metrics, step=int(c.last_epoch))
        # cka/<site>/<view> at every common kept epoch (the step): its latest value is the last one's
        for step in sorted(c.cka.epoch.unique()) if len(c.cka) else []:
            at = c.cka[c.cka.epoch == step]
            tracking.log_metrics(run_id, {cross_cka_key(r.site, r.view): r.cka for r in at.itertuples()}, step=int(step))
    tracking.finish(run_id)
    for given in dict.fromkeys((c.run_a, c.run_b)):
        tracking.set_tags(given, {Tag.COMPARISON_RUN: run_id})
    return run_id
