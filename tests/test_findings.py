"""TGO-I verdicts: false-positive rate on noise, power on clear trends, the multiple-comparison
procedures against independent computations, finding 5, runs without standard errors, seeds."""

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from tgo import findings as F
from tgo import spectral, uncertainty
from tgo.accumulate import MomentAccumulator

K = uncertainty.DEFAULT_FOLDS
SITES = ("block_00", "block_01", "final")


def _measure(X: np.ndarray, folds: np.ndarray, with_se: bool = True) -> tuple[dict, np.ndarray | None]:
    """Observables and jackknife replicates of X through the streaming accumulator (the probe's path)."""
    order = np.argsort(folds, kind="stable")
    acc = MomentAccumulator(X.shape[1], folds=K if with_se else 1)
    acc.update(torch.from_numpy(X[order]), np.bincount(folds, minlength=K + 1).tolist() if with_se else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spectral.DegenerateGeometryWarning)
        est = spectral.observables_from_spectra(acc.spectra())
        reps = [spectral.observables_from_spectra(s) for s in acc.jackknife_spectra()]
    return est, (np.array([[r[n] for n in spectral.OBSERVABLE_NAMES] for r in reps]) if with_se else None)


def _history(rng, decay, epochs=8, n=100, d=16, jitter=0.5, with_se=True, site_step=0.3, sites=SITES):
    """A run's geometry at several sites (cls view) over `epochs`: the same n images every epoch
    (Z), each site a rotated spectrum lambda_i = i^-a with a = decay(epoch) + site_step per site
    below final, plus fresh noise per epoch and site (jitter). decay constant and site_step 0:
    pure noise around constants, every site alike."""
    Z = rng.normal(size=(n, d))
    rot = {s: scipy.stats.ortho_group.rvs(d, random_state=rng) for s in sites}
    folds = uncertainty.fold_ids(n, K, seed=0)
    rows, replicates = [], {}
    for e in range(epochs):
        for j, site in enumerate(sites):
            a = decay(e) + site_step * (len(sites) - 1 - j)
            X = (Z + jitter * rng.normal(size=(n, d))) * np.arange(1, d + 1) ** (-a / 2) @ rot[site]
            est, reps = _measure(X, folds, with_se)
            rows += [(e, site, "cls", name, value) for name, value in est.items()]
            if with_se:
                replicates.setdefault((site, "cls"), {})[e] = reps
    geometry = pd.DataFrame(rows, columns=["epoch", "site", "view", "observable", "value"])
    return geometry, (replicates if with_se else None)


def test_holm_and_benjamini_hochberg_against_hand_computations():
    p = np.array([0.01, 0.04, 0.03, 0.2])
    # Holm by hand: sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1 -> 0.04, 0.09, 0.08, 0.2, then
    # running maximum -> 0.04, 0.09, 0.09, 0.2, back in the original order.
    np.testing.assert_allclose(F.holm(p), [0.04, 0.09, 0.09, 0.2])
    np.testing.assert_allclose(F.holm(np.array([0.5, np.nan])), [0.5, np.nan])
    # BH by hand: p_(i) m / i = 0.04, 0.06, 0.0533, 0.2, then running minimum from the top.
    np.testing.assert_allclose(F.benjamini_hochberg(p), [0.04, 0.05333333, 0.05333333, 0.2])


def test_trend_test_is_mann_kendall_with_sens_slope():
    x, y = np.arange(7), np.array([1.0, 2, 1.5, 3, 4, 3.5, 5])
    out = F.trend_test(x, y)
    # Mann-Kendall S by hand: concordant minus discordant pairs; tau = S / (n(n-1)/2).
    s = sum(np.sign(y[j] - y[i]) for i in range(7) for j in range(i + 1, 7))
    assert out["kendall_tau"] == pytest.approx(s / 21)
    slopes = [(y[j] - y[i]) / (j - i) for i in range(7) for j in range(i + 1, 7)]
    assert out["sen_slope"] == pytest.approx(np.median(slopes))
    assert np.isnan(F.trend_test(np.arange(4), np.ones(4))["kendall_tau"])


@pytest.mark.slow
def test_on_200_noise_histories_at_most_5_percent_of_verdicts_decide():
    rng = np.random.default_rng(0)
    decided, total = 0, 0
    per_finding = {n: 0 for n in range(1, 6)}
    for _ in range(200):
        geometry, replicates = _history(rng, decay=lambda e: 1.0, epochs=6, site_step=0.0, sites=("block_00", "final"))
        for f in F.judge(geometry, replicates):
            total += 1
            if f.verdict in ("supported", "contradicted"):
                decided += 1
                per_finding[f.number] += 1
    share = decided / total
    mc = 2 * np.sqrt(0.05 * 0.95 / total)  # two Monte Carlo standard errors at 5%
    assert share <= 0.05 + mc, (share, per_finding)
    # Nor may any one finding decide on much more than 5% of the histories.
    assert all(k <= 200 * (0.05 + 2 * np.sqrt(0.05 * 0.95 / 200)) for k in per_finding.values()), per_finding


@pytest.mark.slow
def test_noise_histories_without_standard_errors_decide_by_trend_at_most_5_percent():
    rng = np.random.default_rng(1)
    decided = total = 0
    for _ in range(200):
        geometry, _ = _history(rng, decay=lambda e: 1.0, epochs=11, with_se=False, site_step=0.0)
        found = F.judge(geometry, None)
        assert found[4].verdict == "inconclusive" and "standard errors" in found[4].evidence
        for f in found[:4]:
            assert f.method == "trend only (no standard errors)"
            total += 1
            decided += f.verdict in ("supported", "contradicted")
    assert decided / total <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / total), decided / total


def test_clear_trends_are_found_in_both_directions_and_mixed_ones_called_mixed():
    rng = np.random.default_rng(2)
    spreading = lambda e: 2.0 - 0.2 * e  # noqa: E731 - the spectrum flattens: variance spreads out
    geometry, replicates = _history(rng, decay=spreading)
    found = F.judge(geometry, replicates)
    assert {f.number: f.verdict for f in found} == {1: "supported", 2: "supported", 3: "supported", 4: "supported", 5: "supported"}
    assert "effective_rank" in found[0].evidence and "->" in found[0].evidence and "+-" in found[0].evidence
    assert found[0].method == "change and trend"
    wide = F.everywhere(F.trend_table(geometry, replicates))
    assert (wide[wide.finding == 1].verdict == "supported").all()
    # The same run backwards: variance concentrates, findings 1-4 are contradicted.
    backwards = geometry.assign(epoch=7 - geometry.epoch)
    reversed_reps = {k: {7 - e: r for e, r in v.items()} for k, v in replicates.items()}
    verdicts = {f.number: f.verdict for f in F.judge(backwards, reversed_reps)}
    assert all(verdicts[k] == "contradicted" for k in (1, 2, 3, 4))
    # Participation ratio made to fall at final/cls while effective rank rises: mixed.
    mixed = geometry.copy()
    pr = (mixed.observable == "participation_ratio") & (mixed.site == "final")
    mixed.loc[pr, "value"] = mixed.loc[pr, "value"].to_numpy()[::-1]
    mixed_reps = {k: dict(v) for k, v in replicates.items()}
    j = spectral.OBSERVABLE_NAMES.index("participation_ratio")
    for e in range(8):
        mixed_reps[("final", "cls")][e] = replicates[("final", "cls")][e].copy()
        mixed_reps[("final", "cls")][e][:, j] = replicates[("final", "cls")][7 - e][:, j]
    assert F.judge(mixed, mixed_reps)[0].verdict == "mixed"
    one_epoch = geometry[geometry.epoch == 0]
    assert F.judge(one_epoch, replicates)[0].verdict == "inconclusive"


def test_short_runs_use_the_change_test_and_runs_without_errors_the_trend_test():
    rng = np.random.default_rng(3)
    geometry, replicates = _history(rng, decay=lambda e: 2.0 - 0.5 * e, epochs=3)
    found = F.judge(geometry, replicates)
    assert found[0].method == "change only (fewer than 5 epochs)" and found[0].verdict == "supported"
    geometry, _ = _history(rng, decay=lambda e: 2.0 - 0.2 * e, epochs=8, with_se=False)
    found = F.judge(geometry, None)
    assert found[0].method == "trend only (no standard errors)" and found[0].verdict == "supported"
    assert found[4].verdict == "inconclusive"


def test_finding_5_uses_paired_errors_across_sites():
    rng = np.random.default_rng(4)
    geometry, replicates = _history(rng, decay=lambda e: 1.0)  # final flattest by 0.3 in the exponent
    f5 = F.finding5(geometry, replicates)
    assert f5.verdict == "supported" and {t["site"] for t in f5.tests} == {"block_00", "block_01"}
    # Each difference's standard error is the jackknife of the replicate differences (by hand).
    t = next(t for t in f5.tests if t["site"] == "block_01" and t["observable"] == "effective_rank")
    j = spectral.OBSERVABLE_NAMES.index("effective_rank")
    diff = replicates[("final", "cls")][7][:, j] - replicates[("block_01", "cls")][7][:, j]
    assert t["se"] == pytest.approx(np.sqrt((K - 1) / K * np.sum((diff - diff.mean()) ** 2)))
    # Sites that are the same geometry up to noise: nothing can be said.
    same, same_reps = _history(np.random.default_rng(5), decay=lambda e: 1.0)
    flat = same.copy()
    for site in SITES:  # all sites given the final site's values and replicates
        flat.loc[flat.site == site, "value"] = same.loc[same.site == "final", "value"].to_numpy()
    assert F.finding5(flat, {(s, "cls"): same_reps[("final", "cls")] for s in SITES}).verdict == "inconclusive"


def test_across_seeds_one_verdict_by_the_same_rules():
    rng = np.random.default_rng(6)
    per_seed = {}
    for seed in range(4):
        geometry, replicates = _history(rng, decay=lambda e: 2.0 - 0.2 * e)
        per_seed[seed] = F.judge(geometry, replicates)
    rows = [dict(r, seed=s) for s, found in per_seed.items() for r in F.seed_effects(found)]
    table = F.across_seeds(pd.DataFrame(rows))
    by = table.drop_duplicates("finding").set_index("finding")
    assert (by.verdict == "supported").all() and (by.supported == 4).all()
    er = table[(table.finding == 1) & (table.observable == "effective_rank")].iloc[0]
    changes = [r["effect"] for r in rows if r["finding"] == 1 and r["observable"] == "effective_rank"]
    assert er["mean"] == pytest.approx(np.mean(changes))
    half = scipy.stats.t.ppf(0.975, 3) * np.std(changes, ddof=1) / 2
    assert (er.ci_low, er.ci_high) == pytest.approx((np.mean(changes) - half, np.mean(changes) + half))
    assert er.p == pytest.approx(scipy.stats.ttest_1samp(changes, 0).pvalue)
    assert by.loc[1, "sign_test_p"] == pytest.approx(scipy.stats.binomtest(4, 4, 0.5, alternative="greater").pvalue)
