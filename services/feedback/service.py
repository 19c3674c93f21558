"""The FeedbackService servicer: validate, store durably, list, export preference pairs."""

from __future__ import annotations

import asyncio
import datetime
import logging
import math

import grpc
from prometheus_client import Counter

from rlhf_mesh.services.feedback import rater_page
from rlhf_mesh.services.feedback.preferences import (
    KIND_NAMES,
    InvalidFeedback,
    Limits,
    pairs,
    timestamp,
    to_proto,
    to_row,
    validate,
)
from rlhf_mesh.services.feedback.settings import FeedbackSettings
from rlhf_mesh.services.feedback.store import (
    ConflictingResubmission,
    FeedbackStore,
    RatingItemRow,
    page_token,
    parse_page_token,
)
from rlhf_mesh.v1 import feedback_pb2, feedback_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name
SUBMITTED = Counter("rlhf_mesh_feedback_submitted_total", "SubmitFeedback calls by outcome.", ["kind", "status"])
EXPORT_PAGE_ROWS = 500  # rows read per query while exporting, so memory stays flat
MAX_PAGE_SIZE = 1000


async def _created_after(request, context: grpc.aio.ServicerContext) -> datetime.datetime | None:
    if not request.HasField("created_after"):
        return None
    try:
        return request.created_after.ToDatetime(tzinfo=datetime.UTC)
    except (ValueError, OverflowError) as err:  # seconds or nanos out of the Timestamp's range
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"created_after: {err}")


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, store: FeedbackStore, limits: Limits) -> None:
        self.store = store
        self.limits = limits

    async def SubmitFeedback(self, request, context):
        feedback = request.feedback
        kind = feedback.WhichOneof("judgement") or "none"
        try:
            validate(feedback, self.limits)
            stored = await asyncio.to_thread(self.store.submit, to_row(feedback))
        except InvalidFeedback as err:
            SUBMITTED.labels(kind, "invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"feedback: {err}")
        except ConflictingResubmission as err:
            SUBMITTED.labels(kind, "conflict").inc()
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(err))
        SUBMITTED.labels(kind, "duplicate" if stored.already_stored else "stored").inc()
        return feedback_pb2.SubmitFeedbackResponse(
            feedback_id=stored.row.feedback_id, already_stored=stored.already_stored,
            created_at=timestamp(stored.row),
        )

    async def ListFeedback(self, request, context):
        page_size = request.page_size or 100
        if page_size > MAX_PAGE_SIZE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"page_size {page_size} is above {MAX_PAGE_SIZE}")
        try:
            after = parse_page_token(request.page_token) if request.page_token else 0
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        created_after = await _created_after(request, context)
        rows, last = await asyncio.to_thread(
            self.store.list, rater_id=request.rater_id, kind=KIND_NAMES.get(request.kind, ""),
            created_after=created_after, after_seq=after, limit=page_size,
        )
        return feedback_pb2.ListFeedbackResponse(
            feedback=[to_proto(r) for r in rows], next_page_token=page_token(last) if last is not None else "",
        )

    async def ExportPreferences(self, request, context):
        if not request.min_rating_margin >= 0 or math.isinf(request.min_rating_margin):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "min_rating_margin must be a finite number >= 0")
        created_after = await _created_after(request, context)
        summary = feedback_pb2.ExportSummary()
        after = 0
        while True:
            rows, last = await asyncio.to_thread(self.store.list, created_after=created_after, after_seq=after,
                                                 limit=EXPORT_PAGE_ROWS)
            found = []
            for row in rows:
                row_pairs = pairs(row, request.min_rating_margin)
                found += row_pairs
                summary.pairs += len(row_pairs)
                if row_pairs:
                    summary.used_feedback += 1
                else:
                    summary.skipped_feedback += 1
            if found:
                yield feedback_pb2.ExportPreferencesResponse(pairs=found)
            if last is None:
                break
            after = last
        yield feedback_pb2.ExportPreferencesResponse(summary=summary)

    async def AddRatingItems(self, request, context):
        for i, item in enumerate(request.items):
            try:
                validate(feedback_pb2.Feedback(rater_id="-", prompt=item.prompt, responses=item.responses,
                                               choice=feedback_pb2.Choice()), self.limits)
            except InvalidFeedback as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"items[{i}]: {err}")
        rows = [RatingItemRow(prompt=i.prompt, responses=list(i.responses), model_id=i.model_id,
                              policy_version=i.policy_version) for i in request.items]
        pending = await asyncio.to_thread(self.store.add_items, rows)
        return feedback_pb2.AddRatingItemsResponse(added=len(rows), pending=pending)


class FeedbackService:
    name = "feedback"

    def __init__(self, settings: FeedbackSettings) -> None:
        self.settings = settings
        self.store: FeedbackStore | None = None
        self.limits = Limits(settings.max_responses, settings.max_text_bytes)
        self.servicer = FeedbackServicer(None, self.limits)
        self._page = None

    def register(self, server: grpc.aio.Server) -> list[str]:
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(self.servicer, server)
        return [SERVICE]

    async def start(self) -> None:
        self.store = await asyncio.to_thread(FeedbackStore, self.settings.db)
        self.servicer.store = self.store
        log.info("feedback store: %s (schema at head)", self.store.engine.url.render_as_string(hide_password=True))
        if self.settings.rater_page:
            self._page, _ = await rater_page.start(self.store, self.limits, self.settings.host,
                                                   self.settings.rater_port)

    async def close(self) -> None:
        if self._page is not None:
            await self._page.cleanup()
        if self.store is not None:
            self.store.close()
