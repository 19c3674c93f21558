"""The rater page: an HTTP app beside the gRPC server, on the same store and campaigns.

Every /api call needs an identity: a bearer token of the tokens file (its `name` is the
rater id; role `rate`, or `admin`), or the header a trusted authenticating proxy sets
(`rater_identity_header`; role `rate`). No identity is 401, the wrong role 403. Bodies are
checked strictly (pydantic, no coercion: `"1"`, `true` or `0.9` is not a choice); every error
is `{"error": {"message", "type", "param", "code"}}`, `param` naming the field at fault.

GET  /                                      the page (page/index.html, rater.js, rater.css)
GET  /api/me                                who you are
GET  /api/campaigns                         campaigns, guidelines (as HTML), progress
GET  /api/campaigns/{id}/next               the item you hold or the next one, and progress
POST /api/campaigns/{id}/judgements         {item_id, choice | scores | correction | tie | both_bad}
POST /api/campaigns/{id}/skip               {item_id}
POST /api/campaigns/{id}/undo               reopens your last judged or skipped item
GET  /api/campaigns/{id}/stats              agreement (admin)

Markdown is rendered on the server with raw HTML off and unsafe link schemes refused
(markdown-it-py), links open in a new tab with the host they lead to shown beside them, bidi
controls are shown as their code points instead of reordering the text, and the page's
Content-Security-Policy allows only its own script: model output is untrusted.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from aiohttp import web
from google.protobuf import json_format
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlhf_mesh.clients.feedback import feedback
from rlhf_mesh.http_site import error_reply, ssl_context, start_site
from rlhf_mesh.security import TokenAuth, bearer_token
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
# Embeddings, overrides, isolates and marks: U+202E shows "gpj.exe" as "exe.jpg".
BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
MAX_ID = 2**63 - 1  # the largest id the store's databases hold


def _link_open(renderer, tokens, idx, options, env) -> str:
    # A click opens a new tab that cannot reach back to the page, and sends no referrer.
    tokens[idx].attrSet("target", "_blank")
    tokens[idx].attrSet("rel", "noopener noreferrer")
    env.setdefault("links", []).append(tokens[idx].attrGet("href"))
    return renderer.renderToken(tokens, idx, options, env)


def _link_close(renderer, tokens, idx, options, env) -> str:
    # The text of a link may say anything ("paypal.com"); the host beside it is where it goes
    # (markdown-it has written a non-ASCII host in punycode: xn--...).
    href = env["links"].pop()
    where = urlsplit(href).netloc.rpartition("@")[2] or href
    return f'</a> <span class="link-host">({escapeHtml(where)})</span>'


MARKDOWN.add_render_rule("link_open", _link_open)
MARKDOWN.add_render_rule("link_close", _link_close)


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ItemBody(_Body):
    item_id: Annotated[int, Field(ge=1, le=MAX_ID)]


class CorrectionBody(_Body):
    response_index: Annotated[int, Field(ge=0)]
    corrected_response: str


class JudgementBody(ItemBody):
    """POST .../judgements: exactly one of the judgements."""

    choice: Annotated[int, Field(ge=0)] | None = None
    scores: list[int] | None = None
    correction: CorrectionBody | None = None
    tie: bool = False
    both_bad: bool = False


@dataclass(frozen=True)
class Rater:
    rater_id: str
    roles: tuple[str, ...]

    @property
    def admin(self) -> bool:
        return "admin" in self.roles


class Refused(Exception):
    """An HTTP error with its status, message and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def reply(status: int, message: str, param: str | None = None) -> web.Response:
    """An error of the page's API (and of the site beneath it: 404, 405, 413, a malformed request)."""
    response = error_reply(status, message, param)
    response.headers.update(HEADERS)
    return response


def visible(text: str) -> str:
    return BIDI_CONTROLS.sub(lambda m: f"[U+{ord(m.group()):04X}]", text)


def render(text: str) -> str:
    return visible(MARKDOWN.render(text, {}))


def _item(item: RatingItemRow) -> dict:
    return {"item_id": item.item_id, "prompt_html": render(item.prompt),
            "responses_html": [render(r) for r in item.responses], "responses": item.responses}


def _campaign(row: CampaignRow) -> dict:
    return {"campaign_id": row.campaign_id, "title": visible(row.title), "guidelines_html": render(row.guidelines),
            "judgements": row.judgements, "rating_scale": row.rating_scale,
            "judgements_per_item": row.judgements_per_item}


def _field(loc: tuple) -> str:
    """pydantic's location as the field's name in the body: scores[1], correction.response_index."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else part
    return name


def parse(model: type[_Body], raw: bytes) -> _Body:
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors(include_url=False, include_input=False)[0]
        field = _field(first["loc"])
        raise Refused(400, f"{field or 'the body'}: {first['msg']}", field or None) from None


def _index(name: str, index: int, item: RatingItemRow) -> int:
    if index >= len(item.responses):
        raise Refused(400, f"{name} {index} is not a response index (there are {len(item.responses)})", name)
    return index


def _judgement(body: JudgementBody, item: RatingItemRow, campaign: CampaignRow):
    """The body as a Feedback on `item`, of a kind the campaign asks for."""
    given = [name for name, value in (("choice", body.choice), ("scores", body.scores),
                                      ("correction", body.correction)) if value is not None]
    given += [name for name in ("tie", "both_bad") if getattr(body, name)]
    if len(given) != 1:
        raise Refused(400, "give exactly one of choice, scores, correction, tie, both_bad")
    kind = {"scores": "rating"}.get(given[0], given[0])
    if kind not in campaign.judgements:
        raise Refused(400, f"campaign {campaign.campaign_id!r} does not ask for {kind}", given[0])
    for i, score in enumerate(body.scores or ()):
        if not 1 <= score <= campaign.rating_scale:
            raise Refused(400, f"scores[{i}] = {score} is outside the scale 1 to {campaign.rating_scale}",
                          f"scores[{i}]")
    correction = body.correction
    return feedback(
        item.prompt, item.responses, rater_id="-", model_id=item.model_id, policy_version=item.policy_version,
        scale=(1.0, float(campaign.rating_scale)),
        choice=_index("choice", body.choice, item) if kind == "choice" else None,
        scores=[float(x) for x in body.scores] if kind == "rating" else None,
        correction=(_index("correction.response_index", correction.response_index, item),
                    correction.corrected_response) if kind == "correction" else None,
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
        # The token is never logged nor put in a reply.
        token = bearer_token(request.headers.get("Authorization", ""))
        if token is not None and self.auth is not None:
            holder = self.auth.holder(token)
            if holder is None:
                raise Refused(401, "invalid token")
            return Rater(holder.name, tuple(holder.roles))
        proxied = self.settings.rater_identity_header
        name = request.headers.get(proxied, "").strip() if proxied else ""
        if name:
            if len(name) > 256:
                raise Refused(400, f"{proxied}: longer than 256 characters", proxied)
            if not name.isprintable():  # a control character, or bytes that are not UTF-8
                raise Refused(400, f"{proxied}: not printable UTF-8 text", proxied)
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
            return reply(err.status, str(err), err.param)
        except NotFound as err:
            return reply(404, str(err))
        except (Conflict, ConflictingResubmission) as err:
            return reply(409, str(err))
        except (CampaignError, InvalidFeedback) as err:
            return reply(400, str(err))
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
        body = parse(JudgementBody, await request.read())
        campaign = await asyncio.to_thread(self.campaigns.get, campaign_id)
        item = await asyncio.to_thread(self.campaigns.item, campaign_id, body.item_id)
        judgement = _judgement(body, item, campaign)
        validate(judgement, self.limits)
        row = to_row(judgement)
        row.campaign_id, row.item_id = campaign_id, item.item_id
        stored = await asyncio.to_thread(self.campaigns.judge, row, rater.rater_id)
        return web.json_response({"feedback_id": stored.row.feedback_id, "already_stored": stored.already_stored,
                                  **await self._state(campaign_id, rater, None)})

    async def skip(self, request: web.Request) -> web.Response:
        rater = self.rating(request)
        campaign_id = request.match_info["campaign"]
        body = parse(ItemBody, await request.read())
        await asyncio.to_thread(self.campaigns.skip, campaign_id, rater.rater_id, body.item_id)
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


async def start(campaigns: Campaigns, limits: Limits, settings: FeedbackSettings) -> tuple[web.AppRunner, int]:
    """Serve the page (HTTPS with the service's tls_cert); returns the runner and the bound port."""
    # Server TLS only: raters log in with tokens, and browsers hold no client certificates.
    tls = ssl_context(settings.tls_cert, settings.tls_key, None)
    page = RaterPage(campaigns, limits, settings)
    runner, bound = await start_site(page.app(), settings.host, settings.rater_port, tls, settings=settings,
                                     reply=reply)
    log.info("rater page on %s://localhost:%d/", "https" if tls else "http", bound)
    return runner, bound
