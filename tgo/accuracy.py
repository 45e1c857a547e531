"""What the geometry says about accuracy: per site, view and observable, the rank correlation
between the observable and val/acc1 with its test, over a run's probed epochs (`over_epochs`) or
over the runs of a sweep or study at their last epoch (`over_runs`), and the checkpoint (or run)
each observable would pick next to the one accuracy picks (pure functions: numpy, scipy, pandas).

Why: a representation's rank or spectral decay is reported to track its downstream accuracy, so
that it could choose checkpoints or hyperparameters without labels. RankMe (the effective rank of
the embeddings) ranks checkpoints and hyperparameters of joint-embedding methods as their linear
probe accuracy does; alpha-ReQ finds the power-law decay alpha of the eigenspectrum predicts it,
best near alpha = 1 (a relation that need not be monotone, so a rank correlation can miss it):
  Garrido, Q., Balestriero, R., Najman, L. & LeCun, Y. (2023). RankMe: Assessing the downstream
    performance of pretrained self-supervised representations by their rank. ICML.
  Agrawal, K. K., Mondal, A. K., Ghosh, A. & Richards, B. A. (2022). alpha-ReQ: Assessing
    representation quality in self-supervised learning by measuring eigenspectrum decay. NeurIPS.
Here the test is run on the geometry tgo measures, against the accuracy the run logged.

Method (the `METHOD` text of the report):
- Spearman's rho between the observable and val/acc1 over the n epochs (runs) that have both
  (`scipy.stats.spearmanr`, average ranks for ties); NaN when n < 3 or either series is constant
  (no warning), and then not significant.
- Its two-sided p, by a permutation test (the null of no association, conditional on the two
  series' ties; what `scipy.stats.permutation_test` with permutation_type="pairings" computes,
  2 min(P(T >= t), P(T <= t)) capped at 1): for n <= EXACT_MAX_N (8) exact, over all n! pairings;
  above, over RESAMPLES (9999) random pairings drawn with a fixed seed, p = (1 + k) / (1 + B) for
  each tail (valid, and reproducible). Not spearmanr's Student t approximation: it gives p = 0 to
  any monotone series of 3 or 4 points (exact p 1/3 and 1/12), and in the tail where Holm decides
  it is liberal (measured on 200000 null series: at p < 0.05 / 16, 1.4 times the nominal rate at
  12 epochs, 1.3 at 20, 1.1 at 50), which lifted the false-positive rate of a site/view above
  alpha. The exact p is at least 2/n!: 0.083 at 4 epochs, 0.017 at 5, 0.0028 at 6.
- Multiple comparisons by the rule of the verdicts (`tgo.findings`): Holm across the observables
  of one site/view (`p_holm`; `significant`: p_holm < alpha, family-wise error alpha per
  site/view), then Benjamini-Hochberg across the site/views on each site/view's smallest p_holm
  (`q`; `significant_everywhere`: p_holm at or below BH's cutoff, false discovery rate alpha over
  the site/views). With 16 observables Holm's first step needs p < alpha / 16 = 0.003, which the
  exact p reaches from 6 epochs (runs) on.
- The pick: the epoch (run) where the observable is best, argmax of direction x value, ties to the
  earliest epoch (the first run in the order given); accuracy's pick, argmax of val/acc1 over the
  same epochs (runs); `agree` when they are the same, `as_good` when val/acc1 at the observable's
  pick equals its best (another epoch tied with accuracy's, as where val/acc1 saturates). The direction is the one TGO-I expects for
  the observable over training (`tgo.findings.TREND_FINDINGS`: up for effective_rank,
  participation_ratio, spectral_entropy and spectral_flatness, down for the anisotropies and
  alpha), up for rankme (Garrido et al.), and otherwise the sign of rho (`direction_from`
  "in-sample": chosen on the data it is judged on, so its agreement is optimistic).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.stats

from tgo import findings
from tgo.findings import ALPHA
from tgo.keys import HEAD_VIEW

EXACT_MAX_N = 8  # 8! = 40320 pairings, all of them; above, RESAMPLES random ones
RESAMPLES = 9999  # scipy.stats.permutation_test's default; p resolves to 1e-4
ACCURACY_KEY = "val/acc1"
DirectionFrom = Literal["TGO-I", "RankMe", "in-sample"]

# observable -> (+1 higher is better / -1 lower is better, where the direction comes from)
PRIOR_DIRECTIONS: dict[str, tuple[int, DirectionFrom]] = {
    **{name: (d, "TGO-I") for _, (_, expected) in findings.TREND_FINDINGS.items() for name, d in expected.items()},
    "rankme": (1, "RankMe"),
}

COLUMNS = [
    "site",
    "view",
    "observable",
    "n",
    "rho",
    "p",
    "p_method",
    "p_floor",
    "p_holm",
    "q",
    "significant",
    "significant_everywhere",
    "direction",
    "direction_from",
    "pick",
    "accuracy_pick",
    "agree",
    "as_good",
    "accuracy_at_pick",
    "accuracy_best",
]

METHOD = (
    "Spearman's rho between each observable and {key} over the {units} that have both; its two-sided p "
    "comes from a permutation test, exact (all pairings of the two series) up to {exact} {units} and "
    "over {resamples} random pairings above. Holm's correction runs across the observables of a site/view (significant: Holm p < "
    "{alpha}), Benjamini-Hochberg across the site/views (significant everywhere: false discovery rate "
    "{alpha}), as for the verdicts. Each observable picks the {unit} where it is best (largest value "
    "for those TGO-I expects to rise and for RankMe, smallest for the anisotropies and alpha, else in "
    "the direction of its rho, chosen in-sample), ties to the first; {key} picks its largest."
)


# --------------------------------------------------------------------------------------------------
# Spearman's rho and its p
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _pairings(n: int) -> np.ndarray:
    """The pairings of the permutation test, (count, n): all n! orderings of range(n) up to
    EXACT_MAX_N, else RESAMPLES random ones drawn with the seed n (the same every time)."""
    if n <= EXACT_MAX_N:
        return np.array(list(itertools.permutations(range(n))), dtype=np.int32)
    return np.random.default_rng(n).permuted(np.tile(np.arange(n, dtype=np.int32), (RESAMPLES, 1)), axis=1)


@functools.lru_cache(maxsize=1024)
def _null(rx: tuple[int, ...], ry: tuple[int, ...]) -> np.ndarray:
    """sum_i rx_i ry_pi(i) over the pairings pi, sorted: the null distribution of the rank
    statistic, which depends on the two multisets of ranks only (hence the cache: the observables
    without ties of one run share it)."""
    return np.sort(np.asarray(ry, dtype=np.int64)[_pairings(len(rx))] @ np.asarray(rx, dtype=np.int64))


def _two_sided(null: np.ndarray, t: int, exact: bool) -> float:
    """2 min(P(T >= t), P(T <= t)) capped at 1 over the sorted null (Monte Carlo: (1 + k) / (1 + B))."""
    tail = min(len(null) - np.searchsorted(null, t, side="left"), np.searchsorted(null, t, side="right"))
    return float(min(1.0, 2 * tail / len(null) if exact else 2 * (1 + tail) / (1 + len(null))))


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float, str, float]:
    """(Spearman's rho, its two-sided permutation p, "exact" or "permutation", the smallest p these
    two series' ranks allow) of x and y; NaN and "" when n < 3 or either series is constant.

    rho is Pearson's correlation of the average ranks (what scipy.stats.spearmanr computes). The
    test statistic is T = sum_i rank(x)_i rank(y)_i (rho is an increasing function of it), and
    p = 2 min(P(T >= t), P(T <= t)) capped at 1, over all n! pairings (n <= EXACT_MAX_N) or over
    RESAMPLES random ones, each tail then (1 + k) / (1 + RESAMPLES). The ranks are doubled average
    ranks, integers, so ties compare exactly. The smallest p is that of the most extreme pairing
    (rho = +-1 where no ties): 2/n! without ties, more where ties (saturated accuracy) leave the
    test fewer distinct pairings."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan, "", np.nan
    rx = np.rint(2 * scipy.stats.rankdata(x)).astype(np.int64)
    ry = np.rint(2 * scipy.stats.rankdata(y)).astype(np.int64)
    cx, cy = rx - rx.mean(), ry - ry.mean()
    rho = float(np.clip(cx @ cy / np.sqrt((cx @ cx) * (cy @ cy)), -1.0, 1.0))
    sx, sy = np.sort(rx), np.sort(ry)
    null = _null(tuple(sx), tuple(sy))
    exact = len(rx) <= EXACT_MAX_N
    floor = min(_two_sided(null, int(sx @ sy), exact), _two_sided(null, int(sx @ sy[::-1]), exact))
    return rho, _two_sided(null, int(rx @ ry), exact), "exact" if exact else "permutation", floor


def min_exact_p(n: int) -> float:
    """The smallest two-sided exact p of n points without ties: 2 / n!."""
    return 2.0 / math.factorial(n)


# --------------------------------------------------------------------------------------------------
# the tables
# --------------------------------------------------------------------------------------------------


def _pick(labels: list, values: np.ndarray, direction: float) -> tuple[object, int]:
    """(label, index) of the best value in `direction`, ties to the first; (None, -1) for no direction
    or a constant series."""
    if direction == 0 or not len(values) or np.ptp(values) == 0:
        return None, -1
    i = int(np.argmax(direction * values))  # np.argmax takes the first of tied maxima
    return labels[i], i


def _correlate(table: pd.DataFrame, unit: str, accuracy: pd.Series, alpha: float) -> pd.DataFrame:
    """The table of `over_epochs` and `over_runs`: `table` has columns unit, site, view, observable,
    value; `accuracy` is indexed by the unit's labels, in the order ties go to."""
    accuracy = accuracy[np.isfinite(accuracy.to_numpy(float))]
    if table.empty or accuracy.empty:
        return pd.DataFrame(columns=COLUMNS)
    order = {label: i for i, label in enumerate(accuracy.index)}
    known = table[table[unit].isin(order) & np.isfinite(table.value.to_numpy(float))]
    known = known.assign(place=known[unit].map(order)).sort_values("place", kind="stable")  # each group in accuracy's order
    places, values = known.place.to_numpy(int), known.value.to_numpy(float)
    all_labels, all_accuracy = list(accuracy.index), accuracy.to_numpy(float)
    rows = []
    for (site, view, name), index in known.groupby(["site", "view", "observable"], sort=False).indices.items():
        labels = [all_labels[i] for i in places[index]]
        y, x = values[index], all_accuracy[places[index]]
        rho, p, how, floor = spearman(x, y)
        prior = PRIOR_DIRECTIONS.get(name)
        direction, source = (prior[0], prior[1]) if prior else ((float(np.sign(rho)) if np.isfinite(rho) else 0.0), "in-sample")
        pick, at = _pick(labels, y, direction)
        best, best_at = _pick(labels, x, 1.0)
        if best is None:  # accuracy the same at every epoch: argmax takes the first
            best, best_at = labels[0], 0
        rows.append(
            {
                "site": site,
                "view": view,
                "observable": name,
                "n": len(y),
                "rho": rho,
                "p": p,
                "p_method": how,
                "p_floor": floor,
                "direction": int(direction),
                "direction_from": source,
                "pick": pick,
                "accuracy_pick": best,
                "agree": pick is not None and pick == best,
                "as_good": at >= 0 and x[at] == x[best_at],  # another epoch (run) tied with accuracy's best
                "accuracy_at_pick": x[at] if at >= 0 else np.nan,
                "accuracy_best": x[best_at],
            }
        )
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=COLUMNS)
    out["p_holm"] = np.nan
    for _, index in out.groupby(["site", "view"], sort=False).groups.items():
        out.loc[index, "p_holm"] = findings.holm(out.loc[index, "p"].to_numpy(float))
    out["significant"] = out.p_holm < alpha  # NaN compares False
    # Benjamini-Hochberg across the site/views, on each one's smallest Holm p (as tgo.findings.everywhere)
    smallest = out.groupby(["site", "view"], sort=False).p_holm.min()
    q = pd.Series(findings.benjamini_hochberg(smallest.to_numpy(float)), index=smallest.index)
    rejected = smallest[q < alpha]  # BH rejects every p at or below the largest p_(i) <= i alpha / m
    cutoff = float(rejected.max()) if len(rejected) else -1.0
    out["q"] = [q[key] for key in zip(out.site, out.view)]
    out["significant_everywhere"] = out.p_holm <= cutoff
    return out[COLUMNS]


def over_epochs(geometry: pd.DataFrame, accuracy: pd.Series | Mapping[int, float], alpha: float = ALPHA) -> pd.DataFrame:
    """Per site, view and observable of one run: the rank correlation of the observable with
    val/acc1 over the probed epochs that have both, its tests and the epoch each picks (module doc).

    Args:
        geometry: the tidy geometry table (epoch, site, view, observable, value; other columns
            such as se are ignored), as `tgo.analysis.Analysis.geometry` has it.
        accuracy: val/acc1 by epoch (a Series indexed by epoch, or a mapping).
        alpha: the level of the tests.

    Returns:
        One row per site, view and observable (COLUMNS): n, rho, p and p_method ("exact" or
        "permutation"), p_holm, q, significant, significant_everywhere, direction and
        direction_from, pick (the epoch the observable picks; missing for a constant series),
        accuracy_pick, agree, as_good (val/acc1 at the observable's pick equals its best: a pick
        tied with accuracy's), accuracy_at_pick (val/acc1 there) and accuracy_best. Empty (with these columns) when no epoch has both.
    """
    acc = pd.Series(accuracy, dtype=float)
    acc.index = acc.index.astype(int)
    out = _correlate(geometry, "epoch", acc.sort_index(), alpha)
    out["pick"] = out.pick.astype("Int64")
    out["accuracy_pick"] = out.accuracy_pick.astype("Int64")
    return out


def over_runs(last: pd.DataFrame, accuracy: Mapping[Any, float], alpha: float = ALPHA) -> pd.DataFrame:
    """The table of `over_epochs` across runs (a sweep's seeds, a study's trials): the rank
    correlation over runs between each observable's last-epoch value and the run's last val/acc1,
    and the run each observable would pick next to the run accuracy picks.

    Args:
        last: the runs' geometry at their last epoch, columns run, site, view, observable, value
            (`at_last_epoch` makes it from a table of every epoch); `run` holds the runs' labels.
        accuracy: each run's val/acc1 at its last epoch, by the same labels; ties go to the first
            run in this order.
        alpha: the level of the tests.
    """
    return _correlate(last, "run", pd.Series(dict(accuracy), dtype=float), alpha)


def at_last_epoch(table: pd.DataFrame, run: str = "run") -> pd.DataFrame:
    """The rows of a table of several runs (column `run`) at each run's own last epoch."""
    if table.empty:
        return table
    last = table.groupby(run).epoch.transform("max")
    return table[table.epoch == last]


# --------------------------------------------------------------------------------------------------
# the report's sentences
# --------------------------------------------------------------------------------------------------


def method(unit: str = "epoch", alpha: float = ALPHA) -> str:
    """The METHOD paragraph for a table over epochs ("epoch") or runs ("run", "seed", "trial")."""
    return METHOD.format(key=ACCURACY_KEY, unit=unit, units=unit + "s", exact=EXACT_MAX_N, resamples=RESAMPLES, alpha=alpha)


def _g(x: float) -> str:
    return f"{x:.3g}"


def _named(rows: pd.DataFrame, rho: bool = False) -> str:
    """'effective_rank (rho -0.9, against TGO-I's direction), stable_rank (in-sample direction)': the
    observables, each marked where its direction was chosen in-sample or its rho runs against the
    direction it was given."""

    def one(r) -> str:
        marks = [f"rho {_g(r.rho)}"] if rho else []
        if r.direction_from == "in-sample":
            marks.append("in-sample direction")
        elif np.sign(r.rho) != r.direction:
            marks.append(f"against {r.direction_from}'s direction")
        return f"{r.observable} ({', '.join(marks)})" if marks else r.observable

    return ", ".join(one(r) for r in rows.itertuples())


def summary(table: pd.DataFrame, head: tuple[str, str] = HEAD_VIEW, unit: str = "epoch", alpha: float = ALPHA) -> str:
    """The report's sentences: the epoch (run) accuracy picks; at the head view, which observables
    track val/acc1 after Holm's correction and which of them would have chosen that epoch (run);
    across the site/views (Benjamini-Hochberg), how many have such an observable.

    Args:
        table: an `over_epochs` or `over_runs` table.
        head: the view that feeds the classifier head.
        unit: what the picks are, in the sentences: "epoch", "run", "seed", "trial".
        alpha: the level the table was made at.
    """
    if table.empty:
        return f"No {unit} has both {ACCURACY_KEY} and geometry: nothing to correlate."
    n = int(table.n.max())
    best, best_value = table.accuracy_pick.iloc[0], table.accuracy_best.iloc[0]
    if table.rho.isna().all() and n >= 3:
        return f"{ACCURACY_KEY} does not change over the {n} {unit}s (or no observable does): nothing to correlate."
    text = [f"{ACCURACY_KEY} is highest at {unit} {best} ({_g(best_value)}) of the {n} {unit}s with both."]
    site, view = head
    at = table[(table.site == site) & (table.view == view)]
    where = f"At {site}/{view}, the view that feeds the head"
    if at.empty:
        text.append(f"{site}/{view} was not measured.")
    else:
        tested = int(at.p.notna().sum())
        tracking = at[at.significant]
        if tracking.empty:
            reason, floor = "", at.p_floor.min()
            if n < 3:
                reason = f" (a rank correlation needs 3 {unit}s, there are {n})"
            elif tested and floor >= alpha / tested:
                need = next(k for k in itertools.count(3) if min_exact_p(k) < alpha / tested)
                ties = f" and the ties of {ACCURACY_KEY}" if n > EXACT_MAX_N or floor > min_exact_p(n) else ""
                reason = (
                    f" (the smallest p that {n} {unit}s{ties} allow is {_g(floor)}; Holm's first step across {tested} "
                    f"observables needs below {_g(alpha / tested)}{f', which takes {need} {unit}s without ties' if n < need else ''})"
                )
            same = at[at.agree]
            text.append(
                f"{where}, no observable tracks {ACCURACY_KEY} after Holm's correction{reason}; by the picks "
                f"alone, without a test, {len(same)} of its {len(at)} observables would have chosen {unit} {best}."
            )
        else:  # a significant rho is finite, so each of these has a direction and a pick
            agree = tracking[tracking.agree]
            tied = tracking[~tracking.agree & tracking.as_good]
            worse = tracking[~tracking.as_good]
            parts = [f"{where}, {len(tracking)} of {len(at)} observables track {ACCURACY_KEY} after Holm's correction"]
            if len(agree):
                parts.append(f"{_named(agree, rho=True)} would have chosen {unit} {best}, as accuracy did")
            if len(tied):
                picks = [str(p) for p in sorted(set(tied.pick))]
                which = f"{unit} {picks[0]}" if len(picks) == 1 else f"{unit}s {', '.join(picks[:-1])} and {picks[-1]}"
                parts.append(f"{_named(tied)} would have chosen {which}, where {ACCURACY_KEY} is as high")
            if len(worse):
                groups = [
                    f"{unit} {pick} ({ACCURACY_KEY} {_g(group.accuracy_at_pick.iloc[0])}): {_named(group)}"
                    for pick, group in sorted(worse.groupby("pick"), key=lambda g: g[1].accuracy_at_pick.iloc[0])
                ]
                parts.append(f"{'the others' if len(agree) + len(tied) else 'they'} would have chosen worse, " + "; ".join(groups))
            text.append("; ".join(parts) + ".")
    pairs = table[["site", "view"]].drop_duplicates()
    if len(pairs) > 1:
        found = table[table.significant_everywhere]
        with_some = found[["site", "view"]].drop_duplicates()
        chose = found[found.agree][["site", "view"]].drop_duplicates()
        as_good = found[found.as_good][["site", "view"]].drop_duplicates()
        across = f"Across all {len(pairs)} site/views (Benjamini-Hochberg)"
        if with_some.empty:
            text.append(f"{across}, none has an observable that tracks {ACCURACY_KEY}.")
        else:
            text.append(
                f"{across}, {len(with_some)} have an observable that tracks {ACCURACY_KEY}; at {len(chose)} of them "
                f"one that does would have chosen {unit} {best}, at {len(as_good)} {unit} {best} or one where "
                f"{ACCURACY_KEY} is as high."
            )
    return " ".join(text)
