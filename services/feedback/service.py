"""The FeedbackService servicer: validate, store durably, list, export preference pairs, run campaigns."""

from __future__ import annotations

import asyncio
import datetime
import logging
import math

import grpc
from prometheus_client import Counter

from rlhf_mesh.clients.channel import client_credentials
from rlhf_mesh.clients.session import AsyncSessionClient
from rlhf_mesh.services.feedback import agreement, rater_page
from rlhf_mesh.services.feedback.campaigns import (
    DEFAULT,
    JUDGEMENTS,
    CampaignError,
    Campaigns,
    Conflict,
    NotFound,
)
from rlhf_mesh.services.feedback.preferences import (
    KIND_NAMES,
    InvalidFeedback,
    Limits,
    backed_pairs,
    session_reward,
    timestamp,
    to_proto,
    to_row,
    validate,
)
from rlhf_mesh.services.feedback.settings import FeedbackSettings
from rlhf_mesh.services.feedback.store import (
    CampaignRow,
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
MAX_GUIDELINES_BYTES = 64 << 10
JUDGEMENT_KINDS = {name: feedback_pb2.JudgementKind.Value(f"JUDGEMENT_KIND_{name.upper()}") for name in JUDGEMENTS}
JUDGEMENT_NAMES = {kind: name for name, kind in JUDGEMENT_KINDS.items()}
CAMPAIGN_ERRORS = {NotFound: grpc.StatusCode.NOT_FOUND, Conflict: grpc.StatusCode.ALREADY_EXISTS,
                   CampaignError: grpc.StatusCode.INVALID_ARGUMENT}


async def _created_after(request, context: grpc.aio.ServicerContext) -> datetime.datetime | None:
    if not request.HasField("created_after"):
        return None
    try:
        return request.created_after.ToDatetime(tzinfo=datetime.UTC)
    except (ValueError, OverflowError) as err:  # seconds or nanos out of the Timestamp's range
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"created_after: {err}")


def campaign_proto(row: CampaignRow, progress=None) -> feedback_pb2.Campaign:
    campaign = feedback_pb2.Campaign(
        campaign_id=row.campaign_id, title=row.title, guidelines=row.guidelines,
        judgements=[JUDGEMENT_KINDS[j] for j in row.judgements],
        rating_scale=row.rating_scale, judgements_per_item=row.judgements_per_item)
    campaign.created_at.FromDatetime(row.created_at)
    if progress is not None:
        campaign.progress.CopyFrom(feedback_pb2.CampaignProgress(
            items=progress.items, closed_items=progress.closed_items, judgements=progress.judgements,
            skips=progress.skips))
    return campaign


async def _campaign_call(context: grpc.aio.ServicerContext, work, *args):
    """`work(*args)` in a thread; a CampaignError aborts the call with its status."""
    try:
        return await asyncio.to_thread(work, *args)
    except CampaignError as err:
        await context.abort(next(code for kind, code in CAMPAIGN_ERRORS.items() if isinstance(err, kind)), str(err))


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, store: FeedbackStore, limits: Limits, campaigns: Campaigns | None = None) -> None:
        self.store = store
        self.limits = limits
        self.campaigns = campaigns
        self.replicas: list[AsyncSessionClient] = []  # whose sessions ratings reward

    async def _reward_session(self, feedback: feedback_pb2.Feedback) -> bool:
        """The stored rating as its session's reward, on the replica that holds the session."""
        for replica in self.replicas:
            try:
                await replica.reward(feedback.session_id, session_reward(feedback), feedback.call_id or None)
                return True
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION:  # closed already: rewarded before
                    return False
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    log.warning("could not reward session %s on %s: %s", feedback.session_id, replica.address,
                                err.details())
        return False

    async def SubmitFeedback(self, request, context):
        feedback = request.feedback
        kind = feedback.WhichOneof("judgement") or "none"
        try:
            if feedback.campaign_id or feedback.item_id:
                raise InvalidFeedback("campaign_id and item_id are set by the server: judge campaign items on "
                                      "the rater page")
            validate(feedback, self.limits)
            stored = await asyncio.to_thread(self.store.submit, to_row(feedback))
        except InvalidFeedback as err:
            SUBMITTED.labels(kind, "invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"feedback: {err}")
        except ConflictingResubmission as err:
            SUBMITTED.labels(kind, "conflict").inc()
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(err))
        SUBMITTED.labels(kind, "duplicate" if stored.already_stored else "stored").inc()
        rewarded = bool(feedback.session_id) and await self._reward_session(feedback)
        return feedback_pb2.SubmitFeedbackResponse(
            feedback_id=stored.row.feedback_id, already_stored=stored.already_stored,
            created_at=timestamp(stored.row), session_rewarded=rewarded,
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
        if not 0 <= request.min_agreement <= 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "min_agreement must be in [0, 1]")
        if request.campaign_id:
            await _campaign_call(context, self.campaigns.get, request.campaign_id)
        created_after = await _created_after(request, context)
        summary = feedback_pb2.ExportSummary()
        after = None
        while True:
            groups, after = await asyncio.to_thread(self.store.units, campaign_id=request.campaign_id,
                                                    created_after=created_after, after=after,
                                                    limit=EXPORT_PAGE_ROWS)
            found = []
            for rows in groups:
                pairs, used = backed_pairs(rows, request.min_rating_margin, request.min_raters_backing,
                                           request.min_agreement)
                found += pairs
                summary.pairs += len(pairs)
                summary.used_feedback += used
                summary.skipped_feedback += len(rows) - used
            if found:
                yield feedback_pb2.ExportPreferencesResponse(pairs=found)
            if after is None:
                break
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
        pending = await _campaign_call(context, self.campaigns.add_items, request.campaign_id or DEFAULT, rows)
        return feedback_pb2.AddRatingItemsResponse(added=len(rows), pending=pending)

    async def CreateCampaign(self, request, context):
        given = request.campaign
        problem = None
        if len(given.guidelines.encode()) > MAX_GUIDELINES_BYTES:
            problem = f"guidelines are longer than {MAX_GUIDELINES_BYTES} bytes"
        elif any(j not in JUDGEMENT_NAMES for j in given.judgements):
            problem = "judgements: every kind must be one of " + ", ".join(
                feedback_pb2.JudgementKind.Name(k) for k in JUDGEMENT_NAMES)
        elif len(given.title) > 256:
            problem = "title is longer than 256 characters"
        elif given.rating_scale == 1 or given.rating_scale > 10:
            problem = f"rating_scale {given.rating_scale} is not in [2, 10]"
        elif given.judgements_per_item > 100:
            problem = f"judgements_per_item {given.judgements_per_item} is above 100"
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"campaign: {problem}")
        judgements = list(dict.fromkeys(JUDGEMENT_NAMES[j] for j in given.judgements)) or ["choice"]
        row = CampaignRow(campaign_id=given.campaign_id, title=given.title or given.campaign_id,
                          guidelines=given.guidelines, judgements=judgements, rating_scale=given.rating_scale or 5,
                          judgements_per_item=given.judgements_per_item or 1)
        created = await _campaign_call(context, self.campaigns.create, row)
        log.info("campaign %r: %s, %d per item", created.campaign_id, ", ".join(judgements),
                 created.judgements_per_item)
        return feedback_pb2.CreateCampaignResponse(campaign=campaign_proto(created))

    async def ListCampaigns(self, request, context):
        def listing():
            return [campaign_proto(row, self.campaigns.progress(row.campaign_id)) for row in self.campaigns.list()]

        return feedback_pb2.ListCampaignsResponse(campaigns=await asyncio.to_thread(listing))

    async def ListCampaignStats(self, request, context):
        def compute() -> list[feedback_pb2.CampaignStats]:
            ids = [request.campaign_id] if request.campaign_id else [c.campaign_id for c in self.campaigns.list()]
            return [agreement.of_campaign(self.campaigns, c) for c in ids]

        return feedback_pb2.ListCampaignStatsResponse(campaigns=await _campaign_call(context, compute))


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
        s = self.settings
        credentials = client_credentials(s.services_token_file, s.services_tls_ca)
        self.servicer.replicas = [AsyncSessionClient(a, timeout_s=30, **credentials) for a in s.session_replicas]
        self.store = await asyncio.to_thread(FeedbackStore, self.settings.db)
        self.servicer.store = self.store
        self.servicer.campaigns = Campaigns(self.store, self.settings.assignment_lease_s)
        log.info("feedback store: %s (schema at head)", self.store.engine.url.render_as_string(hide_password=True))
        if self.settings.rater_page:
            self._page, _ = await rater_page.start(self.servicer.campaigns, self.limits, self.settings)

    async def close(self) -> None:
        for replica in self.servicer.replicas:
            await replica.close()
        if self._page is not None:
            await self._page.cleanup()
        if self.store is not None:
            self.store.close()
