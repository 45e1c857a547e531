"""TGO-I's findings judged on a run's geometry: tests with p-values and effect sizes, multiple
comparisons controlled, and verdicts that hold up on noise (pure functions: numpy, scipy, pandas).

The five findings of TGO-I (training spreads variance over more dimensions):
  1 effective_rank and participation_ratio increase      3 spectral_entropy increases
  2 spectral_anisotropy and cosine_anisotropy decrease   4 spectral_flatness up, alpha down
  5 the view that feeds the head (final/cls; final/mean for average-pooled models) has, at the
    last epoch, the highest effective_rank and the lowest spectral_anisotropy of all sites.

Two tests per observable (`trend_table`), at every site and view:
- change: the first-to-last difference d = theta_last - theta_first over its paired jackknife
  standard error (the same probe images every epoch, so the replicates pair fold by fold:
  `tgo.uncertainty.paired_se`), two-sided Student t with K - 1 degrees of freedom. Effect size:
  d, d / |theta_first| and t = d / se.
- trend: Mann-Kendall, i.e. Kendall's tau between epoch and value (`scipy.stats.kendalltau`, exact
  p for small series), with Sen's slope (`scipy.stats.theilslopes`) as effect size. It cannot
  reach p < 0.05 with fewer than 5 epochs, so it is used from 5 epochs on.
An observable moved when the tests it has both reject in the same direction: p = max(p_change,
p_trend) (an intersection-union test, level alpha without correction). With standard errors but
fewer than 5 epochs the change test decides alone; without standard errors (runs logged before
tgo measured them, runs read from metric histories) the trend test decides alone, and the verdict
says so.

Multiple comparisons: Holm across the observables of one finding (family-wise error alpha per
finding and site/view), then Benjamini-Hochberg across the site/views of the "everywhere" table
(false discovery rate alpha). Verdicts: supported (a significant change the expected way and none
against), contradicted (the reverse), mixed (significant changes both ways), inconclusive (nothing
significant). On noise, supported or contradicted therefore comes out at most alpha of the time
(tests/test_findings.py measures it on 200 noise histories).

Holm's step-down is written here (scipy has no Holm; statsmodels' `multipletests` has it, but is no
dependency of tgo for five lines); Benjamini-Hochberg is `scipy.stats.false_discovery_control`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import scipy.stats

from tgo import uncertainty
from tgo.keys import HEAD_VIEW
from tgo.spectral import OBSERVABLE_NAMES

ALPHA = 0.05
MIN_TREND_EPOCHS = 5  # Kendall's exact two-sided p is at least 2/n!: 0.083 at 4 epochs, 0.017 at 5
Verdict = Literal["supported", "contradicted", "mixed", "inconclusive"]

# number -> (claim, {observable: expected direction, +1 up, -1 down})
TREND_FINDINGS: dict[int, tuple[str, dict[str, int]]] = {
    1: (
        "Dimensional utilisation (effective rank, participation ratio) increases over training",
        {"effective_rank": 1, "participation_ratio": 1},
    ),
    2: ("Anisotropy decreases over training", {"spectral_anisotropy": -1, "cosine_anisotropy": -1}),
    3: ("Spectral entropy increases over training", {"spectral_entropy": 1}),
    4: ("Eigenspectra get flatter over training (flatness up, power-law decay alpha down)", {"spectral_flatness": 1, "alpha": -1}),
}
FINDING5 = "The representation that feeds the head has the highest effective rank and the lowest anisotropy of all sites"
FINDING5_OBSERVABLES = {"effective_rank": 1, "spectral_anisotropy": -1}

# (site, view) -> epoch -> (K, len(OBSERVABLE_NAMES)) jackknife replicates
Replicates = Mapping[tuple[str, str], Mapping[int, np.ndarray]]

METHOD = (
    "Each observable gets two tests: the change from the first to the last probed epoch against its "
    "paired jackknife standard error (the same probe images every epoch, K folds; Student t with K - 1 "
    "degrees of freedom), and a Mann-Kendall test of monotone trend over the epochs (Kendall's tau, "
    "with Sen's slope). An observable counts as moved when both tests reject in the same direction at "
    "level {alpha} (the trend test from {min_trend} epochs on; without standard errors it decides "
    "alone). Holm's correction runs across the observables of a finding, Benjamini-Hochberg across "
    "the site/views of the everywhere table. A finding is supported when some observable moved the "
    "expected way and none the other, contradicted in the reverse case, mixed when both happened and "
    "inconclusive when nothing moved. Finding 5 compares the view that feeds the head with every "
    "other site's view of the same kind at the last epoch, each difference against its paired "
    "standard error (the same images at every site). On noise, supported or contradicted comes out "
    "at most {alpha:.0%} of the time."
)


@dataclass
class Finding:
    number: int
    claim: str
    verdict: Verdict
    evidence: str
    method: str = ""  # "standard errors and trend", "trend only (no standard errors)", ...
    tests: list[dict] = field(default_factory=list)  # one row per observable (or comparison)

    @property
    def score(self) -> int:
        """The metric finding/N: 1 supported, -1 contradicted, 0 otherwise."""
        return {"supported": 1, "contradicted": -1}.get(self.verdict, 0)


# --------------------------------------------------------------------------------------------------
# multiple comparisons
# --------------------------------------------------------------------------------------------------


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error): sorted p_(1) <= ... <= p_(m),
    adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). NaN entries stay NaN and do not count."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return out
    order = np.argsort(p[ok])
    adj = np.minimum(1.0, (m - np.arange(m)) * p[ok][order])
    out_ok = np.empty(m)
    out_ok[order] = np.maximum.accumulate(adj)
    out[ok] = out_ok
    return out


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values; scipy.stats.false_discovery_control)."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = scipy.stats.false_discovery_control(p[ok], method="bh")
    return out


# --------------------------------------------------------------------------------------------------
# tests of one series
# --------------------------------------------------------------------------------------------------


def trend_test(epochs: np.ndarray, values: np.ndarray) -> dict[str, float]:
    """Mann-Kendall (Kendall's tau of value against epoch) and Sen's slope; NaN when < 3 epochs or
    a constant series."""
    x, y = np.asarray(epochs, float), np.asarray(values, float)
    if len(y) < 3 or np.ptp(y) == 0:
        return {"kendall_tau": np.nan, "trend_p": np.nan, "sen_slope": np.nan}
    tau, p = scipy.stats.kendalltau(x, y)
    return {"kendall_tau": float(tau), "trend_p": float(p), "sen_slope": float(scipy.stats.theilslopes(y, x)[0])}


def change_test(first: float, last: float, reps_first: np.ndarray | None, reps_last: np.ndarray | None) -> dict[str, float]:
    """The first-to-last change against its paired jackknife standard error (NaN without one)."""
    change = last - first
    out = {
        "change": change,
        "relative_change": change / abs(first) if first else np.nan,
        "change_se": np.nan,
        "change_t": np.nan,
        "change_p": np.nan,
    }
    if reps_first is None or reps_last is None or len(reps_first) != len(reps_last) or len(reps_first) < 2:
        return out
    se = float(uncertainty.paired_se(reps_first, reps_last))
    out["change_se"] = se
    out["change_t"] = change / se if se > 0 else (0.0 if change == 0 else np.sign(change) * np.inf)
    out["change_p"] = float(uncertainty.t_test(change, se, len(reps_first)))
    return out


def combine(row: Mapping[str, float]) -> tuple[float, float, str]:
    """(p, direction, method) of one observable from its change and trend tests (module doc)."""
    has_se, has_trend = np.isfinite(row["change_p"]), row["n_epochs"] >= MIN_TREND_EPOCHS and np.isfinite(row["trend_p"])
    if has_se and has_trend:
        agree = np.sign(row["change"]) == np.sign(row["kendall_tau"]) != 0
        p = max(row["change_p"], row["trend_p"]) if agree else 1.0
        return p, float(np.sign(row["change"])), "change and trend"
    if has_se:
        return row["change_p"], float(np.sign(row["change"])), "change only (fewer than 5 epochs)"
    if has_trend:
        return row["trend_p"], float(np.sign(row["kendall_tau"])), "trend only (no standard errors)"
    return np.nan, 0.0, "no test (too few epochs, no standard errors)"


def trend_table(geometry: pd.DataFrame, replicates: Replicates | None = None) -> pd.DataFrame:
    """Per site, view and observable: first/last value and standard error, the change test, the
    Mann-Kendall trend test, Spearman's rho (for reference), step consistency, and the combined p,
    direction and method (`combine`)."""
    replicates = replicates or {}
    column = {name: j for j, name in enumerate(OBSERVABLE_NAMES)}
    rows = []
    for (site, view, name), part in geometry.groupby(["site", "view", "observable"], sort=False):
        part = part.sort_values("epoch")
        x, y = part.epoch.to_numpy(), part.value.to_numpy(float)
        first_e, last_e = int(x[0]), int(x[-1])
        reps = replicates.get((site, view), {})
        rf = reps[first_e][:, column[name]] if first_e in reps and name in column else None
        rl = reps[last_e][:, column[name]] if last_e in reps and name in column else None
        row = {
            "site": site,
            "view": view,
            "observable": name,
            "n_epochs": len(y),
            "first_epoch": first_e,
            "last_epoch": last_e,
            "first": y[0],
            "last": y[-1],
            "se_first": uncertainty.jackknife_se(rf) if rf is not None else np.nan,
            "se_last": uncertainty.jackknife_se(rl) if rl is not None else np.nan,
        }
        row.update(change_test(y[0], y[-1], rf, rl) if len(y) >= 2 else change_test(y[0], y[0], None, None))
        row.update(trend_test(x, y))
        if len(y) >= 3 and np.ptp(y) > 0:
            rho, p = scipy.stats.spearmanr(x, y)
        else:
            rho, p = np.nan, np.nan
        row.update(spearman_rho=float(rho), spearman_p=float(p), consistency=_consistency(y))
        row["p"], row["direction"], row["method"] = combine(row)
        rows.append(row)
    return pd.DataFrame(rows)


def _consistency(y: np.ndarray) -> float:
    """Share of epoch-to-epoch steps in the dominant direction (ties go to the sign of last - first)."""
    steps = np.sign(np.diff(y))
    moves = steps[steps != 0]
    if not moves.size:
        return np.nan
    dominant = np.sign(moves.sum()) or np.sign(y[-1] - y[0]) or 1.0
    return float(np.mean(steps == dominant))


# --------------------------------------------------------------------------------------------------
# verdicts
# --------------------------------------------------------------------------------------------------


def verdict_of(moved_for: int, moved_against: int) -> Verdict:
    if moved_for and moved_against:
        return "mixed"
    if moved_for:
        return "supported"
    if moved_against:
        return "contradicted"
    return "inconclusive"


def _fmt(x: float) -> str:
    return "nan" if not np.isfinite(x) else (f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}")


def _judge_site(trends: pd.DataFrame, site: str, view: str, expected: Mapping[str, int], alpha: float) -> tuple[list[dict], str]:
    """The finding's observables at one site/view with Holm-adjusted p and their call."""
    rows = []
    for name, direction in expected.items():
        hit = trends[(trends.site == site) & (trends.view == view) & (trends.observable == name)]
        if not hit.empty:
            rows.append({**hit.iloc[0].to_dict(), "expected": direction})
    adjusted = holm(np.array([r["p"] for r in rows]))
    for r, p_adj in zip(rows, adjusted):
        r["p_holm"] = p_adj
        moved = np.isfinite(p_adj) and p_adj < alpha
        r["call"] = ("as expected" if r["direction"] == r["expected"] else "against") if moved else "not significant"
    methods = sorted({r["method"] for r in rows})
    return rows, "; ".join(methods)


def _describe(r: dict) -> str:
    se = f" +- {_fmt(r['change_se'])}" if np.isfinite(r["change_se"]) else ""
    trend = f", Kendall tau {_fmt(r['kendall_tau'])} (p {_fmt(r['trend_p'])})" if np.isfinite(r["kendall_tau"]) else ""
    return (
        f"{r['observable']} {_fmt(r['first'])} -> {_fmt(r['last'])} (change {_fmt(r['change'])}{se}, "
        f"p {_fmt(r['change_p'])}{trend}; Holm p {_fmt(r['p_holm'])}: {r['call']})"
    )


def trend_findings(
    trends: pd.DataFrame, head: tuple[str, str] = HEAD_VIEW, alpha: float = ALPHA, wide: pd.DataFrame | None = None
) -> list[Finding]:
    """Findings 1-4 at the view that feeds the head, with the share of all site/views as context
    (`wide`: the `everywhere` table, computed here unless the caller already has it)."""
    out = []
    site, view = head
    n_epochs = int(trends.n_epochs.max()) if len(trends) else 0
    wide = everywhere(trends, alpha) if wide is None else wide
    for number, (claim, expected) in TREND_FINDINGS.items():
        if n_epochs < 2:
            out.append(Finding(number, claim, "inconclusive", f"only {n_epochs} epoch(s) of geometry.", "no test"))
            continue
        rows, method = _judge_site(trends, site, view, expected, alpha)
        if not rows:
            out.append(Finding(number, claim, "inconclusive", f"{site}/{view} was not measured.", "no test"))
            continue
        calls = [r["call"] for r in rows]
        verdict = verdict_of(calls.count("as expected"), calls.count("against"))
        part = wide[wide.finding == number]
        context = ""
        if len(part):
            counts = part.verdict.value_counts()
            context = (
                f" Everywhere (Benjamini-Hochberg across {len(part)} site/views): supported at "
                f"{counts.get('supported', 0)}, contradicted at {counts.get('contradicted', 0)}, mixed at "
                f"{counts.get('mixed', 0)}, inconclusive at {counts.get('inconclusive', 0)}."
            )
        evidence = f"At {site}/{view}: " + "; ".join(map(_describe, rows)) + "." + context
        out.append(Finding(number, claim, verdict, evidence, method, rows))
    return out


def everywhere(trends: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """Findings 1-4 at every site/view: the finding's p (the smallest Holm-adjusted p of its
    observables), its Benjamini-Hochberg q across the site/views, and the verdict there."""
    rows = []
    pairs = list(trends[["site", "view"]].drop_duplicates().itertuples(index=False))
    for number, (_, expected) in TREND_FINDINGS.items():
        found = []
        for site, view in pairs:
            obs, _ = _judge_site(trends, site, view, expected, 1.0)  # calls made after BH below
            if obs:
                p = np.nanmin([o["p_holm"] for o in obs]) if any(np.isfinite(o["p_holm"]) for o in obs) else np.nan
                found.append((site, view, p, obs))
        q = benjamini_hochberg(np.array([f[2] for f in found]))
        # BH rejects every hypothesis with p <= the largest p_(i) with p_(i) <= i alpha / m.
        rejected = [f[2] for f, qi in zip(found, q) if np.isfinite(qi) and qi < alpha]
        cutoff = max(rejected) if rejected else -1.0
        for (site, view, p, obs), qi in zip(found, q):
            moved = [o for o in obs if np.isfinite(o["p_holm"]) and o["p_holm"] <= cutoff]
            n_for = sum(o["direction"] == o["expected"] for o in moved)
            rows.append({"finding": number, "site": site, "view": view, "p": p, "q": qi, "verdict": verdict_of(n_for, len(moved) - n_for)})
    return pd.DataFrame(rows, columns=["finding", "site", "view", "p", "q", "verdict"])


def finding5(geometry: pd.DataFrame, replicates: Replicates | None, head: tuple[str, str] = HEAD_VIEW, alpha: float = ALPHA) -> Finding:
    """Finding 5 at the last epoch: the head view against every other site's view of the same kind.

    For each observable and other site s, d_s = theta_head - theta_s with its paired standard error
    (the same images at every site). The head is confirmed highest (for effective rank; lowest for
    anisotropy) when every d_s is significant the right way (intersection-union, no correction);
    refuted when some site is significantly beyond it (Holm across the other sites).
    """
    site, view = head
    last = int(geometry.epoch.max()) if len(geometry) else 0
    at = geometry[(geometry.epoch == last) & (geometry.view == view)]
    table = at.pivot_table(index="site", columns="observable", values="value")
    if "effective_rank" in table:
        table = table[table["effective_rank"] > 0]  # views without variance (pos_embed/cls) left out
    if site not in table.index or len(table) < 2:
        return Finding(5, FINDING5, "inconclusive", f"no {view} view at {site} and another site.", "no test")
    reps = replicates or {}
    column = {name: j for j, name in enumerate(OBSERVABLE_NAMES)}
    head_reps = reps.get((site, view), {}).get(last)
    if head_reps is None:
        return Finding(
            5,
            FINDING5,
            "inconclusive",
            f"At epoch {last} the run has no standard errors, and which site ranks first cannot be told "
            "from noise without them. Train with probe_folds > 1, or re-probe saved weights (probe_size).",
            "no standard errors",
        )
    rows, parts, decisions = [], [], []
    for name, direction in FINDING5_OBSERVABLES.items():
        if name not in table:
            continue
        tests = []
        for other in table.index.drop(site):
            other_reps = reps.get((other, view), {}).get(last)
            if other_reps is None:
                continue
            d = float(table.loc[site, name] - table.loc[other, name])
            se = float(uncertainty.paired_se(other_reps[:, column[name]], head_reps[:, column[name]]))
            p = float(uncertainty.t_test(d, se, len(head_reps)))
            tests.append({"observable": name, "site": other, "difference": d, "se": se, "p": p, "expected": direction})
        if not tests:
            continue
        # Confirmed: every difference significant the expected way (intersection-union: p = max).
        # Refuted: some site significantly beyond the head (Holm across the other sites: p = min).
        p_confirm = max(t["p"] if np.sign(t["difference"]) == direction else 1.0 for t in tests)
        p_refute = float(np.nanmin(holm(np.array([t["p"] if np.sign(t["difference"]) == -direction else 1.0 for t in tests]))))
        decisions.append((name, direction, *((p_confirm, "as expected") if p_confirm <= p_refute else (p_refute, "against"))))
        rows += tests
    # Holm across the finding's observables, as for findings 1-4.
    adjusted = holm(np.array([dec[2] for dec in decisions]))
    calls = [call if p_adj < alpha else "not significant" for (_, _, _, call), p_adj in zip(decisions, adjusted)]
    for (name, direction, _, _), p_adj, call in zip(decisions, adjusted, calls):
        tests = [t for t in rows if t["observable"] == name]
        closest = min(tests, key=lambda t: direction * t["difference"])
        word = "highest" if direction > 0 else "lowest"
        outcome = {"as expected": "confirmed", "against": "refuted"}.get(call, "not shown")
        parts.append(
            f"{name} {_fmt(table.loc[site, name])} at {site}/{view}; nearest other site {closest['site']} "
            f"({_fmt(table.loc[closest['site'], name])}, difference {_fmt(closest['difference'])} +- "
            f"{_fmt(closest['se'])}, p {_fmt(closest['p'])}): {word} {outcome} (Holm p {_fmt(p_adj)})"
        )
    verdict = verdict_of(calls.count("as expected"), calls.count("against"))
    return Finding(5, FINDING5, verdict, f"At epoch {last}: " + "; ".join(parts) + ".", "paired standard errors", rows)


def judge(
    geometry: pd.DataFrame,
    replicates: Replicates | None = None,
    head: tuple[str, str] = HEAD_VIEW,
    alpha: float = ALPHA,
    trends: pd.DataFrame | None = None,
    wide: pd.DataFrame | None = None,
) -> list[Finding]:
    """All five findings for one run (geometry: epoch, site, view, observable, value); `trends` and
    `wide` (the `everywhere` table) when the caller has computed them already."""
    trends = trend_table(geometry, replicates) if trends is None else trends
    return trend_findings(trends, head, alpha, wide) + [finding5(geometry, replicates, head, alpha)]


# --------------------------------------------------------------------------------------------------
# across seeds
# --------------------------------------------------------------------------------------------------


def across_seeds(per_seed: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """One verdict per finding across seeds, by the same rules.

    per_seed: one row per seed, finding, observable with `effect`, the seed's signed effect (the
    first-to-last change for findings 1-4; for finding 5 the head's margin over the nearest other
    site: theta_head - max_s theta_s for effective rank, theta_head - min_s theta_s for anisotropy),
    `expected` (+1 / -1) and `verdict` (the seed's own). Per observable: the mean effect with its t
    interval over seeds and a one-sample t test; Holm across the finding's observables; and the
    one-sided sign test of supporting against contradicting seeds (scipy.stats.binomtest).
    """
    rows = []
    for number, part in per_seed.groupby("finding"):
        obs = []
        for name, g in part.groupby("observable", sort=False):
            e = g.effect.to_numpy(float)
            e = e[np.isfinite(e)]
            n = len(e)
            mean = float(e.mean()) if n else np.nan
            sd = float(e.std(ddof=1)) if n > 1 else np.nan
            half = scipy.stats.t.ppf(1 - alpha / 2, n - 1) * sd / np.sqrt(n) if n > 1 else np.nan
            p = float(scipy.stats.ttest_1samp(e, 0.0).pvalue) if n > 1 and sd > 0 else np.nan
            obs.append(
                {
                    "observable": name,
                    "n": n,
                    "mean": mean,
                    "ci_low": mean - half,
                    "ci_high": mean + half,
                    "p": p,
                    "expected": int(g.expected.iloc[0]),
                }
            )
        adjusted = holm(np.array([o["p"] for o in obs]))
        n_for = sum(bool(pa < alpha and np.sign(o["mean"]) == o["expected"]) for o, pa in zip(obs, adjusted))
        n_against = sum(bool(pa < alpha and np.sign(o["mean"]) == -o["expected"]) for o, pa in zip(obs, adjusted))
        if number in JOINT_FINDINGS and n_for < len(obs):  # supported only when every part is (finding 7)
            n_for = 0
        seeds = part.drop_duplicates("seed")
        sup, con = int((seeds.verdict == "supported").sum()), int((seeds.verdict == "contradicted").sum())
        sign_p = scipy.stats.binomtest(sup, sup + con, 0.5, alternative="greater").pvalue if sup + con else 1.0
        for o, pa in zip(obs, adjusted):
            rows.append(
                {
                    "finding": int(number),
                    **o,
                    "p_holm": pa,
                    "verdict": verdict_of(n_for, n_against),
                    "seeds": len(seeds),
                    "supported": sup,
                    "contradicted": con,
                    "mixed": int((seeds.verdict == "mixed").sum()),
                    "sign_test_p": float(sign_p),
                }
            )
    return pd.DataFrame(rows)


def seed_effects(findings_of_seed: list[Finding]) -> list[dict]:
    """The per-seed effects `across_seeds` combines, from one seed's findings."""
    rows = []
    for f in findings_of_seed:
        if f.number in TREND_FINDINGS:
            for r in f.tests:
                rows.append(
                    {
                        "finding": f.number,
                        "observable": r["observable"],
                        "effect": r["change"],
                        "expected": r["expected"],
                        "verdict": f.verdict,
                    }
                )
        elif f.number == 6:  # the last block's CKA minus the first's
            rows += [
                {"finding": 6, "observable": r["observable"], "effect": r["change"], "expected": -1, "verdict": f.verdict}
                for r in f.tests
                if r["observable"] == "last_minus_first_block"
            ]
        elif f.number == 7:  # the rise and the bend
            rows += [
                {"finding": 7, "observable": r["observable"], "effect": r["value"], "expected": 1, "verdict": f.verdict}
                for r in f.tests
                if r["observable"] in ("rise", "bend")
            ]
        elif f.number == 8:  # the change plus the margin: positive when the fall is smaller than the margin
            rows += [
                {
                    "finding": 8,
                    "observable": "token_cosine_change_plus_margin",
                    "effect": r["value"] + TOKEN_MARGIN,
                    "expected": 1,
                    "verdict": f.verdict,
                }
                for r in f.tests
                if r["observable"] == "token_cosine_change"
            ]
        elif f.number == 5:
            for name, direction in FINDING5_OBSERVABLES.items():
                tests = [t for t in f.tests if t["observable"] == name]
                if tests:
                    margin = min(direction * t["difference"] for t in tests) * direction
                    rows.append({"finding": 5, "observable": name, "effect": margin, "expected": direction, "verdict": f.verdict})
        if not any(r["finding"] == f.number for r in rows):
            rows.append({"finding": f.number, "observable": "", "effect": np.nan, "expected": 1, "verdict": f.verdict})
    return rows


# --------------------------------------------------------------------------------------------------
# TGO-II
# --------------------------------------------------------------------------------------------------

FINDING6 = "Later layers specialise more: the deeper a block, the further training moves its representation from where it started"
FINDING7 = "Intrinsic dimension rises, then settles"
FINDING8 = "Token interaction stays strong: the deepest block's patch tokens stay as alike as at initialisation"
TOKEN_MARGIN = 0.05  # finding 8: a fall of mean token cosine by less than this counts as staying
JOINT_FINDINGS = {7}  # across seeds, supported only when every observable moved as expected (rise and bend)
METHOD_TGO2 = (
    "Standard errors come from the same delete-one-fold jackknife as TGO-I's (the probe's K folds; "
    "CKA and TwoNN recomputed without each fold), paired wherever two numbers share the probe's images, "
    "and every test is Student t with K - 1 degrees of freedom at level {alpha}. Finding 6: each block's "
    "debiased linear CKA (mean-pooled tokens) between the first and last kept epoch, tested for a fall "
    "with depth by the change from the first to the last block and Mann-Kendall over the blocks; both "
    "must agree, as for findings 1-4 over epochs. Finding 7: TwoNN intrinsic dimension of the view that "
    "feeds the head at the first, middle and last kept epoch; supported when the rise to the middle epoch "
    "and the bend (that rise minus the later change) are both significantly positive, contradicted when "
    "the dimension fell or kept rising faster (Holm). Finding 8: the deepest block's mean cosine between "
    "distinct patch tokens from the first to the last epoch, by a non-inferiority test with margin "
    "{margin}: supported when a fall smaller than the margin is shown, contradicted when a larger one is. "
    "On noise each verdict decides at most {alpha:.0%} of the time (tests/test_findings_tgo2.py)."
)


def _one_test(d: float, reps: np.ndarray | None) -> tuple[float, float]:
    """(se, two-sided p) of a statistic d whose leave-one-fold-out replicates are reps (K,)."""
    if reps is None or len(reps) < 2 or not np.all(np.isfinite(reps)):
        return np.nan, np.nan
    se = float(uncertainty.jackknife_se(reps))
    return se, float(uncertainty.t_test(d, se, len(reps)))


def _baseline(first_epoch: int) -> str:
    """What the evidence says when the first epoch measured is not the initialisation (a run resumed
    from before tgo kept these, or a feature_epochs list without 0)."""
    return "" if first_epoch == 0 else f" The first epoch measured is {first_epoch}, not the initialisation (epoch 0)."


def finding6(
    blocks: list[str], values: np.ndarray, replicates: np.ndarray | None, alpha: float = ALPHA, epochs: tuple[int, int] = (0, 0)
) -> Finding:
    """Finding 6 from each block's debiased CKA between its first and last kept epoch (values, in
    depth order; replicates (B, K)): expected to fall with depth.

    Two tests, as for findings 1-4 over epochs, here over depth: the change from the first to the
    last block (its paired jackknife standard error: the same images at every block; Student t,
    K - 1 degrees of freedom) and Mann-Kendall over the blocks (from 5 blocks on); both must reject
    the same way (`combine`)."""
    values = np.asarray(values, float)
    if len(values) < 2:
        return Finding(
            6, FINDING6, "inconclusive", f"needs two kept epochs and two blocks; have {len(values)} block(s) measured.", "no test"
        )
    if not np.all(np.isfinite(values)):
        missing = [b for b, v in zip(blocks, values) if not np.isfinite(v)]
        return Finding(
            6,
            FINDING6,
            "inconclusive",
            f"the CKA between epochs {epochs[0]} and {epochs[1]} could not be measured at "
            f"{', '.join(missing)} (features without variance).",
            "no test",
        )
    row = change_test(values[0], values[-1], *((replicates[0], replicates[-1]) if replicates is not None else (None, None)))
    d, se, p_change = row["change"], row["change_se"], row["change_p"]
    row["n_epochs"] = len(values)
    row.update(trend_test(np.arange(len(values)), values))
    p, direction, method = combine(row)
    method = method.replace("epochs", "blocks")
    call = "not significant" if not (np.isfinite(p) and p < alpha) else ("as expected" if direction < 0 else "against")
    verdict = verdict_of(call == "as expected", call == "against")
    listing = ", ".join(f"{b} {_fmt(v)}" for b, v in zip(blocks, values))
    trend = f"; Kendall tau over depth {_fmt(row['kendall_tau'])} (p {_fmt(row['trend_p'])})" if np.isfinite(row["kendall_tau"]) else ""
    evidence = (
        f"Debiased CKA of each block with itself from epoch {epochs[0]} to epoch {epochs[1]} (the first and last kept): "
        f"{listing}. Last minus first block {_fmt(d)} +- {_fmt(se)} (p {_fmt(p_change)}){trend}: {call}.{_baseline(epochs[0])}"
    )
    tests = [{"observable": "cka_first_last", "site": b, "value": float(v)} for b, v in zip(blocks, values)]
    tests.append({"observable": "last_minus_first_block", **row, "p": p, "call": call, "expected": -1})
    return Finding(6, FINDING6, verdict, evidence, method, tests)


def finding7(epochs: list[int], values: np.ndarray, replicates: np.ndarray | None, where: str, alpha: float = ALPHA) -> Finding:
    """Finding 7 from the intrinsic dimension at the kept epochs (values; replicates (E, K)).

    With first, middle (the middle kept epoch, fixed by the schedule, not by the data) and last
    epochs: the rise r = ID_mid - ID_first and the bend b = r - (ID_last - ID_mid), each against its
    jackknife standard error (the replicates of the same combination; the same images at every
    epoch). Supported: r > 0 and b > 0, both significant (it rose, and rose less, or fell, after
    the middle: intersection-union, level alpha). Contradicted: r < 0 significant (it fell) or
    b < 0 significant (it kept rising faster), Holm across the two. Else inconclusive."""
    values = np.asarray(values, float)
    if len(values) < 3:
        return Finding(7, FINDING7, "inconclusive", f"needs three kept epochs at {where}; has {len(values)}.", "no test")
    i, j, k = 0, len(values) // 2, len(values) - 1
    weights_r, weights_b = np.zeros(len(values)), np.zeros(len(values))
    weights_r[[i, j]] = [-1, 1]
    weights_b[[i, j, k]] = [-1, 2, -1]
    r, b = float(weights_r @ values), float(weights_b @ values)
    se_r, p_r = _one_test(r, None if replicates is None else weights_r @ replicates)
    se_b, p_b = _one_test(b, None if replicates is None else weights_b @ replicates)
    e0, e1, e2 = epochs[i], epochs[j], epochs[k]
    evidence = (
        f"At {where}{' (from epoch ' + str(e0) + ', not the initialisation)' if e0 != 0 else ''}: intrinsic dimension {_fmt(values[i])} at epoch {e0}, {_fmt(values[j])} at epoch {e1}, "
        f"{_fmt(values[k])} at epoch {e2}; rise to the middle epoch {_fmt(r)} +- {_fmt(se_r)} (p {_fmt(p_r)}), "
        f"bend (rise minus later change) {_fmt(b)} +- {_fmt(se_b)} (p {_fmt(p_b)})."
    )
    tests = [
        {"observable": "rise", "value": r, "se": se_r, "p": p_r, "expected": 1},
        {"observable": "bend", "value": b, "se": se_b, "p": p_b, "expected": 1},
    ]
    if not np.all(np.isfinite(values[[i, j, k]])):
        return Finding(
            7,
            FINDING7,
            "inconclusive",
            evidence + " The intrinsic dimension could not be measured at every one of "
            "these epochs (features without variance, or fewer than 3 distinct images).",
            "no test",
            tests,
        )
    if replicates is None:
        return Finding(
            7,
            FINDING7,
            "inconclusive",
            evidence + " No standard errors (features kept without folds, or probe_folds=1).",
            "no standard errors",
            tests,
        )
    if not (np.isfinite(p_r) and np.isfinite(p_b)):
        return Finding(
            7,
            FINDING7,
            "inconclusive",
            evidence + " Some leave-one-fold-out estimates could not be measured (too few images per fold for TwoNN): no standard errors.",
            "no standard errors",
            tests,
        )
    verdict: Verdict
    if r > 0 and b > 0 and max(p_r, p_b) < alpha:
        verdict = "supported"
    else:
        against = holm(np.array([p_r if r < 0 else 1.0, p_b if b < 0 else 1.0]))
        verdict = "contradicted" if np.nanmin(against) < alpha else "inconclusive"
    return Finding(7, FINDING7, verdict, evidence, "paired standard errors (first, middle, last kept epoch)", tests)


def finding8(
    site: str,
    epochs: tuple[int, int],
    values: tuple[float, float],
    replicates: tuple[np.ndarray | None, np.ndarray | None],
    margin: float = TOKEN_MARGIN,
    alpha: float = ALPHA,
) -> Finding:
    """Finding 8 from the deepest block's token interaction (mean cosine of distinct patch tokens)
    at the first and last probed epoch, with their replicates.

    A non-inferiority test (a claim of "no fall" needs one; an insignificant change would only be
    absence of evidence): with d = last - first and its paired jackknife standard error, supported
    when d > -margin is shown (one-sided Student t of (d + margin) / se, K - 1 degrees of freedom,
    p < alpha), contradicted when d < -margin is shown the same way, else inconclusive. On a
    network whose token cosine fell by exactly the margin, supported comes out at most alpha of the
    time (tests/test_findings_tgo2.py)."""
    first, last = values
    d = float(last - first)
    rf, rl = replicates
    evidence = f"At {site}: mean cosine of distinct patch tokens {_fmt(first)} at epoch {epochs[0]}, {_fmt(last)} at epoch {epochs[1]} (change {_fmt(d)}"
    if rf is None or rl is None or len(rf) != len(rl) or len(rf) < 2:
        return Finding(
            8,
            FINDING8,
            "inconclusive",
            evidence + "); no standard errors (probe_folds=1, or a run from before tgo kept them).",
            "no standard errors",
            [{"observable": "token_cosine_change", "value": d}],
        )
    se = float(uncertainty.paired_se(rf, rl))
    k = len(rf)
    t = (d + margin) / se if se > 0 else np.sign(d + margin) * np.inf
    p_stays, p_falls = float(scipy.stats.t.sf(t, k - 1)), float(scipy.stats.t.cdf(t, k - 1))
    verdict: Verdict = "supported" if p_stays < alpha else ("contradicted" if p_falls < alpha else "inconclusive")
    evidence += (
        f" +- {_fmt(se)}); margin {margin}: a fall smaller than the margin shown with p {_fmt(p_stays)}, "
        f"a larger fall with p {_fmt(p_falls)}.{_baseline(epochs[0])}"
    )
    tests = [{"observable": "token_cosine_change", "value": d, "se": se, "margin": margin, "p_stays": p_stays, "p_falls": p_falls}]
    return Finding(8, FINDING8, verdict, evidence, "non-inferiority, paired standard errors", tests)
