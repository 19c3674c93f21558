"""The GenerationService's OpenAI-compatible HTTP port (`http_port`): the API agent code already
speaks, on the same engine, queue bound, tokens and weight path as gRPC.

- `GET /v1/models`; `POST /v1/chat/completions` (messages of any role, tools and tool_choice
  parsed by vLLM's tool parsers, n, sampling, stop, seed, logprobs/top_logprobs, structured
  outputs, `stream: true` as server-sent events, vLLM's `return_token_ids`); `POST /v1/completions`.
- Sessions: a call that names one (header `X-Session-ID`, else the body's `user`) is recorded
  token-exact (services/generation/sessions.py). `GET /v1/sessions/{id}` shows it,
  `POST /v1/sessions/{id}/reward` (`{"reward", "call_id"?, "keep_open"?}`) rewards and closes it,
  `DELETE /v1/sessions/{id}` drops it.
Admission before work: the token is checked before the body is read (Generate's role for
generation and reading sessions, RewardSession's for rewards); the body is bounded by
max_message_bytes and parsed in a thread. Errors are OpenAI's shape: 400 naming the field, 401 /
403, 404 unknown model, path or session, 413, 415, 429 (queue full, too many sessions) with
Retry-After, 503 when the weights cannot be trusted. A client that goes away aborts its samples.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from prometheus_client import Counter
from vllm.entrypoints.generate.base.protocol import DeltaMessage, FunctionCall, ToolCall
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
)
from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList, UsageInfo

from rlhf_mesh.http_site import (
    Refused,
    caller,
    error_body,
    error_reply,
    parse_json,
    read_body,
    ssl_context,
    start_site,
)
from rlhf_mesh.security import TokenAuth
from rlhf_mesh.services.generation import sessions as recorded
from rlhf_mesh.services.generation.engine import PolicyEngine, QueueFull, SampleProgress
from rlhf_mesh.services.generation.openai_render import OpenAIRender
from rlhf_mesh.services.generation.prompts import Plan
from rlhf_mesh.services.generation.sessions import SESSION_ID
from rlhf_mesh.services.generation.settings import GenerationSettings

log = logging.getLogger(__name__)

GENERATE_METHOD = "/rlhf_mesh.v1.GenerationService/Generate"
READ_SESSION_METHOD = "/rlhf_mesh.v1.SessionService/GetSession"
REWARD_METHOD = "/rlhf_mesh.v1.SessionService/RewardSession"
RETRY_AFTER_S = "1"

REQUESTS = Counter("rlhf_mesh_generation_http_requests_total", "Calls of the OpenAI-compatible port, by "
                   "endpoint and HTTP status.", ["endpoint", "status"])


class OpenAIPort:
    """The OpenAI-compatible front door of one GenerationService."""

    def __init__(self, settings: GenerationSettings, engine: PolicyEngine, sessions: recorded.Sessions) -> None:
        self.settings, self.engine, self.sessions = settings, engine, sessions
        self.auth = TokenAuth(settings.tokens_file) if settings.tokens_file else None
        self.render = OpenAIRender(settings, engine)
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        application = web.Application()  # bodies are bounded by read_body
        application.router.add_get("/v1/models", self._endpoint("models", self.models, GENERATE_METHOD))
        application.router.add_post("/v1/chat/completions", self._endpoint("chat", self.chat, GENERATE_METHOD))
        application.router.add_post("/v1/completions", self._endpoint("completions", self.completions,
                                                                       GENERATE_METHOD))
        # The same under a session's own base URL, for agent code that only takes a base URL.
        application.router.add_get("/sessions/{session}/v1/models", self._endpoint("models", self.models,
                                                                                    GENERATE_METHOD))
        application.router.add_post("/sessions/{session}/v1/chat/completions",
                                    self._endpoint("chat", self.chat, GENERATE_METHOD))
        application.router.add_post("/sessions/{session}/v1/completions",
                                    self._endpoint("completions", self.completions, GENERATE_METHOD))
        application.router.add_get("/v1/sessions/{id}", self._endpoint("session", self.session, READ_SESSION_METHOD))
        application.router.add_delete("/v1/sessions/{id}", self._endpoint("session", self.drop, REWARD_METHOD))
        application.router.add_post("/v1/sessions/{id}/reward", self._endpoint("reward", self.reward,
                                                                               REWARD_METHOD))
        return application

    async def start(self, host: str, port: int) -> int:
        s = self.settings
        self.runner, bound = await start_site(self.app(), host, port, ssl_context(s.tls_cert, s.tls_key,
                                                                                  s.tls_client_ca),
                                              settings=s, cancel_on_disconnect=True)
        return bound

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def _endpoint(self, name: str, handler, method: str):
        """The handler behind the token check, with refusals as OpenAI errors, counted."""
        async def endpoint(request: web.Request) -> web.StreamResponse:
            try:
                who = caller(request, self.auth, method)
                response = await handler(request, who)
            except Refused as err:
                response = err.reply()
            except recorded.SessionError as err:
                response = error_reply(err.status, str(err), "session")
            if response.status == 429:
                response.headers["Retry-After"] = RETRY_AFTER_S
            REQUESTS.labels(name, str(response.status)).inc()
            return response
        return endpoint

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await read_body(request, self.settings.max_message_bytes)
        return await asyncio.to_thread(_json_object, raw)

    def _session_id(self, request: web.Request, user: str | None) -> str | None:
        session_id = request.match_info.get("session") or request.headers.get("X-Session-ID") or user
        if session_id is None:
            return None
        if not SESSION_ID.fullmatch(session_id):
            raise Refused(400, "a session id (X-Session-ID or user) is 1 to 256 visible ASCII characters",
                          param="user")
        if self.render.no_sessions:
            raise Refused(400, self.render.no_sessions, param="user")
        return session_id

    def _admit(self, request: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]],
               call: recorded.CallPlan | None) -> Plan:
        """The request's samples planned and queued, or a refusal that leaves no empty session behind."""
        try:
            plan = self.render.plan(request, prompts, record=call is not None)
            if self.engine.broken:
                raise Refused(503, f"not serving: {self.engine.broken}")
            try:
                self.engine.admit(plan)
            except QueueFull as err:
                raise Refused(429, f"generation queue is full ({err}); retry later") from None
        except Refused:
            if call is not None:
                self.sessions.abandon(call)
            raise
        return plan

    async def models(self, request: web.Request, who: str) -> web.Response:
        card = ModelCard(id=self.render.model_name, root=self.engine.path, owned_by="rlhf-mesh",
                         max_model_len=self.engine.limits.max_model_len)
        return web.json_response(ModelList(data=[card]).model_dump(mode="json"))

    async def chat(self, request: web.Request, who: str) -> web.StreamResponse:
        body = await self._body(request)
        chat: ChatCompletionRequest = await asyncio.to_thread(self.render.chat_request, body)
        session_id = self._session_id(request, chat.user)
        prompt_ids = await self.render.chat_prompt(chat)
        call = None
        if session_id is not None:
            messages = [dict(m) for m in chat.messages]
            call = self.sessions.plan(
                session_id, tuple(recorded.message_key(m) for m in messages), prompt_ids,
                lambda matched: self.render.follow(chat, messages[matched:]), chat.n or 1,
                self._new_tokens(chat, prompt_ids, session_id), self.render.eos_ids, self.render.end_of_message,
                messages)
            prompt_ids = call.prompt_ids
            chat = _imposed(chat, call.session)
        plan = self._admit(chat, [prompt_ids], call)
        reply = ChatReply(self, chat, plan, request_id=f"chatcmpl-{uuid.uuid4().hex}")
        if chat.stream:
            response = await reply.stream(request)
        else:
            response = web.json_response(await reply.whole())
        if call is not None and reply.finished:
            self.sessions.record(call, reply.id, reply.choices())
        return response

    def _new_tokens(self, request: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int],
                    session_id: str) -> int:
        """The most tokens each of a call's samples adds (bounds a session before it runs), with
        the cap the session's OpenSession imposes."""
        held = self.sessions.held(session_id)
        caps = [getattr(request, "max_completion_tokens", None) or request.max_tokens,
                held.sampling.get("max_tokens") if held is not None else None,
                max(1, self.engine.limits.max_model_len - len(prompt_ids))]
        return min(cap for cap in caps if cap is not None)

    async def completions(self, request: web.Request, who: str) -> web.StreamResponse:
        body = await self._body(request)
        completion: CompletionRequest = await asyncio.to_thread(self.render.completion_request, body)
        session_id = self._session_id(request, completion.user)
        prompts = self.render.completion_prompts(completion)
        call = None
        if session_id is not None:
            if len(prompts) != 1:
                raise Refused(400, "prompt: a session's call has one prompt", param="prompt")
            ids = prompts[0]
            call = self.sessions.plan(session_id, tuple(ids), ids, lambda matched: ids[matched:], completion.n or 1,
                                      self._new_tokens(completion, ids, session_id), self.render.eos_ids, None)
            prompts = [call.prompt_ids]
            completion = _imposed(completion, call.session)
        plan = self._admit(completion, prompts, call)
        reply = CompletionReply(self, completion, plan, request_id=f"cmpl-{uuid.uuid4().hex}")
        if completion.stream:
            response = await reply.stream(request)
        else:
            response = web.json_response(await reply.whole())
        if call is not None and reply.finished:
            self.sessions.record(call, reply.id, reply.choices())
        return response

    async def session(self, request: web.Request, who: str) -> web.Response:
        return web.json_response(recorded.describe(self.sessions.get(request.match_info["id"])))

    async def drop(self, request: web.Request, who: str) -> web.Response:
        self.sessions.drop(request.match_info["id"])
        return web.json_response({"id": request.match_info["id"], "dropped": True})

    async def reward(self, request: web.Request, who: str) -> web.Response:
        body = await self._body(request)
        value = body.get("reward")
        try:
            finite = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
        except OverflowError:  # an integer beyond any float
            finite = False
        if not finite:
            raise Refused(400, "reward: a finite number is required", param="reward")
        call_id, keep_open = body.get("call_id"), body.get("keep_open", False)
        if call_id is not None and not isinstance(call_id, str):
            raise Refused(400, "call_id: must be a string (a response id)", param="call_id")
        if not isinstance(keep_open, bool):
            raise Refused(400, "keep_open: must be true or false", param="keep_open")
        session = self.sessions.reward(request.match_info["id"], float(value), call_id, close=not keep_open)
        log.info("%s rewarded session %s%s: %g", who, session.id, f" call {call_id}" if call_id else "", value)
        return web.json_response({"id": session.id, "closed": session.closed, "branches": len(session.branches)})


def _imposed(request: Any, session: recorded.Session) -> Any:
    """The request with what its session's OpenSession imposes: temperature, top_p and top_k
    replaced, max_tokens capped, and seed + the session's samples so far as its seed."""
    sampling = session.sampling
    if not sampling:
        return request
    update = {key: sampling[key] for key in ("temperature", "top_p", "top_k") if key in sampling}
    if "max_tokens" in sampling:
        chat = hasattr(request, "max_completion_tokens")
        asked = (request.max_completion_tokens if chat else None) or request.max_tokens
        update["max_completion_tokens" if chat else "max_tokens"] = min(asked or sampling["max_tokens"],
                                                                        sampling["max_tokens"])
    if "seed" in sampling:
        update["seed"] = sampling["seed"] + session.samples
    session.samples += max(1, request.n or 1)
    return request.model_copy(update=update)


def _json_object(raw: bytes) -> dict[str, Any]:
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise Refused(400, "the body must be a JSON object")
    try:  # JSON's \\ud800 escapes make lone surrogates, which no tokenizer takes
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise Refused(400, "the body is not valid Unicode: it holds a lone surrogate (an unpaired \\ud800-\\udfff "
                           "escape)") from None
    return body


class _Reply:
    """The samples of one admitted call, gathered for a whole reply or streamed as events."""

    def __init__(self, port: OpenAIPort, request: Any, plan: Plan, request_id: str) -> None:
        self.port, self.request, self.plan, self.id = port, request, plan, request_id
        self.created = int(time.time())
        self.model = port.render.model_name
        self.samples = [SampleProgress() for _ in range(len(plan.prompt_ids) * plan.n)]
        self.finish: list[str | None] = [None] * len(self.samples)
        self.stop_reason: list[int | str | None] = [None] * len(self.samples)
        self.finished = False

    async def _outputs(self) -> AsyncIterator[tuple[int, SampleProgress, Any, list[int]]]:
        """(choice index, its progress, vLLM's completion output, its new ids) as they come."""
        async for prompt_index, sample_index, output in self.port.engine.outputs(self.plan):
            index = prompt_index * self.plan.n + sample_index
            sample = self.samples[index]
            completion = output.outputs[0]
            new = sample.add(completion)
            if output.finished:
                self.finish[index], self.stop_reason[index] = completion.finish_reason, completion.stop_reason
            yield index, sample, completion, new
        self.finished = True

    def usage(self) -> UsageInfo:
        prompt = sum(len(ids) for ids in self.plan.prompt_ids)
        completion = sum(len(s.token_ids) for s in self.samples)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            async for chunk in self._events():
                await response.write(f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n".encode())
            options = self.request.stream_options
            if options is not None and options.include_usage:
                await response.write(f"data: {json.dumps(self._usage_chunk())}\n\n".encode())
        except ConnectionResetError:  # the client went away: nothing more can reach it
            return response
        except Exception as err:  # the status line is sent: the error goes in the stream, as vLLM sends it
            if isinstance(err, Refused | recorded.SessionError):
                body = error_body(err.status, str(err), getattr(err, "param", None) or "session")
            else:
                log.exception("a streamed %s call failed", self.chunk_object)
                body = error_body(500, "internal error (the server's log has the details)")
            await response.write(f"data: {json.dumps(body)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _usage_chunk(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage().model_dump(mode="json")}


class ChatReply(_Reply):
    chunk_object = "chat.completion.chunk"

    def __init__(self, port: OpenAIPort, request: ChatCompletionRequest, plan: Plan, request_id: str) -> None:
        super().__init__(port, request, plan, request_id)
        self.messages: list[ChatMessage | None] = [None] * len(self.samples)
        named = isinstance(request.tool_choice, ChatCompletionNamedToolChoiceParam)
        self.parse_tools = bool(request.tools) and request.tool_choice != "none" and (
            port.render.auto_tools or named or request.tool_choice == "required")

    def _message(self, index: int) -> ChatMessage:
        """A finished choice's message: content, tool calls and reasoning as vLLM's parsers read them."""
        sample = self.samples[index]
        parser = self.port.render.parser(self.request, self.plan.prompt_ids[0])
        if parser is None:
            return ChatMessage(role="assistant", content=sample.text)
        reasoning, content, calls = parser.parse(sample.text, self.request,
                                                 enable_auto_tools=self.port.render.auto_tools,
                                                 model_output_token_ids=sample.token_ids)
        tool_calls = [ToolCall(id=c.id or f"call_{uuid.uuid4().hex[:24]}",
                               function=FunctionCall(name=c.name, arguments=c.arguments))
                      for c in (calls or [])] if self.parse_tools else []
        return ChatMessage(role="assistant", content=content if content or not tool_calls else None,
                           reasoning=reasoning if self.request.include_reasoning else None, tool_calls=tool_calls)

    def _finish_reason(self, index: int) -> str:
        message = self.messages[index]
        if message is not None and message.tool_calls and self.request.tool_choice in ("auto", "required", None):
            return "tool_calls"
        return self.finish[index] or "stop"

    def _logprobs(self, index: int, start: int = 0) -> ChatCompletionLogProbs | None:
        if not self.request.logprobs:
            return None
        sample = self.samples[index]
        return ChatCompletionLogProbs(content=[
            _chat_logprob(self.port, token, step, self.request.top_logprobs or 0)
            for token, step in zip(sample.token_ids[start:], sample.top_logprobs[start:], strict=True)])

    async def whole(self) -> dict[str, Any]:
        async for index, *_ in self._outputs():
            if self.finish[index] is not None:
                self.messages[index] = self._message(index)
        ids = self.request.return_token_ids
        choices = [ChatCompletionResponseChoice(
            index=i, message=self.messages[i], logprobs=self._logprobs(i), finish_reason=self._finish_reason(i),
            stop_reason=self.stop_reason[i], token_ids=self.samples[i].token_ids if ids else None)
            for i in range(len(self.samples))]
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage(),
            prompt_token_ids=self.plan.prompt_ids[0] if ids else None).model_dump(mode="json")

    async def _events(self) -> AsyncIterator[ChatCompletionStreamResponse]:
        ids = self.request.return_token_ids
        for i in range(len(self.samples)):  # the role first, as OpenAI sends it
            yield self._chunk(ChatCompletionResponseStreamChoice(
                index=i, delta=DeltaMessage(role="assistant", content="")),
                prompt_token_ids=self.plan.prompt_ids[0] if ids and i == 0 else None)
        parsers = [self.port.render.parser(self.request, self.plan.prompt_ids[0]) for _ in self.samples]
        async for index, sample, completion, new in self._outputs():
            start = len(sample.token_ids) - len(new)
            done = self.finish[index] is not None
            parser = parsers[index]
            if parser is None:
                delta = DeltaMessage(content=completion.text) if completion.text else None
            else:
                delta = parser.parse_delta(completion.text, new, self.request, self.plan.prompt_ids[0], finished=done)
                if delta is not None and not self.parse_tools:
                    delta.tool_calls = []
            if done:
                self.messages[index] = self._message(index)
            if delta is None and not done and not (ids and new):  # a parser holding text back
                continue
            choice = ChatCompletionResponseStreamChoice(
                index=index, delta=delta or DeltaMessage(), logprobs=self._logprobs(index, start),
                finish_reason=self._finish_reason(index) if done else None,
                stop_reason=self.stop_reason[index] if done else None, token_ids=new if ids else None)
            yield self._chunk(choice)

    def _chunk(self, choice: ChatCompletionResponseStreamChoice, **extra: Any) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(id=self.id, created=self.created, model=self.model, choices=[choice],
                                            **{k: v for k, v in extra.items() if v is not None})

    def choices(self) -> list[recorded.Choice]:
        found = []
        for i, sample in enumerate(self.samples):
            message = self.messages[i]
            reply = message.model_dump(mode="json", exclude_none=True)
            found.append(recorded.Choice(
                (recorded.message_key(reply),), sample.token_ids, sample.logprobs, sample.versions,
                self.finish[i] or "stop", message.content or "", reply))
        return found


class CompletionReply(_Reply):
    chunk_object = "text_completion"

    def _logprobs(self, index: int, start: int = 0) -> CompletionLogProbs | None:
        k = self.request.logprobs
        if k is None:
            return None
        sample = self.samples[index]
        tokens, chosen, tops = [], [], []
        for token, step in zip(sample.token_ids[start:], sample.top_logprobs[start:], strict=True):
            tokens.append(_token_text(self.port, token, step[token]))
            chosen.append(step[token].logprob)
            tops.append({_token_text(self.port, t, lp): lp.logprob for t, lp in step.items()} if k else None)
        return CompletionLogProbs(tokens=tokens, token_logprobs=chosen, top_logprobs=tops)

    async def whole(self) -> dict[str, Any]:
        async for _ in self._outputs():
            pass
        ids = self.request.return_token_ids
        choices = [CompletionResponseChoice(
            index=i, text=s.text, logprobs=self._logprobs(i), finish_reason=self.finish[i],
            stop_reason=self.stop_reason[i], token_ids=s.token_ids if ids else None,
            prompt_token_ids=self.plan.prompt_ids[i // self.plan.n] if ids else None)
            for i, s in enumerate(self.samples)]
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=self.usage()).model_dump(mode="json")

    async def _events(self) -> AsyncIterator[CompletionStreamResponse]:
        ids = self.request.return_token_ids
        sent_prompt = [False] * len(self.samples)
        async for index, sample, completion, new in self._outputs():
            done = self.finish[index] is not None
            if not new and not done:
                continue
            choice = CompletionResponseStreamChoice(
                index=index, text=completion.text, logprobs=self._logprobs(index, len(sample.token_ids) - len(new)),
                finish_reason=self.finish[index], stop_reason=self.stop_reason[index] if done else None,
                token_ids=new if ids else None,
                prompt_token_ids=self.plan.prompt_ids[index // self.plan.n] if ids and not sent_prompt[index]
                else None)
            sent_prompt[index] = True
            yield CompletionStreamResponse(id=self.id, created=self.created, model=self.model, choices=[choice])

    def choices(self) -> list[recorded.Choice]:
        return [recorded.Choice(tuple(s.token_ids), s.token_ids, s.logprobs, s.versions, self.finish[i] or "stop",
                                s.text) for i, s in enumerate(self.samples)]


def _token_text(port: OpenAIPort, token: int, logprob: Any) -> str:
    text = getattr(logprob, "decoded_token", None)
    return text if text is not None else port.engine.tokenizer.decode([token])


def _chat_logprob(port: OpenAIPort, token: int, step: dict, top: int) -> ChatCompletionLogProbsContent:
    text = _token_text(port, token, step[token])
    ranked = sorted(step.items(), key=lambda item: -item[1].logprob)[:top]
    return ChatCompletionLogProbsContent(
        token=text, logprob=step[token].logprob, bytes=list(text.encode("utf-8", "replace")),
        top_logprobs=[ChatCompletionLogProb(token=(t := _token_text(port, tid, lp)), logprob=lp.logprob,
                                            bytes=list(t.encode("utf-8", "replace"))) for tid, lp in ranked])
