"""The rater page: an HTTP app beside the gRPC server, on the same store and campaigns.

Every /api call needs an identity: a bearer token of the tokens file (its `name` is the
rater id; role `rate`, or `admin`), or the header a trusted authenticating proxy sets
(`rater_identity_header`; role `rate`). No identity is 401, the wrong role 403.

GET  /                                      the page (page/index.html, rater.js, rater.css)
GET  /api/me                                who you are
GET  /api/campaigns                         campaigns, guidelines (as HTML), progress
GET  /api/campaigns/{id}/next               the item you hold or the next one, and progress
POST /api/campaigns/{id}/judgements         {item_id, choice | scores | correction | tie | both_bad}
POST /api/campaigns/{id}/skip               {item_id}
POST /api/campaigns/{id}/undo               reopens your last judged or skipped item
GET  /api/campaigns/{id}/stats              agreement (admin)

Markdown is rendered on the server with raw HTML off and unsafe link schemes refused
(markdown-it-py), and the page's Content-Security-Policy allows only its own script: model
output is untrusted.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web
from google.protobuf import json_format
from markdown_it import MarkdownIt

from rlhf_mesh.clients.feedback import feedback
from rlhf_mesh.http_site import ssl_context, start_site
from rlhf_mesh.security import TokenAuth
from rlhf_mesh.services.feedback import agreement
from rlhf_mesh.services.feedback.campaigns import CampaignError, Campaigns, Conflict, NotFound
from rlhf_mesh.services.feedback.preferences import InvalidFeedback, Limits, to_row, validate
from rlhf_mesh.services.feedback.settings import FeedbackSettings
from rlhf_mesh.services.feedback.store import CampaignRow, ConflictingResubmission, RatingItemRow

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("page")
FILES = {"/": ("index.html", "text/html"), "/rater.js": ("rater.js", "text/javascript"),
         "/rater.css": ("rater.css", "text/css")}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# Raw HTML is shown as text; a line break in a response stays one.
MARKDOWN = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable("table")


@dataclass(frozen=True)
class Rater:
    rater_id: str
    roles: tuple[str, ...]

    @property
    def admin(self) -> bool:
        return "admin" in self.roles


class Refused(Exception):
    """An HTTP error with its status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def render(text: str) -> str:
    return MARKDOWN.render(text)


def _item(item: RatingItemRow) -> dict:
    return {"item_id": item.item_id, "prompt_html": render(item.prompt),
            "responses_html": [render(r) for r in item.responses], "responses": item.responses}


def _campaign(row: CampaignRow) -> dict:
    return {"campaign_id": row.campaign_id, "title": row.title, "guidelines_html": render(row.guidelines),
            "judgements": row.judgements, "rating_scale": row.rating_scale,
            "judgements_per_item": row.judgements_per_item}


def _judgement(body: dict, item: RatingItemRow, campaign: CampaignRow):
    """The page's JSON as a Feedback on `item`, of a kind the campaign asks for."""
    given = [k for k in ("choice", "scores", "correction", "tie", "both_bad") if body.get(k) is not None
             and body.get(k) is not False]
    if len(given) != 1:
        raise InvalidFeedback("give exactly one of choice, scores, correction, tie, both_bad")
    kind = {"scores": "rating"}.get(given[0], given[0])
    if kind not in campaign.judgements:
        raise InvalidFeedback(f"campaign {campaign.campaign_id!r} does not ask for {kind}")
    correction = body.get("correction")
    if correction is not None and not isinstance(correction, dict):
        raise InvalidFeedback("correction: an object {response_index, corrected_response}")
    if "scores" in body and not isinstance(body["scores"], list):
        raise InvalidFeedback("scores: a list with a score per response")
    return feedback(
        item.prompt, item.responses, rater_id="-", model_id=item.model_id, policy_version=item.policy_version,
        scale=(1.0, float(campaign.rating_scale)),
        choice=int(body["choice"]) if kind == "choice" else None,
        scores=[float(x) for x in body["scores"]] if kind == "rating" else None,
        correction=(int(correction["response_index"]), str(correction["corrected_response"]))
        if kind == "correction" else None,
        tie=kind == "tie", both_bad=kind == "both_bad",
    )


class RaterPage:
    def __init__(self, campaigns: Campaigns, limits: Limits, settings: FeedbackSettings) -> None:
        self.campaigns = campaigns
        self.limits = limits
        self.settings = settings
        self.auth = TokenAuth(settings.tokens_file) if settings.tokens_file else None
        if self.auth is None and not settings.rater_identity_header:
            log.warning("the rater page has no way to know raters: set tokens_file (role rate) or "
                        "rater_identity_header; every /api call gets 401")

    def rater(self, request: web.Request) -> Rater:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer ") and self.auth is not None:
            holder = self.auth.holder(header.removeprefix("Bearer "))
            if holder is None:
                raise Refused(401, "invalid token")
            return Rater(holder.name, tuple(holder.roles))
        proxied = self.settings.rater_identity_header
        name = request.headers.get(proxied, "").strip() if proxied else ""
        if name:
            if len(name) > 256:
                raise Refused(400, f"{proxied}: longer than 256 characters")
            return Rater(name, ("rate",))
        raise Refused(401, "log in: a bearer token (role rate) is needed")

    def rating(self, request: web.Request) -> Rater:
        rater = self.rater(request)
        if not rater.admin and "rate" not in rater.roles:
            raise Refused(403, f"{rater.rater_id!r} lacks the role 'rate'")
        # A cross-site form cannot send JSON without CORS: this keeps a proxy's cookies from voting.
        if request.method == "POST" and request.content_type != "application/json":
            raise Refused(415, "send the body as application/json")
        return rater

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except Refused as err:
            response = web.json_response({"error": str(err)}, status=err.status)
        except NotFound as err:
            response = web.json_response({"error": str(err)}, status=404)
        except (Conflict, ConflictingResubmission) as err:
            response = web.json_response({"error": str(err)}, status=409)
        except (CampaignError, InvalidFeedback) as err:
            response = web.json_response({"error": str(err)}, status=400)
        response.headers.update(HEADERS)
        return response

    async def file(self, request: web.Request) -> web.Response:
        name, content_type = FILES[request.path]
        return web.Response(text=(PAGE / name).read_text(), content_type=content_type)

    async def me(self, request: web.Request) -> web.Response:
        rater = self.rater(request)
        return web.json_response({"rater_id": rater.rater_id, "roles": rater.roles, "admin": rater.admin})

    async def campaigns_list(self, request: web.Request) -> web.Response:
        rater = self.rating(request)

        def listing():
            listed = [_campaign(c) | {"progress": asdict(self.campaigns.progress(c.campaign_id, rater.rater_id))}
                      for c in self.campaigns.list()]
            return [c for c in listed if c["progress"]["items"]]

        return web.json_response({"campaigns": await asyncio.to_thread(listing)})

    async def next(self, request: web.Request) -> web.Response:
        rater = self.rating(request)
        campaign_id = request.match_info["campaign"]
        item = await asyncio.to_thread(self.campaigns.next, campaign_id, rater.rater_id)
        return web.json_response(await self._state(campaign_id, rater, item))

    async def judge(self, request: web.Request) -> web.Response:
        rater = self.rating(request)
        campaign_id = request.match_info["campaign"]
        body = await self._body(request)
        campaign = await asyncio.to_thread(self.campaigns.get, campaign_id)
        item = await asyncio.to_thread(self.campaigns.item, campaign_id, _item_id(body))
        try:
            judgement = _judgement(body, item, campaign)
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidFeedback(f"not a judgement: {err}") from None
        validate(judgement, self.limits)
        row = to_row(judgement)
        row.campaign_id, row.item_id = campaign_id, item.item_id
        stored = await asyncio.to_thread(self.campaigns.judge, row, rater.rater_id)
        return web.json_response({"feedback_id": stored.row.feedback_id, "already_stored": stored.already_stored,
                                  **await self._state(campaign_id, rater, None)})

    async def skip(self, request: web.Request) -> web.Response:
        rater = self.rating(request)
        campaign_id = request.match_info["campaign"]
        body = await self._body(request)
        await asyncio.to_thread(self.campaigns.skip, campaign_id, rater.rater_id, _item_id(body))
        return web.json_response(await self._state(campaign_id, rater, None))

    async def undo(self, request: web.Request) -> web.Response:
        rater = self.rating(request)
        campaign_id = request.match_info["campaign"]
        item_id = await asyncio.to_thread(self.campaigns.undo, campaign_id, rater.rater_id)
        return web.json_response({"item_id": item_id, **await self._state(campaign_id, rater, None)})

    async def stats(self, request: web.Request) -> web.Response:
        rater = self.rater(request)
        if not rater.admin:
            raise Refused(403, f"{rater.rater_id!r} lacks the role 'admin' that agreement needs")
        stats = await asyncio.to_thread(agreement.of_campaign, self.campaigns, request.match_info["campaign"])
        return web.json_response(json_format.MessageToDict(stats, preserving_proto_field_name=True,
                                                           always_print_fields_with_no_presence=True))

    async def _state(self, campaign_id: str, rater: Rater, item: RatingItemRow | None) -> dict:
        progress = await asyncio.to_thread(self.campaigns.progress, campaign_id, rater.rater_id)
        return {"item": _item(item) if item is not None else None, "progress": asdict(progress)}

    @staticmethod
    async def _body(request: web.Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidFeedback("the body must be JSON") from None
        if not isinstance(body, dict):
            raise InvalidFeedback("the body must be a JSON object")
        return body

    def app(self) -> web.Application:
        application = web.Application(client_max_size=self.limits.max_text_bytes * (self.limits.max_responses + 2),
                                      middlewares=[self.middleware])
        application.add_routes([web.get(path, self.file) for path in FILES] + [
            web.get("/api/me", self.me),
            web.get("/api/campaigns", self.campaigns_list),
            web.get("/api/campaigns/{campaign}/next", self.next),
            web.post("/api/campaigns/{campaign}/judgements", self.judge),
            web.post("/api/campaigns/{campaign}/skip", self.skip),
            web.post("/api/campaigns/{campaign}/undo", self.undo),
            web.get("/api/campaigns/{campaign}/stats", self.stats),
        ])
        return application


def _item_id(body: dict) -> int:
    item_id = body.get("item_id")
    if not isinstance(item_id, int) or isinstance(item_id, bool):
        raise InvalidFeedback("item_id: an integer")
    return item_id


async def start(campaigns: Campaigns, limits: Limits, settings: FeedbackSettings) -> tuple[web.AppRunner, int]:
    """Serve the page (HTTPS with the service's tls_cert); returns the runner and the bound port."""
    # Server TLS only: raters log in with tokens, and browsers hold no client certificates.
    tls = ssl_context(settings.tls_cert, settings.tls_key, None)
    page = RaterPage(campaigns, limits, settings)
    runner, bound = await start_site(page.app(), settings.host, settings.rater_port, tls, settings=settings)
    log.info("rater page on %s://localhost:%d/", "https" if tls else "http", bound)
    return runner, bound
