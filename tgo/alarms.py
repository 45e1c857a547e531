"""Alarms on a run's geometry while it trains: rules small enough for one parameter, each breach
tested against the observable's jackknife standard error (pure functions and one small state; no
torch, no MLflow).

    rules = parse("collapse: final/cls/effective_rank < 0.25*init; */cls/rankme < 5 for 2")
    watch = Alarms(rules, action="stop")
    for epoch in ...:
        found = watch.observe(epoch, observations)   # {(site, view, observable): Observation}
        found.metrics["alarm/collapse"], found.fired, found.stop

Rules, separated by ";" (`parse`):

    [name:] <site>/<view>/<observable> (< | >) <threshold> [for N]
    [name:] head/<observable> ...                      the view that feeds the head (final/cls or final/mean)

Site and view are globs (`fnmatch`: `*`, `?`, `[...]`), the observable one of
`tgo.spectral.OBSERVABLE_NAMES`. The threshold is a number (absolute), `c*init` (c times the
observable's value at the first probed epoch, epoch 0 for a tgo run) or `c*best` (c times its best
value so far: the highest for a `<` rule, the lowest for a `>` rule); `for N` asks for N probed
epochs in a row. `default` is `DEFAULT_ALARMS`, `none` (or nothing) no alarm.

The test. At a probed epoch, a rule's breach at one site/view is the margin
    D = threshold - x   (rule `x < threshold`;  x - threshold for `x > threshold`)
over its standard error  se_D = sqrt(se_x^2 + c^2 se_ref^2),  with se_ref the reference epoch's
error for `init` and `best` (0 for a number). Both come from the jackknife over the same K probe
folds; their covariance, positive for the same images, is left out, which overstates se_D and errs
on the side of silence. The breach is significant when the one-sided p = P(T_{K-1} > D / se_D) is at
most the level the rule has at that test:

    level_k = alpha / (k (k + 1) m n)

k: the rule's k-th tested epoch; sum_k 1 / (k (k + 1)) = 1, so over a run of any length (a
training, or `tgo probe --follow` that does not know when it ends) the rule's false alarms stay
at most alpha (a Bonferroni bound that holds however the epochs are correlated). m: the
site/views the rule's globs match (Bonferroni across them). n: for `best`, the earlier epochs the
best was chosen from (the highest of n noisy values is biased upwards; the test against it is one of
n tests, so each gets alpha / n). The rule is in alarm at an epoch when some site/view has had N
significant breaches in a row, and fires at the first such epoch. So on noise around a constant
that sits exactly at the threshold a run's false-alarm rate per rule is at most alpha = 0.05
(tests/test_alarms.py measures it), while a collapse of many standard errors fires at once.

Without standard errors (a probe with one fold, K = 1) a breach is the point value beyond the
threshold, and `Alarms.uses_errors` says so for the run's messages.

The rule text is parsed here (ConfigError for what does not parse or names an unknown observable,
view or site), so a config is refused before any work; `check_sites` then holds the site globs to
the model's own sites once it is built.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from difflib import get_close_matches
from typing import Any, Literal

import scipy.stats

from tgo.errors import ConfigError
from tgo.keys import HEAD_VIEW, VIEWS, site_names
from tgo.spectral import OBSERVABLE_NAMES

__all__ = [
    "ALARM_PREFIX",
    "ALPHA",
    "DEFAULT_ALARMS",
    "Alarms",
    "EpochAlarms",
    "Firing",
    "Observation",
    "Rule",
    "alarm_key",
    "alarm_rules_line",
    "check_sites",
    "parse",
    "rule_level",
]

ALPHA = 0.05  # each rule's false-alarm rate over a whole run
ALARM_PREFIX = "alarm"
Action = Literal["warn", "stop"]
ACTIONS: tuple[str, ...] = ("warn", "stop")
# Dimensional collapse of the representation that feeds the head: its effective rank below a quarter
# of its value at initialisation, or below a quarter of the highest it reached for two probed epochs
# in a row (a collapse after growth).
DEFAULT_ALARMS = "head_collapse: head/effective_rank < 0.25*init; head_rank_lost: head/effective_rank < 0.25*best for 2"
HEAD = "head"  # the rule target's word for the view that feeds the head
_GLOB = re.compile(r"[*?\[]")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_RULE = re.compile(
    r"""\s*(?:(?P<name>[^:]+?)\s*:\s*)?
        (?P<target>[^\s<>=]+)\s*
        (?P<op><=|>=|<|>|=)\s*
        (?P<threshold>[^\s]+?(?:\s*\*\s*[A-Za-z]+)?)
        (?:\s+for\s+(?P<n>\S+))?\s*$""",
    re.VERBOSE,
)
_THRESHOLD = re.compile(r"(?P<c>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)?\s*(?:\*\s*)?(?P<ref>init|best)?")
EXAMPLE = "collapse: final/cls/effective_rank < 0.25*init for 2"
SYNTAX = "[name:] <site>/<view>/<observable> (< or >) <number | c*init | c*best> [for N], rules separated by ';'"


def alarm_key(name: str) -> str:
    """alarm/<name>: 1 at a probed epoch where the rule is in alarm, else 0."""
    return f"{ALARM_PREFIX}/{name}"


@dataclass(frozen=True)
class Rule:
    """One alarm rule (`parse`).

    Attributes:
        name: the alarm's name (its metric alarm/<name>).
        text: the rule as written (without its name).
        site, view: globs over the sites and views; site "head" (view "") means the head view.
        observable: one of spectral.OBSERVABLE_NAMES.
        op: "<" (alarm when the observable falls below the threshold) or ">" (rises above it).
        factor: the threshold (reference "value") or the factor of the reference.
        reference: "value" (an absolute threshold), "init" (the first probed epoch) or "best".
        persistence: probed epochs in a row (for N).
    """

    name: str
    text: str
    site: str
    view: str
    observable: str
    op: Literal["<", ">"]
    factor: float
    reference: Literal["value", "init", "best"]
    persistence: int = 1

    def matches(self, site: str, view: str, head: tuple[str, str]) -> bool:
        if self.site == HEAD:
            return (site, view) == head
        return fnmatch.fnmatchcase(site, self.site) and fnmatch.fnmatchcase(view, self.view)

    def threshold_text(self) -> str:
        if self.reference == "value":
            return f"{self.factor:g}"
        return f"{self.factor:g} x {self.reference}"


def _fail(piece: str, why: str) -> ConfigError:
    return ConfigError(f"alarms: cannot read the rule {piece.strip()!r}: {why}. A rule reads {SYNTAX}; e.g. {EXAMPLE!r}.")


def _auto_name(target: str, op: str, threshold: str) -> str:
    """A metric-safe name for a rule without one: final/cls/effective_rank < 0.25*init ->
    final.cls.effective_rank.below.0.25init (MLflow keys allow letters, digits, _ - . / and space)."""
    where = target.replace("/", ".").replace("*", "any").replace("?", "any")
    where = re.sub(r"[^A-Za-z0-9_.-]", "", where)
    limit = re.sub(r"[^A-Za-z0-9_.-]", "", threshold.replace("*", ""))
    return f"{where}.{'below' if op == '<' else 'above'}.{limit}"


def _parse_one(piece: str) -> Rule:
    match = _RULE.fullmatch(piece)
    if match is None:
        raise _fail(piece, "it is not <target> < or > <threshold>")
    name, target, op, threshold, n = match["name"], match["target"], match["op"], match["threshold"], match["n"]
    if op not in ("<", ">"):
        raise _fail(piece, f"use < or > (a test of significance has no {op!r})")
    parts = target.split("/")
    if len(parts) == 2 and parts[0] == HEAD:
        site, view, observable = HEAD, "", parts[1]
    elif len(parts) == 3:
        site, view, observable = parts
    else:
        raise _fail(piece, f"the target {target!r} is not <site>/<view>/<observable> or head/<observable>")
    if observable not in OBSERVABLE_NAMES:
        close = get_close_matches(observable, OBSERVABLE_NAMES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise _fail(piece, f"unknown observable {observable!r}; {hint}the observables are {', '.join(OBSERVABLE_NAMES)}")
    if site != HEAD:
        if not any(fnmatch.fnmatchcase(v, view) for v in VIEWS):
            raise _fail(piece, f"the view {view!r} matches none of {', '.join(VIEWS)}")
        if not any(fnmatch.fnmatchcase(s, site) for s in site_names(1000)):
            raise _fail(piece, f"the site {site!r} matches no site (patch_embed, pos_embed, block_00, block_01, ..., final)")
    t = _THRESHOLD.fullmatch(threshold)
    if t is None or (t["c"] is None and t["ref"] is None):
        raise _fail(piece, f"the threshold {threshold!r} is not a number, c*init or c*best")
    factor = float(t["c"]) if t["c"] is not None else 1.0
    if not math.isfinite(factor):
        raise _fail(piece, f"the threshold {threshold!r} is not finite")
    persistence = 1
    if n is not None:
        if not n.isdigit() or int(n) < 1:
            raise _fail(piece, f"'for {n}' needs a whole number of probed epochs >= 1")
        persistence = int(n)
    if name is not None:
        name = name.strip()
        if not _NAME.fullmatch(name):
            raise _fail(piece, f"the name {name!r} must start with a letter and hold only letters, digits, _ . -")
    text = f"{target} {op} {threshold.replace(' ', '')}" + (f" for {persistence}" if n is not None else "")
    return Rule(
        name=name or _auto_name(target, op, threshold),
        text=text,
        site=site,
        view=view,
        observable=observable,
        op=op,  # type: ignore[arg-type]
        factor=factor,
        reference=t["ref"] or "value",  # type: ignore[arg-type]
        persistence=persistence,
    )


def parse(text: str) -> list[Rule]:
    """The rules of an `alarms` setting ("" and "none": none; "default": DEFAULT_ALARMS, which may be
    combined with others: "default; final/cls/rankme < 5"). Raises ConfigError naming the rule that
    does not parse and why."""
    rules: list[Rule] = []
    for piece in re.split(r"[;\n]", text or ""):
        if not piece.strip() or piece.strip().lower() == "none":
            continue
        if piece.strip().lower() == "default":
            rules.extend(parse(DEFAULT_ALARMS))
            continue
        rules.append(_parse_one(piece))
    names = [r.name for r in rules]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"alarms: the name(s) {', '.join(twice)} are given to more than one rule; name each rule once (name: rule).")
    return rules


def check_sites(rules: Sequence[Rule], sites: Iterable[str], head: tuple[str, str] = HEAD_VIEW) -> None:
    """Refuse a rule whose site glob matches none of the model's own `sites` (ConfigError), once the
    model is built and before any work."""
    sites = list(sites)
    for rule in rules:
        if rule.site != HEAD and not any(fnmatch.fnmatchcase(s, rule.site) for s in sites):
            raise ConfigError(
                f"alarms: the rule {rule.name!r} ({rule.text}) names the site {rule.site!r}, which this model does not have; "
                f"its sites are {', '.join(sites)}."
            )


def alarm_rules_line(text: str, action: str, folds: int, probe_every: int = 1) -> str:
    """The line a run starts with: what its alarms watch, how they test and what they do."""
    rules = parse(text)
    if not rules:
        return "alarms: none."
    if not probe_every:
        return "alarms: none tested (probe_every=0, no geometry is measured)."
    how = (
        f"each breach tested against its standard error, false-alarm rate <= {ALPHA:g} per rule over the run"
        if folds >= 2
        else "no standard errors (probe_folds=1): the alarms compare point values"
    )
    listed = "; ".join(f"{r.name}: {r.text}" for r in rules)
    return f"alarms ({action} when one fires; {how}): {listed}."


def rule_level(k: int, m: int = 1, n: int = 1, alpha: float = ALPHA) -> float:
    """The level of a rule's k-th test (k >= 1) at each of its m site/views, against a best chosen
    among n epochs: alpha / (k (k + 1) m n). Summed over k it is alpha / (m n)."""
    return alpha / (k * (k + 1) * max(m, 1) * max(n, 1))


# --------------------------------------------------------------------------------------------------
# the state over a run
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """One observable at one site/view and epoch: its value, jackknife standard error and the folds
    K it came from (K = 1, or a NaN se: no error)."""

    value: float
    se: float
    folds: int
    epoch: int = -1


@dataclass
class Firing:
    """A rule in alarm at one epoch, at the site/view whose breach is most significant."""

    alarm: str
    rule: str
    epoch: int
    where: str  # "final/cls/effective_rank"
    value: float
    se: float
    threshold: float
    threshold_se: float
    p: float  # NaN for a point comparison
    level: float

    def line(self) -> str:
        """What happened, with the numbers: the log line of a firing."""
        err = f" +- {self.se:.3g}" if math.isfinite(self.se) else ""
        terr = f" +- {self.threshold_se:.3g}" if math.isfinite(self.threshold_se) and self.threshold_se > 0 else ""
        test = f"one-sided p {self.p:.2g} <= level {self.level:.2g}" if math.isfinite(self.p) else "point values (no standard errors)"
        return (
            f"alarm {self.alarm} at epoch {self.epoch}: {self.where} {self.value:.4g}{err} {'<' if ' < ' in self.rule else '>'} "
            f"{self.threshold:.4g}{terr} ({self.rule}; {test})"
        )


@dataclass
class EpochAlarms:
    """What the rules found at one probed epoch.

    Attributes:
        metrics: alarm/<name> -> 1.0 (in alarm) or 0.0, one per rule.
        active: the rules in alarm at this epoch.
        fired: the rules that fired for the first time at this epoch.
        stop: the action is "stop" and some rule fired.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    active: list[Firing] = field(default_factory=list)
    fired: list[Firing] = field(default_factory=list)
    stop: bool = False


def _key(site: str, view: str, observable: str) -> str:
    return f"{site}/{view}/{observable}"


def _breach(rule: Rule, x: Observation, threshold: float, threshold_se: float, level: float) -> tuple[bool, float]:
    """(significant, p) of x beyond the threshold; p is NaN for a point comparison (no errors)."""
    margin = threshold - x.value if rule.op == "<" else x.value - threshold
    if x.folds < 2:
        return margin > 0, float("nan")
    se = math.sqrt(x.se**2 + threshold_se**2)
    if not (math.isfinite(se) and math.isfinite(margin)):
        return False, float("nan")
    if se == 0:
        return margin > 0, 0.0 if margin > 0 else 1.0
    p = float(scipy.stats.t.sf(margin / se, x.folds - 1))
    return p <= level, p


class Alarms:
    """The rules of one run and what they have seen: the first probed epoch's observations (init),
    each observable's highest and lowest so far (best), each rule's tests so far, its streaks and
    its first firing. `state()` / `from_state` carry it in a checkpoint, so a resumed run goes on
    where it stopped (its past firings do not stop it again).

    Args:
        rules: from `parse`.
        action: "warn" (log, metric, tag) or "stop" (also end the run after its checkpoint).
        head: the view that feeds the head (for head/... rules).
        alpha: each rule's false-alarm rate over the run.
    """

    def __init__(self, rules: Sequence[Rule], action: Action = "warn", head: tuple[str, str] = HEAD_VIEW, alpha: float = ALPHA) -> None:
        if action not in ACTIONS:
            raise ConfigError(f"alarm_action: choose warn or stop, got {action!r}.")
        self.rules = list(rules)
        self.action = action
        self.head = tuple(head)
        self.alpha = alpha
        self.init: dict[str, Observation] = {}
        self.high: dict[str, tuple[Observation, int]] = {}  # the highest so far and how many epochs it was chosen from
        self.low: dict[str, tuple[Observation, int]] = {}
        self.tests: dict[str, int] = {r.name: 0 for r in self.rules}
        self.streaks: dict[str, dict[str, int]] = {r.name: {} for r in self.rules}
        self.first: dict[str, Firing] = {}
        self.uses_errors: bool | None = None  # None until an epoch is seen

    @classmethod
    def for_sites(cls, text: str, action: Action, sites: Iterable[str], head: tuple[str, str] = HEAD_VIEW) -> Alarms:
        """The alarms of an `alarms` setting for a model with these `sites` and `head` view: the
        rules parsed and their site globs held to the model's own (ConfigError, before any work)."""
        rules = parse(text)
        check_sites(rules, sites, head)
        return cls(rules, action, head)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def observe(self, epoch: int, observations: Mapping[tuple[str, str, str], Observation]) -> EpochAlarms:
        """Test every rule at a probed `epoch`, then take the epoch into init and best."""
        out = EpochAlarms()
        if observations:
            self.uses_errors = any(o.folds >= 2 for o in observations.values())
        for rule in self.rules:
            out.metrics[alarm_key(rule.name)] = 0.0
            tested = self._testable(rule, observations)
            if not tested:
                continue
            self.tests[rule.name] += 1
            k = self.tests[rule.name]
            streak = self.streaks[rule.name]
            worst: Firing | None = None
            for (site, view), (x, thr, thr_se, n) in tested.items():
                level = rule_level(k, len(tested), n, self.alpha)
                hit, p = _breach(rule, x, thr, thr_se, level)
                where = f"{site}/{view}/{rule.observable}"
                streak[where] = streak.get(where, 0) + 1 if hit else 0
                if streak[where] >= rule.persistence:
                    f = Firing(rule.name, rule.text, epoch, where, x.value, x.se, thr, thr_se, p, level)
                    if worst is None or (math.isfinite(p) and not p >= worst.p):
                        worst = f
            if worst is not None:
                out.metrics[alarm_key(rule.name)] = 1.0
                out.active.append(worst)
                if rule.name not in self.first:
                    self.first[rule.name] = worst
                    out.fired.append(worst)
        self._remember(epoch, observations)
        out.stop = self.action == "stop" and bool(out.fired)
        return out

    def _testable(self, rule: Rule, observations: Mapping[tuple[str, str, str], Observation]) -> dict:
        """(site, view) -> (x, threshold, its se, n) for the site/views the rule can test this epoch."""
        out = {}
        for (site, view, observable), x in observations.items():
            if observable != rule.observable or not rule.matches(site, view, self.head):  # type: ignore[arg-type]
                continue
            key = _key(site, view, observable)
            if rule.reference == "value":
                out[(site, view)] = (x, rule.factor, 0.0, 1)
                continue
            if rule.reference == "init":
                ref, n = self.init.get(key), 1
            else:
                ref, n = (self.high if rule.op == "<" else self.low).get(key, (None, 0))
            if ref is None:
                continue  # no earlier epoch to compare with
            se = abs(rule.factor) * ref.se if ref.folds >= 2 else 0.0
            out[(site, view)] = (x, rule.factor * ref.value, se, n)
        return out

    def _remember(self, epoch: int, observations: Mapping[tuple[str, str, str], Observation]) -> None:
        for (site, view, observable), x in observations.items():
            if not math.isfinite(x.value):
                continue
            key, x = _key(site, view, observable), Observation(x.value, x.se, x.folds, epoch)
            self.init.setdefault(key, x)
            hi, n = self.high.get(key, (None, 0))
            self.high[key] = (x if hi is None or x.value > hi.value else hi, n + 1)
            lo, n = self.low.get(key, (None, 0))
            self.low[key] = (x if lo is None or x.value < lo.value else lo, n + 1)

    # ---- carried in checkpoints ----
    def state(self) -> dict[str, Any]:
        """What the alarms have seen, as JSON-ready data (rules, action and head are the run's
        settings and are not part of it)."""
        return {
            "init": {k: asdict(o) for k, o in self.init.items()},
            "high": {k: [asdict(o), n] for k, (o, n) in self.high.items()},
            "low": {k: [asdict(o), n] for k, (o, n) in self.low.items()},
            "tests": dict(self.tests),
            "streaks": {k: dict(v) for k, v in self.streaks.items()},
            "first": {k: asdict(f) for k, f in self.first.items()},
        }

    def load_state(self, state: Mapping[str, Any] | None) -> Alarms:
        """Go on from `state()`: a resumed run's alarms. Rules new since are tested from here on (with
        the init and best the state holds); rules dropped are forgotten."""
        if not state:
            return self
        self.init = {k: Observation(**o) for k, o in state.get("init", {}).items()}
        self.high = {k: (Observation(**o), int(n)) for k, (o, n) in state.get("high", {}).items()}
        self.low = {k: (Observation(**o), int(n)) for k, (o, n) in state.get("low", {}).items()}
        names = {r.name for r in self.rules}
        self.tests.update({k: int(v) for k, v in state.get("tests", {}).items() if k in names})
        self.streaks.update({k: dict(v) for k, v in state.get("streaks", {}).items() if k in names})
        self.first = {k: Firing(**f) for k, f in state.get("first", {}).items() if k in names}
        return self

    def summary(self) -> list[dict[str, Any]]:
        """The first firing of each rule, in the order they fired (the tag tgo.alarm)."""
        return [asdict(f) for f in sorted(self.first.values(), key=lambda f: (f.epoch, f.alarm))]
