"""The vocabulary of tgo's geometry metrics, written once: the sites, the token views and the MLflow
key of each observable (docs/METRICS.md).

    geom/<site>/<view>/<observable>       the value at a step (= epoch)
    geom_se/<site>/<view>/<observable>    its jackknife standard error (the head view only)

Sites, in forward order: patch_embed, pos_embed, block_00 .. block_{depth-1}, final. Views: cls,
patch, mean.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

VIEWS: tuple[str, ...] = ("cls", "patch", "mean")
METRIC_PREFIX = "geom"
SE_PREFIX = "geom_se"  # standard errors, logged for the view that feeds the head only
_KEY = re.compile(r"(geom|geom_se)/(patch_embed|pos_embed|block_\d{2,}|final)/(cls|patch|mean)/(\w+)")


class MetricKey(NamedTuple):
    prefix: str
    site: str
    view: str
    observable: str


TOKENS_PREFIX = "tokens"  # tokens/<site>/mean_cosine: token interaction (TGO-II)


def token_key(site: str) -> str:
    """The key of a site's token interaction: tokens/<site>/mean_cosine."""
    return f"{TOKENS_PREFIX}/{site}/mean_cosine"


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


def site_order(sites: Sequence[str]) -> list[str]:
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
