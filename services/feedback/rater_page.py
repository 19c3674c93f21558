"""The rater page: a small HTTP app beside the gRPC server, on the same store.

GET /            the page (rater.html)
GET /api/next    the oldest unjudged item and how many are left
POST /api/feedback  {item_id, rater_id, choice | scores | correction} -> stored feedback

Feedback from the page goes through the same validation and storage as SubmitFeedback; its
id is `item-<item_id>-<rater_id>`, so a double submit is stored once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from aiohttp import web

from rlhf_mesh.clients.feedback import feedback
from rlhf_mesh.http_site import start_site
from rlhf_mesh.services.feedback.preferences import InvalidFeedback, Limits, to_row, validate
from rlhf_mesh.services.feedback.store import ConflictingResubmission, FeedbackStore
from rlhf_mesh.v1 import feedback_pb2

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("rater.html")
RATING_SCALE = (1.0, 5.0)


def _bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


def _feedback(body: dict, item) -> feedback_pb2.Feedback:
    """The page's JSON as a Feedback on `item` (ValueError for anything but one judgement)."""
    rater = str(body.get("rater_id") or "")
    correction = body.get("correction")
    return feedback(
        item.prompt, item.responses, rater_id=rater, feedback_id=f"item-{item.item_id}-{rater}"[:128],
        model_id=item.model_id, policy_version=item.policy_version, scale=RATING_SCALE,
        choice=int(body["choice"]) if "choice" in body else None,
        scores=[float(x) for x in body["scores"]] if "scores" in body else None,
        correction=(int(correction["response_index"]), str(correction["corrected_response"])) if correction else None,
    )


def app(store: FeedbackStore, limits: Limits) -> web.Application:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE.read_text(), content_type="text/html")

    async def next_item(request: web.Request) -> web.Response:
        item, remaining = await asyncio.to_thread(lambda: (store.next_item(), store.pending()))
        body = {"remaining": remaining}
        if item is not None:
            body["item"] = {"item_id": item.item_id, "prompt": item.prompt, "responses": item.responses}
        return web.json_response(body)

    async def submit(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            item = await asyncio.to_thread(store.item, int(body["item_id"]))
            if item is None:
                return _bad(f"no rating item {body['item_id']}")
            feedback = _feedback(body, item)
            validate(feedback, limits)
        except InvalidFeedback as err:
            return _bad(f"feedback: {err}")
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
            return _bad(f"not a feedback object: {err}")
        try:
            stored = await asyncio.to_thread(store.submit, to_row(feedback), item.item_id)
        except ConflictingResubmission as err:  # this rater judged this item differently before
            return web.json_response({"error": str(err)}, status=409)
        return web.json_response({"feedback_id": stored.row.feedback_id, "already_stored": stored.already_stored,
                                  "remaining": await asyncio.to_thread(store.pending)})

    application = web.Application(client_max_size=limits.max_text_bytes * (limits.max_responses + 2))
    application.add_routes([web.get("/", page), web.get("/api/next", next_item), web.post("/api/feedback", submit)])
    return application


async def start(store: FeedbackStore, limits: Limits, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the page; returns the runner (to clean up) and the bound port."""
    runner, bound = await start_site(app(store, limits), host, port)  # "::": IPv4 and IPv6
    log.info("rater page on http://localhost:%d/", bound)
    return runner, bound
