"""How raters of a campaign agree: judgements per rater, pairwise agreement, Krippendorff's alpha.

A unit is what two raters can agree on: an item's preference (the chosen response, tie or
both bad; nominal) and each rated response of an item (its score; ordinal). Corrections
carry no value to compare and are left out. Alpha is the `krippendorff` package's; it is
unset when no unit has two values or every value is the same (alpha is undefined then).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable

import krippendorff
import numpy as np

from rlhf_mesh.services.feedback.campaigns import Campaigns, Judged
from rlhf_mesh.v1 import feedback_pb2

Unit = tuple


def units(judgements: Iterable[Judged]) -> tuple[dict[Unit, dict[str, str]], dict[Unit, dict[str, float]]]:
    """{unit: {rater: value}} of preferences (nominal) and of ratings (ordinal)."""
    preferences: dict[Unit, dict[str, str]] = defaultdict(dict)
    ratings: dict[Unit, dict[str, float]] = defaultdict(dict)
    for j in judgements:
        if j.kind == "choice":
            preferences[(j.item_id,)][j.rater_id] = f"response {j.judgement['chosen_index'] + 1}"
        elif j.kind == "tie":
            preferences[(j.item_id,)][j.rater_id] = "both bad" if j.judgement.get("both_bad") else "tie"
        elif j.kind == "rating":
            for index, score in enumerate(j.judgement["scores"]):
                ratings[(j.item_id, index)][j.rater_id] = score
    return preferences, ratings


def alpha(values: dict[Unit, dict], level: str) -> float | None:
    """Krippendorff's alpha of {unit: {rater: value}} at `level`; None where it is undefined."""
    raters = sorted({r for by_rater in values.values() for r in by_rater})
    domain = sorted({v for by_rater in values.values() for v in by_rater.values()})
    if len(domain) < 2 or not any(len(by_rater) >= 2 for by_rater in values.values()):
        return None
    code = {v: i for i, v in enumerate(domain)}  # ranks: the order is what ordinal distances use
    data = np.full((len(raters), len(values)), np.nan)
    for u, by_rater in enumerate(values.values()):
        for r, rater in enumerate(raters):
            if rater in by_rater:
                data[r, u] = code[by_rater[rater]]
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement=level,
                                    value_domain=list(range(len(domain)))))


def percent_agreement(values: Iterable[dict[str, object]]) -> float | None:
    """Share of agreeing pairs among all pairs of values within a unit (None without such pairs)."""
    agreed = pairs = 0
    for by_rater in values:
        for a, b in itertools.combinations(by_rater.values(), 2):
            pairs += 1
            agreed += a == b
    return agreed / pairs if pairs else None


def stats(campaign_id: str, judgements: list[Judged], skips: dict[str, int]) -> feedback_pb2.CampaignStats:
    preferences, ratings = units(judgements)
    per_rater: dict[str, int] = defaultdict(int)
    for j in judgements:
        per_rater[j.rater_id] += 1
    pair_units: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for by_rater in itertools.chain(preferences.values(), ratings.values()):
        for (a, va), (b, vb) in itertools.combinations(sorted(by_rater.items()), 2):
            pair_units[(a, b)][0] += 1
            pair_units[(a, b)][1] += va == vb
    result = feedback_pb2.CampaignStats(
        campaign_id=campaign_id,
        raters=[feedback_pb2.RaterStats(rater_id=r, judgements=per_rater.get(r, 0), skips=skips.get(r, 0))
                for r in sorted(set(per_rater) | set(skips))],
        pairs=[feedback_pb2.PairAgreement(rater_a=a, rater_b=b, units=n, agreed=agreed)
               for (a, b), (n, agreed) in sorted(pair_units.items())],
    )
    for field, value in (("percent_agreement", percent_agreement([*preferences.values(), *ratings.values()])),
                         ("alpha_choice", alpha(preferences, "nominal")),
                         ("alpha_rating", alpha(ratings, "ordinal"))):
        if value is not None and not math.isnan(value):
            setattr(result, field, value)
    return result


def of_campaign(campaigns: Campaigns, campaign_id: str) -> feedback_pb2.CampaignStats:
    """The statistics of a stored campaign (NotFound for an unknown one)."""
    campaigns.get(campaign_id)
    return stats(campaign_id, *campaigns.judged(campaign_id))
