"""TGO-II's part of an analysis: from a run's kept features (`tgo.representations.read_kept`), its
spectra (token interaction) and its weight spectra, the tables (CKA/SVCCA between sites and epochs,
intrinsic dimension, specialisation, token interaction, weights) and findings 6-8 (`tgo.findings`).
The analysis and a sweep's aggregate (for every seed) both judge TGO-II through `judge`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from tgo import findings, representations, runs
from tgo.findings import Finding
from tgo.keys import POOLED_HEAD_VIEW, head_name, site_order
from tgo.probe import ProbeResult


@dataclass
class TGO2:
    """TGO-II's part of an analysis: tables (tidy, written as tables/*.csv) and findings 6-8."""

    findings: list[Finding]
    tables: dict[str, pd.DataFrame]
    notes: list[str]


def judge(
    kept: dict[int, representations.KeptEpoch],
    spectra: dict[int, ProbeResult],
    weights: pd.DataFrame | None,
    head: tuple[str, str],
    findings_only: bool = False,
) -> TGO2:
    """Findings 6-8 and their tables from a run's kept features (`tgo.representations.read_kept`),
    its spectra (token interaction) and its weight spectra (`tgo.runs.weight_table`; None: not read).
    findings_only: skip what the findings do not use (the site x site and epoch similarity tables,
    the intrinsic dimension of the other sites), as a sweep's aggregate does for every seed."""
    notes, tables = [], {} if weights is None else {"weights": weights}
    tokens = runs.token_table(spectra)
    tables["tokens"] = tokens
    if len(kept) >= 2:
        at = head if head in kept[max(kept)].features else POOLED_HEAD_VIEW
        if findings_only:  # the intrinsic dimension at `at` only
            kept_at = {e: representations.KeptEpoch({at: k.features[at]}, k.rows) for e, k in kept.items() if at in k.features}
            tables["intrinsic_dim"], id_jack = representations.intrinsic_dimension(kept_at, jackknife_at=at)
        else:
            tables["site_similarity"], tables["epoch_similarity"] = representations.similarity_tables(kept)
            tables["intrinsic_dim"], id_jack = representations.intrinsic_dimension(kept, jackknife_at=at)
        assert id_jack is not None  # intrinsic_dimension jackknifes wherever jackknife_at is given
        spec = representations.specialisation(kept)
        tables["specialisation"] = pd.DataFrame({"site": spec.places, "cka_first_last": spec.values, "se": spec.se})
        found = [
            findings.finding6(spec.places, spec.values, spec.replicates, epochs=spec.epochs),
            findings.finding7(id_jack.places, id_jack.values, id_jack.replicates, head_name(at)),
        ]
        if any(k.rows is None for k in kept.values()):
            notes.append(
                "Some kept features were saved without their folds (before tgo kept them): findings 6 and 7 have no standard errors there."
            )
    else:
        why = (
            f"the run kept features at {len(kept)} epoch(s); findings 6 and 7 need two or more "
            "(feature_epochs: auto keeps 0, powers of 2 and the last)."
        )
        found = [
            Finding(6, findings.FINDING6, "inconclusive", why, "no test"),
            Finding(7, findings.FINDING7, "inconclusive", why, "no test"),
        ]
    blocks = site_order(s for s in tokens.site if s.startswith("block_")) if len(tokens) else []
    epochs = sorted(tokens.epoch.unique()) if len(tokens) else []
    if blocks and len(epochs) >= 2:
        deepest, (first, last) = blocks[-1], (epochs[0], epochs[-1])
        value = {e: spectra[e].token_interaction[deepest] for e in (first, last)}
        reps = (spectra[first].token_interaction_replicates.get(deepest), spectra[last].token_interaction_replicates.get(deepest))
        found.append(findings.finding8(deepest, (int(first), int(last)), (value[first], value[last]), reps))
    else:
        found.append(
            Finding(
                8, findings.FINDING8, "inconclusive", "no token interaction at two epochs (a run from before tgo measured it).", "no test"
            )
        )
    return TGO2(found, tables, notes)
