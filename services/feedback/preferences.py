"""Feedback rules: what a valid piece of feedback is, and the preference pairs it yields.

- choice: the chosen response beats every other response (n - 1 pairs);
- rating: response i beats response j when score_i - score_j > min_rating_margin (ties and
  single ratings yield nothing);
- correction: the corrected text beats the response it corrects (unless they are equal);
- tie (equally good, or both bad): nothing.

Where several raters judged one campaign item, each pair counts the raters whose judgement
gives it (`raters_backing` of `raters`), and an export can keep only the pairs enough of
them back.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from rlhf_mesh.services.feedback.store import FeedbackRow
from rlhf_mesh.v1 import feedback_pb2

KINDS = {"rating": feedback_pb2.FEEDBACK_KIND_RATING, "choice": feedback_pb2.FEEDBACK_KIND_CHOICE,
         "correction": feedback_pb2.FEEDBACK_KIND_CORRECTION, "tie": feedback_pb2.FEEDBACK_KIND_TIE}
KIND_NAMES = {v: k for k, v in KINDS.items()}


class InvalidFeedback(ValueError):
    """Feedback that cannot be stored (INVALID_ARGUMENT), with what is wrong."""


@dataclass(frozen=True)
class Limits:
    max_responses: int
    max_text_bytes: int


def validate(feedback: feedback_pb2.Feedback, limits: Limits) -> None:
    """Raise InvalidFeedback naming the field at fault."""
    if not feedback.rater_id:
        raise InvalidFeedback("rater_id is empty")
    if len(feedback.feedback_id) > 128:
        raise InvalidFeedback("feedback_id is longer than 128 characters")
    if not feedback.prompt.strip():
        raise InvalidFeedback("prompt is empty")
    if not feedback.responses:
        raise InvalidFeedback("responses is empty: give at least one")
    if len(feedback.responses) > limits.max_responses:
        raise InvalidFeedback(f"{len(feedback.responses)} responses, more than max_responses={limits.max_responses}")
    for name, text in [("prompt", feedback.prompt), *((f"responses[{i}]", r) for i, r in
                                                       enumerate(feedback.responses))]:
        if len(text.encode()) > limits.max_text_bytes:
            raise InvalidFeedback(f"{name} is longer than max_text_bytes={limits.max_text_bytes}")
    for i, response in enumerate(feedback.responses):
        if not response.strip():
            raise InvalidFeedback(f"responses[{i}] is empty")
    kind = feedback.WhichOneof("judgement")
    count = len(feedback.responses)
    if kind is None:
        raise InvalidFeedback("no judgement: set rating, choice, correction or tie")
    if (feedback.session_id or feedback.call_id) and kind != "rating":
        raise InvalidFeedback("session_id and call_id go with a rating (it becomes the session's reward)")
    if feedback.call_id and not feedback.session_id:
        raise InvalidFeedback("call_id needs the session_id it belongs to")
    if len(feedback.session_id) > 256 or len(feedback.call_id) > 256:
        raise InvalidFeedback("session_id and call_id are at most 256 characters")
    if kind == "rating":
        rating = feedback.rating
        if not rating.scale_max > rating.scale_min:
            raise InvalidFeedback(f"rating scale [{rating.scale_min}, {rating.scale_max}] is empty")
        if len(rating.scores) != count:
            raise InvalidFeedback(f"rating has {len(rating.scores)} scores for {count} responses")
        for i, score in enumerate(rating.scores):
            if not rating.scale_min <= score <= rating.scale_max:
                raise InvalidFeedback(
                    f"rating.scores[{i}] = {score} is outside the scale [{rating.scale_min}, {rating.scale_max}]")
    elif kind in ("choice", "tie"):
        if count < 2:
            raise InvalidFeedback(f"a {kind} needs two or more responses")
        if kind == "choice" and feedback.choice.chosen_index >= count:
            raise InvalidFeedback(f"choice.chosen_index {feedback.choice.chosen_index} is not a response index "
                                  f"(there are {count})")
    else:
        correction = feedback.correction
        if correction.response_index >= count:
            raise InvalidFeedback(f"correction.response_index {correction.response_index} is not a response index "
                                  f"(there are {count})")
        if not correction.corrected_response.strip():
            raise InvalidFeedback("correction.corrected_response is empty")
        if len(correction.corrected_response.encode()) > limits.max_text_bytes:
            raise InvalidFeedback(
                f"correction.corrected_response is longer than max_text_bytes={limits.max_text_bytes}")


def to_row(feedback: feedback_pb2.Feedback) -> FeedbackRow:
    kind = feedback.WhichOneof("judgement")
    if kind == "rating":
        r = feedback.rating
        judgement = {"scores": list(r.scores), "scale_min": r.scale_min, "scale_max": r.scale_max}
        if feedback.session_id:  # the session a rating rewards is kept with it
            judgement |= {"session_id": feedback.session_id, "call_id": feedback.call_id}
    elif kind == "choice":
        judgement = {"chosen_index": feedback.choice.chosen_index}
    elif kind == "tie":
        judgement = {"both_bad": feedback.tie.both_bad}
    else:
        c = feedback.correction
        judgement = {"response_index": c.response_index, "corrected_response": c.corrected_response}
    return FeedbackRow(
        feedback_id=feedback.feedback_id, rater_id=feedback.rater_id, prompt=feedback.prompt,
        responses=list(feedback.responses), model_id=feedback.model_id, policy_version=feedback.policy_version,
        kind=kind, judgement=judgement, campaign_id=feedback.campaign_id or None, item_id=feedback.item_id or None,
    )


def timestamp(row: FeedbackRow) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(row.created_at)
    return stamp


def to_proto(row: FeedbackRow) -> feedback_pb2.Feedback:
    j = dict(row.judgement)
    session = {"session_id": j.pop("session_id", ""), "call_id": j.pop("call_id", "")}
    judgement = {
        "rating": lambda: {"rating": feedback_pb2.Rating(**j)},
        "choice": lambda: {"choice": feedback_pb2.Choice(**j)},
        "correction": lambda: {"correction": feedback_pb2.Correction(**j)},
        "tie": lambda: {"tie": feedback_pb2.Tie(**j)},
    }[row.kind]()
    return feedback_pb2.Feedback(
        feedback_id=row.feedback_id, rater_id=row.rater_id, prompt=row.prompt, responses=row.responses,
        model_id=row.model_id, policy_version=row.policy_version, created_at=timestamp(row),
        campaign_id=row.campaign_id or "", item_id=row.item_id or 0, **session, **judgement,
    )


def pairs(row: FeedbackRow, min_rating_margin: float = 0.0) -> list[feedback_pb2.PreferencePair]:
    """The (prompt, chosen, rejected) pairs of one stored piece of feedback."""
    j, responses = row.judgement, row.responses

    def pair(chosen: str, rejected: str) -> feedback_pb2.PreferencePair:
        return feedback_pb2.PreferencePair(prompt=row.prompt, chosen=chosen, rejected=rejected,
                                           feedback_id=row.feedback_id)

    if row.kind == "choice":
        best = j["chosen_index"]
        return [pair(responses[best], r) for i, r in enumerate(responses) if i != best and r != responses[best]]
    if row.kind == "rating":
        scored = list(zip(j["scores"], responses, strict=True))
        return [pair(a, b) if sa > sb else pair(b, a)
                for (sa, a), (sb, b) in itertools.combinations(scored, 2)
                if abs(sa - sb) > min_rating_margin and a != b]
    if row.kind == "tie":
        return []
    original = responses[j["response_index"]]
    corrected = j["corrected_response"]
    return [pair(corrected, original)] if corrected != original else []


def backed_pairs(rows: list[FeedbackRow], min_rating_margin: float = 0.0, min_raters_backing: int = 0,
                 min_agreement: float = 0.0) -> tuple[list[feedback_pb2.PreferencePair], int]:
    """The pairs of the judgements of one item (one per rater) with how many raters back each, those
    backed by at least `min_raters_backing` raters and `min_agreement` of them; and how many of the
    rows gave a kept pair."""
    found = [{(p.chosen, p.rejected): p for p in pairs(row, min_rating_margin)} for row in rows]
    backing = Counter(key for by_key in found for key in by_key)
    kept = {key for key, n in backing.items() if n >= min_raters_backing and n >= min_agreement * len(rows)}
    result, first = [], {}
    for by_key in found:
        for key, pair in by_key.items():
            if key in kept and key not in first:
                first[key] = pair
                pair.raters_backing, pair.raters = backing[key], len(rows)
                result.append(pair)
    return result, sum(1 for by_key in found if kept & by_key.keys())


def session_reward(feedback: feedback_pb2.Feedback) -> float:
    """A session's reward from a rating of its response: the score scaled from the rating's scale
    to [0, 1] (a thumbs up on a 0-1 scale is 1, a 3 of 1-5 is 0.5)."""
    rating = feedback.rating
    return (rating.scores[0] - rating.scale_min) / (rating.scale_max - rating.scale_min)
