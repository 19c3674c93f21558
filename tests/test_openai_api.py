"""The GenerationService's OpenAI-compatible port, driven by the official `openai` package as an
agent would, against a real server process (vLLM on the tiny policy, with a Hermes-style tool
template and vLLM's `hermes` tool parser), and its sessions read back over gRPC.

The tiny policy is random, so a tool call is sampled under a regex (vLLM's structured outputs)
and then read by the tool parser like any model's; the turn after it is free.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field

import grpc
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_mesh.clients.push import push_to_replicas
from rlhf_mesh.clients.session import SessionClient

from http_checks import FAMILIES, check_no_token_leaks, check_slow_clients_are_cut_off, error_of, exchange, request
from support import free_port, greedy, metric, perturbed, scrape, start_generation_server, write_tokens

pytestmark = pytest.mark.slow  # a vLLM engine

TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]
CALL_ADD = '<tool_call>\\n\\{"name": "add", "arguments": \\{"a": [0-9], "b": [0-9]\\}\\}\\n</tool_call>'
MAX_SESSIONS = 6
LOGPROB_TOLERANCE = 1e-4  # float32 on both sides, as in test_generation_service


@pytest.fixture(scope="module")
def front_door(tools_policy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai")
    tokens = write_tokens(folder / "tokens.yaml", agent=["generate"], app=["feedback"], trainer=["admin"],
                          harness=["generate", "feedback"])
    port = free_port()
    server = start_generation_server(
        tools_policy, folder / "server.log", "--http-port", str(port), "--tool-call-parser", "hermes",
        "--tokens-file", str(folder / "tokens.yaml"), "--max-sessions", str(MAX_SESSIONS),
        "--max-queued-samples", "16", "--http-header-timeout-s", "2", "--http-body-timeout-s", "2",
        "--http-idle-timeout-s", "3", max_model_len=1024)
    server.http_port, server.tokens = port, tokens
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def agent(front_door):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{front_door.http_port}/v1",
                         api_key=front_door.tokens["agent"], timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def sessions(front_door):
    with SessionClient(front_door.address, token=front_door.tokens["harness"], timeout_s=60) as client:
        yield client


@pytest.fixture(scope="module")
def policy(tools_policy):
    return AutoModelForCausalLM.from_pretrained(tools_policy).eval()


@dataclass
class Reply:
    """One choice of a call, as the agent sees it (streamed or whole)."""

    id: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)

    def message(self) -> dict:
        """The assistant message an agent appends to its history."""
        message = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


def ask(agent, messages, session: str | None = None, stream: bool = False, regex: str | None = None,
        **params) -> Reply:
    extra_body = {"return_token_ids": True, **({"structured_outputs": {"regex": regex}} if regex else {})}
    headers = {"X-Session-ID": session} if session else None
    params = {"model": agent.models.list().data[0].id, "messages": messages, "extra_body": extra_body,
              "extra_headers": headers, **params}
    reply = Reply()
    if not stream:
        response = agent.chat.completions.create(**params)
        choice = response.choices[0]
        message = choice.message
        reply.id, reply.content, reply.finish_reason = response.id, message.content or "", choice.finish_reason
        reply.tool_calls = [c.model_dump() for c in message.tool_calls or []]
        reply.token_ids, reply.prompt_token_ids = choice.token_ids, response.prompt_token_ids
        return reply
    for chunk in agent.chat.completions.create(stream=True, **params):
        reply.id = chunk.id
        reply.prompt_token_ids += getattr(chunk, "prompt_token_ids", None) or []
        for choice in chunk.choices:
            delta = choice.delta
            reply.content += delta.content or ""
            reply.token_ids += getattr(choice, "token_ids", None) or []
            reply.finish_reason = choice.finish_reason or reply.finish_reason
            for call in delta.tool_calls or []:  # OpenAI's stream: by index, arguments in pieces
                while len(reply.tool_calls) <= call.index:
                    reply.tool_calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                known = reply.tool_calls[call.index]
                known["id"] = call.id or known["id"]
                known["function"]["name"] += call.function.name or ""
                known["function"]["arguments"] += call.function.arguments or ""
    return reply


def _http(front_door, method: str, path: str, body: dict | None = None, token: str | None = None):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token or front_door.tokens['agent']}", "Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{front_door.http_port}{path}", data,
                                                           headers, method=method), timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _forward_logprobs(policy, ids: list[int], start: int, end: int) -> torch.Tensor:
    """log_softmax of the policy's logits for tokens [start, end) of `ids`."""
    with torch.no_grad():
        logits = policy(torch.tensor([ids[:end]])).logits[0, start - 1:end - 1]
    return torch.log_softmax(logits, -1)[torch.arange(end - start), ids[start:end]]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_three_turn_tool_conversation_is_recorded_token_exact(agent, sessions, policy, tools_policy, stream):
    """Two tool calls (parsed by vLLM's hermes parser) and an answer, in one session: one branch,
    whose sampled spans are exactly the ids the engine returned, whose prompts are the template's
    render of each turn's messages (but keep the sampled ids), and whose log-probs are the
    policy's own (the constrained turns' at least: the grammar renormalizes over what it allows)."""
    session = f"tools-{'streamed' if stream else 'whole'}"
    tokenizer = AutoTokenizer.from_pretrained(tools_policy)
    messages = [{"role": "user", "content": "Add 2 and 3, then add 4."}]
    replies, rendered = [], []
    for turn in range(3):
        rendered.append(tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False,
                                                      add_generation_prompt=True))
        reply = ask(agent, messages, session, stream, regex=CALL_ADD if turn < 2 else None, tools=TOOLS,
                    max_tokens=100 if turn < 2 else 12, temperature=1.0, seed=turn)
        replies.append(reply)
        messages.append(reply.message())
        if turn < 2:
            assert reply.finish_reason == "tool_calls" and reply.content == ""
            (call,) = reply.tool_calls
            arguments = json.loads(call["function"]["arguments"])
            assert call["function"]["name"] == "add" and set(arguments) == {"a", "b"} and call["id"]
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": str(sum(arguments.values()))})
        else:
            assert reply.tool_calls == [] and reply.finish_reason in ("stop", "length")

    got = sessions.get(session)
    assert not got.closed and got.fork_count == 0 and len(got.episodes) == 1
    episode = got.episodes[0]
    ids = list(episode.token_ids)
    assert len(episode.turns) == 3 and episode.prompt_length == len(replies[0].prompt_token_ids)
    mask = [0] * len(ids)
    for turn, reply, text in zip(episode.turns, replies, rendered, strict=True):
        assert ids[turn.start:turn.sampled_end] == reply.token_ids  # what the engine sampled, as it sampled it
        assert ids[:turn.start] == reply.prompt_token_ids  # the prompt the model saw
        assert tokenizer.decode(ids[:turn.start]) == text  # says what a fresh render says
        mask[turn.start:turn.sampled_end] = [1] * (turn.sampled_end - turn.start)
    assert list(episode.loss_mask) == mask and set(episode.policy_versions) == {0}
    free = episode.turns[2]
    expected = _forward_logprobs(policy, ids, free.start, free.sampled_end)
    recorded = torch.tensor(list(episode.logprobs[free.start:free.sampled_end]))
    assert torch.allclose(recorded, expected, atol=LOGPROB_TOLERANCE)
    for turn in episode.turns[:2]:
        unconstrained = _forward_logprobs(policy, ids, turn.start, turn.sampled_end)
        recorded = torch.tensor(list(episode.logprobs[turn.start:turn.sampled_end]))
        assert bool((recorded >= unconstrained - LOGPROB_TOLERANCE).all()) and bool((recorded <= 0).all())
        assert not torch.allclose(recorded, unconstrained, atol=LOGPROB_TOLERANCE)


def test_streamed_and_whole_replies_agree(agent):
    messages = [{"role": "user", "content": "Hello there"}]
    whole = ask(agent, messages, max_tokens=16, temperature=1.0, seed=7)
    streamed = ask(agent, messages, stream=True, max_tokens=16, temperature=1.0, seed=7)
    assert (streamed.content, streamed.token_ids, streamed.finish_reason) == (
        whole.content, whole.token_ids, whole.finish_reason)
    assert streamed.prompt_token_ids == whole.prompt_token_ids


def test_logprobs_and_top_logprobs_are_the_policys(agent, policy):
    messages = [{"role": "user", "content": "Tell me about the river."}]
    response = agent.chat.completions.create(
        model=agent.models.list().data[0].id, messages=messages, max_tokens=8, temperature=1.0, seed=3,
        logprobs=True, top_logprobs=3, extra_body={"return_token_ids": True})
    choice = response.choices[0]
    ids = [*response.prompt_token_ids, *choice.token_ids]
    start = len(response.prompt_token_ids)
    expected = _forward_logprobs(policy, ids, start, len(ids))
    content = choice.logprobs.content
    assert len(content) == len(choice.token_ids) and all(len(c.top_logprobs) == 3 for c in content)
    assert torch.allclose(torch.tensor([c.logprob for c in content]), expected, atol=LOGPROB_TOLERANCE)
    for entry in content:  # the top three, best first, and the sampled token among them where it ranks there
        ranked = [t.logprob for t in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True) and entry.logprob <= ranked[0] + 1e-6


def test_a_rewound_or_rewritten_history_forks(agent, sessions, front_door):
    """Continuing the newest call grows a branch; continuing an earlier call forks one that shares
    its prefix; a history that continues no call (an earlier message changed) starts afresh."""
    session = "forks"
    first = [{"role": "user", "content": "Tell me a story."}]
    one = ask(agent, first, session, max_tokens=6, seed=1)
    two = ask(agent, [*first, one.message(), {"role": "user", "content": "Go on."}], session, max_tokens=6, seed=2)
    three = ask(agent, [*first, one.message(), {"role": "user", "content": "Shorter."}], session, max_tokens=6,
                seed=3)
    four = ask(agent, [{"role": "user", "content": "Tell me a poem."}, one.message(),
                       {"role": "user", "content": "Go on."}], session, max_tokens=6, seed=4)
    got = sessions.get(session)
    assert got.fork_count == 2 and len(got.episodes) == 3
    grown, rewound, rewritten = got.episodes
    assert [list(grown.token_ids[t.start:t.sampled_end]) for t in grown.turns] == [one.token_ids, two.token_ids]
    assert [list(rewound.token_ids[t.start:t.sampled_end]) for t in rewound.turns] == [one.token_ids,
                                                                                      three.token_ids]
    shared = grown.turns[0].sampled_end
    assert rewound.token_ids[:shared] == grown.token_ids[:shared] and rewound.loss_mask[:shared] == \
        grown.loss_mask[:shared]
    assert len(rewritten.turns) == 1 and list(rewritten.token_ids) == four.prompt_token_ids + four.token_ids
    status, refused = _http(front_door, "GET", f"/v1/sessions/{session}")  # agents read no sessions
    assert status == 403 and "feedback" in refused["error"]["message"]
    status, described = _http(front_door, "GET", f"/v1/sessions/{session}", token=front_door.tokens["app"])
    assert status == 200 and described["forks"] == 2
    assert [(b["forked_from"], b["rewritten"]) for b in described["branches"]] == [
        (None, False), ({"branch": 0, "call": 0}, False), (None, True)]
    assert _http(front_door, "DELETE", f"/v1/sessions/{session}", token=front_door.tokens["app"])[0] == 200


def test_rewards_close_a_session_and_it_is_taken_once(agent, front_door):
    session = "rewarded"
    messages = [{"role": "user", "content": "Hi."}]
    first = ask(agent, messages, session, max_tokens=4)
    ask(agent, [*messages, first.message(), {"role": "user", "content": "And?"}], session, max_tokens=4)
    app = front_door.tokens["app"]
    status, body = _http(front_door, "POST", f"/v1/sessions/{session}/reward", {"reward": 0.5, "call_id": first.id,
                                                                                "keep_open": True}, token=app)
    assert status == 200 and body == {"id": session, "closed": False, "branches": 1}
    status, body = _http(front_door, "POST", f"/v1/sessions/{session}/reward", {"reward": 0.5}, token=None)
    assert status == 403 and "feedback" in body["error"]["message"]  # an agent does not reward itself
    with SessionClient(front_door.address, token=app) as rater:
        assert rater.reward(session, 1.0).closed
    with pytest.raises(openai.BadRequestError, match="closed"):
        ask(agent, messages, session, max_tokens=4)
    with SessionClient(front_door.address, token=front_door.tokens["agent"]) as agent_client, \
            pytest.raises(grpc.RpcError) as refused:
        list(agent_client.take(wait_s=0))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with SessionClient(front_door.address, token=front_door.tokens["harness"]) as learner:
        (taken,) = [t for t in learner.take(wait_s=0) if t.session_id == session]
        (episode,) = taken.episodes
        assert episode.reward == 1.0 and [t.reward for t in episode.turns] == [0.5, 0.0]
        assert [t.HasField("reward") for t in episode.turns] == [True, False]
        assert session not in [t.session_id for t in learner.take(wait_s=0)]
        with pytest.raises(grpc.RpcError) as gone:
            learner.get(session)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_bad_requests_get_openai_errors(agent, front_door):
    model = agent.models.list().data[0].id
    hello = [{"role": "user", "content": "Hello"}]
    cases = [
        (openai.NotFoundError, dict(model="nope"), "does not exist"),
        (openai.BadRequestError, dict(n=0), "n must be in"),
        (openai.BadRequestError, dict(max_tokens=5000), "max_model_len"),
        (openai.BadRequestError, dict(max_tokens=1020), "maximum context length"),
        (openai.BadRequestError, dict(tool_choice="required"), "tool"),
        (openai.BadRequestError, dict(seed=2**70), "seed"),
        (openai.BadRequestError, dict(extra_body={"use_beam_search": True}), "not supported"),
        (openai.RateLimitError, dict(n=17), "max_queued_samples"),
    ]
    for error, params, words in cases:
        with pytest.raises(error, match=words) as refused:
            agent.chat.completions.create(**{"model": model, "messages": hello, "max_tokens": 4, **params})
        assert set(refused.value.body) == {"message", "type", "param", "code"}
        assert refused.value.body["code"] == refused.value.status_code
    with pytest.raises(openai.RateLimitError):  # a refused first call leaves no empty session behind
        agent.chat.completions.create(model=model, messages=hello, max_tokens=4, n=17, user="refused")
    assert _http(front_door, "GET", "/v1/sessions/refused", token=front_door.tokens["app"])[0] == 404
    base = f"http://127.0.0.1:{front_door.http_port}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.PermissionDeniedError, match="generate"):
        openai.OpenAI(base_url=base, api_key=front_door.tokens["app"], max_retries=0).models.list()
    assert _http(front_door, "POST", "/v1/sessions/none/reward", {"reward": 1}, front_door.tokens["app"])[0] == 404
    for reward in ("high", 10**400, None):
        status, body = _http(front_door, "POST", "/v1/sessions/none/reward", {"reward": reward},
                             front_door.tokens["app"])
        assert status == 400 and body["error"]["param"] == "reward", reward
    # Sessions are bounded: past max_sessions a new one is refused with 429 until some go.
    opened = []
    with pytest.raises(openai.RateLimitError, match="max_sessions") as full:
        for i in range(MAX_SESSIONS + 1):
            ask(agent, hello, f"bound-{i}", max_tokens=1)
            opened.append(f"bound-{i}")
    assert full.value.response.headers["Retry-After"] == "1"
    for session in opened:
        assert _http(front_door, "DELETE", f"/v1/sessions/{session}", token=front_door.tokens["app"])[0] == 200
    text = scrape(front_door)
    assert metric(text, "rlhf_mesh_generation_http_requests_total", endpoint="chat", status="429") >= 2
    assert metric(text, "rlhf_mesh_generation_http_requests_total", endpoint="chat", status="404") >= 1


@pytest.mark.parametrize("host", FAMILIES)
def test_hostile_input_gets_a_clean_refusal(front_door, host):
    token = front_door.tokens["agent"]
    path = "/v1/chat/completions"

    def post(body: bytes, **options) -> tuple[int | None, bytes]:
        status, _, reply = exchange(host, front_door.http_port, request(path, body, token=token, **options))
        return status, reply

    hello = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    status, body = post(json.dumps(hello).encode())
    assert status == 200 and json.loads(body)["choices"][0]["message"]["role"] == "assistant"
    hostile = [
        (b'{"messages": [{"role": "user", "content": "a\\ud800"}], "max_tokens": 2}', {}, 400, "surrogate"),
        (json.dumps({**hello, "n": 10**30}).encode(), {}, 400, "n must be in"),
        (json.dumps({**hello, "max_tokens": 10**30}).encode(), {}, 400, "max"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', {}, 400, "temperature"),
        (b'{"messages": [{"role": "user", "content": "x"}], "n": 1' + b"1" * 4400 + b"}", {}, 400, "4300 digits"),
        (b'{"messages": ' + b"[" * 1000 + b"]" * 1000 + b"}", {}, 400, "nested too deeply"),
        (b"[1, 2]", {}, 400, "JSON object"),
        (b'{"messages": "hi"}', {}, 400, "messages"),
        (json.dumps(hello).encode(), {"content_type": "text/plain"}, 415, "application/json"),
        (json.dumps(hello).encode(), {"headers": b"X-Session-ID: a b\r\n"}, 400, "session id"),
        (json.dumps({**hello, "user": "x" * 300}).encode(), {}, 400, "session id"),
    ]
    for body, options, expected, words in hostile:
        status, reply = post(body, **options)
        assert status == expected and words in error_of(status, reply), (body[:80], status, reply[:300])
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip: 70 MiB of text from 70 KiB
    bomb = deflate.compress(b'{"messages": [{"role": "user", "content": "') + b"".join(
        deflate.compress(b"a" * (1 << 20)) for _ in range(70)) + deflate.compress(b'"}]}') + deflate.flush()
    status, reply = post(bomb, headers=b"Content-Encoding: gzip\r\n")
    assert status == 413 and "once inflated" in error_of(413, reply)
    check_no_token_leaks(host, front_door.http_port, token, path, front_door.log_path)


def test_slow_clients_are_cut_off(front_door):
    check_slow_clients_are_cut_off("::1", front_door.http_port, "/v1/chat/completions", front_door.tokens["agent"])


def test_text_completions_record_sessions_by_token_ids(agent, sessions):
    model = agent.models.list().data[0].id
    first = agent.completions.create(model=model, prompt=[5, 6, 7, 8], max_tokens=5, seed=1, user="text",
                                     extra_body={"return_token_ids": True})
    ids = [5, 6, 7, 8, *first.choices[0].token_ids]
    second = agent.completions.create(model=model, prompt=[*ids, 9, 10], max_tokens=5, seed=2, user="text",
                                      logprobs=2, extra_body={"return_token_ids": True})
    assert len(second.choices[0].logprobs.top_logprobs) == 5
    (episode,) = sessions.get("text").episodes
    assert list(episode.token_ids) == [*ids, 9, 10, *second.choices[0].token_ids]
    assert list(episode.loss_mask) == [0] * 4 + [1] * 5 + [0] * 2 + [1] * 5


def test_a_session_outlives_a_weight_push(agent, sessions, front_door, tools_policy):
    """Last in this module: it changes the served weights. A session's tokens carry the version
    that sampled them, and the call after the push is the pushed model's own greedy output."""
    session = "pushed"
    messages = [{"role": "user", "content": "Hello there"}]
    before = ask(agent, messages, session, max_tokens=8, temperature=0)
    model = perturbed(tools_policy, 1)
    (result,) = push_to_replicas(front_door.address, model, 1, token=front_door.tokens["trainer"])
    assert result.error is None
    after = ask(agent, [*messages, before.message(), {"role": "user", "content": "Again."}], session, max_tokens=8,
                temperature=0)
    assert after.token_ids == greedy(model, after.prompt_token_ids, len(after.token_ids))
    (episode,) = sessions.get(session).episodes
    first, second = episode.turns
    versions = list(episode.policy_versions)
    assert versions[first.start:first.sampled_end] == [0] * len(before.token_ids)
    assert versions[second.start:second.sampled_end] == [1] * len(after.token_ids)
    assert not math.isnan(sum(episode.logprobs))
