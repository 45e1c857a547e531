"""The vocabulary of tgo's run protocol, written once: the sites, the token views, the head view,
the MLflow key of every metric tgo logs (docs/METRICS.md), the tags it sets on runs and the
attributes it sets on Optuna studies and trials. The artifact layout is `tgo.tracking`'s.

Metrics (step = epoch unless said otherwise):

    geom/<site>/<view>/<observable>       the value                         `metric_key`
    geom_se/<site>/<view>/<observable>    its jackknife standard error (the head view only)
    tokens/<site>/mean_cosine             token interaction (TGO-II)        `token_key`
    similarity/<site>/cka_<against>       CKA with the final site / previous kept epoch   `similarity_key`
    intrinsic_dim/<site>/<view>           TwoNN intrinsic dimension         `intrinsic_dim_key`
    weights/<kind>/<site>/<observable>    weight spectra                    `weight_key`
    alarm/<name>                          1 where an alarm rule is in alarm, else 0 (probed epochs)   `tgo.alarms.alarm_key`
    finding/<N>                           an analysis's verdict score       `finding_key`
    seeds/<stat>/<key>                    a sweep parent's spread over seeds   `seeds_key`
    seeds/finding/<N>[/<what>]            a sweep's verdict across seeds    `seeds_finding_key`
    cka/<site>/<view>                     a comparison's CKA between the runs   `cross_cka_key`
    compare/<what>                        a comparison's counts             `compare_key`
    best/<metric>                         a study's best objective value    `best_key`
    study/<what>                          a study's trials by how they ended (complete, pruned_by_pruner, pruned_by_alarm, fail)   `study_key`

Sites, in forward order: patch_embed, pos_embed, block_00 .. block_{depth-1}, final. Views: cls,
patch, mean. Token interaction (the mean cosine between an image's distinct patch tokens) is one
quantity under one name in code, `token_interaction`; its metric key, its field in the spectra
files (`TOKEN_FILE_KEY`) and its view in a comparison (`TOKEN_VIEW`) keep the names runs already
carry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

VIEWS: tuple[str, ...] = ("cls", "patch", "mean")
HEAD_VIEW: tuple[str, str] = ("final", "cls")  # what feeds the head of a class-token ViT (an avg-pooled one: final/mean)
POOLED_HEAD_VIEW: tuple[str, str] = ("final", "mean")
METRIC_PREFIX = "geom"
SE_PREFIX = "geom_se"  # standard errors, logged for the view that feeds the head only
_KEY = re.compile(r"(geom|geom_se)/(patch_embed|pos_embed|block_\d{2,}|final)/(cls|patch|mean)/(\w+)")


class MetricKey(NamedTuple):
    prefix: str
    site: str
    view: str
    observable: str


TOKENS_PREFIX = "tokens"  # tokens/<site>/mean_cosine: token interaction (TGO-II)
TOKEN_OBSERVABLE = "mean_cosine"  # token interaction's observable name in keys and comparisons
TOKEN_VIEW = "tokens"  # token interaction's view in a comparison's tables (beside cls, patch, mean)
TOKEN_FILE_KEY = "token_similarity"  # spectra files: token_similarity/<site> and token_similarity_replicates/<site>


def token_key(site: str) -> str:
    """The key of a site's token interaction: tokens/<site>/mean_cosine."""
    return f"{TOKENS_PREFIX}/{site}/{TOKEN_OBSERVABLE}"


def similarity_key(site: str, against: str) -> str:
    """similarity/<site>/cka_<against>: debiased linear CKA of a site's mean features with the final
    site's (against="final") or with its own at the previous kept epoch (against="previous")."""
    return f"similarity/{site}/cka_{against}"


def intrinsic_dim_key(site: str, view: str) -> str:
    """intrinsic_dim/<site>/<view>: TwoNN intrinsic dimension of a site's cls or mean features."""
    return f"intrinsic_dim/{site}/{view}"


def site_names(depth: int) -> list[str]:
    """The sites of a ViT with `depth` blocks, in forward order."""
    return ["patch_embed", "pos_embed", *[f"block_{i:02d}" for i in range(depth)], "final"]


def site_order(sites: Iterable[str]) -> list[str]:
    """The distinct `sites` in forward order (patch_embed, pos_embed, blocks by number, final)."""

    def rank(site: str) -> int:
        if site == "patch_embed":
            return -2
        if site == "pos_embed":
            return -1
        if site.startswith("block_"):
            return int(site.split("_")[1])
        return 10_000

    return sorted(set(sites), key=rank)


def metric_key(site: str, view: str, observable: str, prefix: str = METRIC_PREFIX) -> str:
    """The MLflow metric key of one observable: geom/<site>/<view>/<observable>; with
    prefix=SE_PREFIX, the key of its standard error, geom_se/<site>/<view>/<observable>."""
    return f"{prefix}/{site}/{view}/{observable}"


def parse_metric_key(key: str) -> MetricKey | None:
    """The parts of a geometry key, or None for any other key (train/loss, val/acc1, ...)."""
    match = _KEY.fullmatch(key)
    return MetricKey(*match.groups()) if match else None


def head_name(head: tuple[str, str]) -> str:
    """A (site, view) pair as written in keys, tags and messages: "final/cls"."""
    return "/".join(head)


def parse_head(text: str) -> tuple[str, str]:
    """The (site, view) pair of "final/cls" (HEAD_VIEW for ""), as runs record their head view."""
    site, _, view = text.partition("/")
    return (site, view) if site and view else HEAD_VIEW


WEIGHTS_PREFIX = "weights"


def weight_key(kind: str, site: str, observable: str) -> str:
    """weights/<kind>/<site>/<observable>: an observable of one weight matrix's spectrum (tgo.weights)."""
    return f"{WEIGHTS_PREFIX}/{kind}/{site}/{observable}"


def parse_weight_key(key: str) -> tuple[str, str, str] | None:
    """(kind, site, observable) of a weights/ key, or None for any other key."""
    parts = key.split("/")
    return (parts[1], parts[2], parts[3]) if len(parts) == 4 and parts[0] == WEIGHTS_PREFIX else None


def finding_key(number: int) -> str:
    """finding/<N>: an analysis run's score of finding N (1 supported, -1 contradicted, 0 otherwise)."""
    return f"finding/{int(number)}"


def seeds_key(stat: str, key: str) -> str:
    """seeds/<stat>/<key>: a sweep parent's statistic (mean, std, ci95_low, ci95_high) of a metric across seeds."""
    return f"seeds/{stat}/{key}"


def seeds_finding_key(number: int, what: str = "") -> str:
    """seeds/finding/<N>, or seeds/finding/<N>/<what> (supported, sign_test_p): a sweep's verdict across seeds."""
    return f"seeds/finding/{int(number)}" + (f"/{what}" if what else "")


def cross_cka_key(site: str, view: str) -> str:
    """cka/<site>/<view>: a comparison run's CKA between the two runs' features."""
    return f"cka/{site}/{view}"


def compare_key(what: str) -> str:
    """compare/<what>: a comparison run's counts (differing, tests, matched_epochs)."""
    return f"compare/{what}"


def best_key(metric: str) -> str:
    """best/<metric>: a study parent's best value of its objective."""
    return f"best/{metric}"


def study_key(what: str) -> str:
    """study/<what>: a study parent's count of trials that ended so (complete, pruned_by_pruner,
    pruned_by_alarm, fail)."""
    return f"study/{what}"


class Tag:
    """The tags tgo sets on MLflow runs (MLflow's own, mlflow.*, are spelled where they are set)."""

    KIND = "tgo.kind"  # train, probe, analysis, comparison, sweep, study
    VERSION = "tgo.version"
    PRESET, DATASET, MODEL = "tgo.preset", "tgo.dataset", "tgo.model"
    NUM_CLASSES = "tgo.num_classes"
    DATA_NOTES = "tgo.data_notes"
    WORLD_SIZE = "tgo.world_size"  # processes that trained the run (torchrun)
    PROBE_WEIGHTS = "tgo.probe_weights"  # model or ema
    PROBE_FINGERPRINT = "tgo.probe_fingerprint"  # the probe images' indices and content
    HEAD_VIEW = "tgo.head_view"  # "final/cls" or "final/mean"
    DEGENERATE_VIEWS = "tgo.degenerate_views"
    LEASE = "tgo.lease"  # {"worker": "<host>:<pid>", "renewed": unix time, "nonce": ...} while a process trains the run
    ERROR = "tgo.error"  # the error a run (or trial) stopped with
    PREVIOUS_ERROR = "tgo.previous_error"  # ... before it was resumed
    STOPPED_EARLY = "tgo.stopped_early"  # why an epoch callback (a pruner) ended it
    ALARM = "tgo.alarm"  # JSON: each alarm's first firing (alarm, rule, epoch, where, value, se, threshold, p, level)
    STOPPED_BY = "tgo.stopped_by"  # JSON: the alarm(s) whose action stop ended the run, and at which epoch
    PRUNED_BY = "tgo.pruned_by"  # a study trial's run: "pruner" or "alarm"
    RESUMES = "tgo.resumes"  # on a launcher run: the run it resumed
    RESUMED_PREFIX = "tgo.resumed."  # tgo.resumed.<field>: a setting changed on resume
    # probe runs: geometry of weights trained elsewhere (tgo probe, GeometryMonitor, the Lightning callback)
    PROBED = "tgo.probed"  # what was probed: the checkpoints' source path, or "monitor" for a loop of one's own
    PROBED_LAYOUT = "tgo.probed_layout"  # the trainers that wrote the checkpoints (timm, deit, lightning, huggingface, ...)
    STEP_UNIT = "tgo.step_unit"  # "epochs" (training epochs completed) or "optimizer_steps"
    NORMALIZE = "tgo.normalize"  # how the probe images were normalised: "dataset" (as tgo train) or "model" (its data config)
    # sweeps and studies
    STUDY = "tgo.study"
    SEEDS = "tgo.seeds"
    SEED_RUNS = "tgo.seed_runs"  # a sweep parent's seed runs, set once every seed is aggregated
    STOPPED_SEEDS = "tgo.stopped_seeds"  # JSON on a sweep parent: seed -> the tgo.stopped_by of its run (an alarm ended it early)
    SWEEP_PARENT = "tgo.sweep_parent"  # on another worker's launcher run
    TRIAL_NUMBER = "tgo.trial_number"
    TRIAL_STATE = "tgo.trial_state"  # RUNNING, COMPLETE, PRUNED, FAIL
    PARAM_PREFIX = "tgo.param."  # tgo.param.<name>: a study trial's suggested value
    OBJECTIVES = "tgo.objectives"
    N_TRIALS = "tgo.n_trials"
    BEST_TRIALS = "tgo.best_trials"
    # analyses and comparisons
    ANALYZED_RUN = "tgo.analyzed_run"
    ANALYSIS_RUN = "tgo.analysis_run"  # on the training run: its latest analysis
    SOURCE = "tgo.source"  # where an analysis read the geometry from
    RUN_A, RUN_B = "tgo.run_a", "tgo.run_b"
    COMPARED_RUNS = "tgo.compared_runs"
    COMPARE_METHOD = "tgo.compare_method"
    COMPARISON_RUN = "tgo.comparison_run"  # on each compared run: its latest comparison


class TrialAttr:
    """The attributes tgo sets on Optuna studies and trials (user attributes)."""

    PARENT_RUN = "mlflow_parent_run_id"  # study: the MLflow parent run
    RUN = "mlflow_run_id"  # trial: its MLflow run
    WORKER = "tgo.worker"  # trial: "<host>:<pid>" of the process running it
    ERROR = "tgo.error"  # trial: the error it failed with, "<type>: <message>"
    CONFIG_ERROR = "tgo.config_error"  # trial: the ConfigError it failed with
    FAILED_BECAUSE = "tgo.failed_because"  # trial: why another worker failed it (its worker died)
    RETRY_OF = "tgo.retry_of"  # trial: the number of the dead trial it retries
    SLOT = "tgo.slot"  # trial: one of a study's n_trials slots
    SURPLUS = "tgo.surplus"  # trial: asked for once every slot was taken
    PRUNED_BY = "tgo.pruned_by"  # trial: what pruned it, "pruner" (the study's) or "alarm" (a geometry alarm with action stop)
    PRUNED_BECAUSE = "tgo.pruned_because"  # trial: why, in words (the pruner and epoch, or the alarm's firing with its numbers)
