"""OpenAI API requests on the policy engine, with vLLM's own pieces: its request models (every
field `vllm serve` takes, validated the same way), its chat renderer (templates, tools, content
parts) and its tool and reasoning parsers (`tool_call_parser`, `reasoning_parser`). Requests
become a `Plan` of token ids for `PolicyEngine.outputs`, so both front doors share one engine,
one queue bound and one weight path.
"""

from __future__ import annotations

import collections
import json
import logging
from typing import Any

from pydantic import ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.exceptions import VLLMClientError
from vllm.renderers.online_renderer import OnlineRenderer
from vllm.sampling_params import SamplingParams

from rlhf_mesh.chat_tokens import ChatTokens, TemplateError
from rlhf_mesh.http_site import Refused
from rlhf_mesh.services.generation.engine import PolicyEngine
from rlhf_mesh.services.generation.prompts import Plan
from rlhf_mesh.services.generation.settings import GenerationSettings

log = logging.getLogger(__name__)

# Fields of vLLM's request models this server does not serve (it samples; it does not score prompts).
_UNSUPPORTED = ("use_beam_search", "echo", "prompt_logprobs", "prompt_embeds", "suffix")


def _invalid(err: ValidationError) -> Refused:
    """A pydantic refusal as OpenAI's 400: the first error, and its field as `param`."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return Refused(400, message, param=where or None)


class OpenAIRender:
    """Requests of the OpenAI API -> token ids and sampling parameters; sampled text -> messages."""

    def __init__(self, settings: GenerationSettings, engine: PolicyEngine) -> None:
        llm = engine.llm
        self.engine = engine
        self.model_name = settings.served_model_name or settings.model
        self.online = OnlineRenderer(
            llm.model_config, llm.renderer, request_logger=None, chat_template=None,
            chat_template_content_format="auto", enable_auto_tools=settings.tool_call_parser is not None,
            tool_parser=settings.tool_call_parser, reasoning_parser=settings.reasoning_parser)
        self.parser_cls = self.online.parser
        self.auto_tools = settings.tool_call_parser is not None
        self.defaults = llm.model_config.get_diff_sampling_param()
        self.eos_ids = set(engine.info().eos_token_ids)
        self._follow: collections.OrderedDict[str, ChatTokens] = collections.OrderedDict()
        try:  # sessions need a template that ends an assistant message with an EOS token
            self.end_of_message: int | None = ChatTokens(engine.tokenizer, sorted(self.eos_ids), None).end_of_message
            self.no_sessions = ""
        except TemplateError as err:
            self.end_of_message, self.no_sessions = None, f"sessions are not served for this model: {err}"

    def chat_request(self, body: dict) -> ChatCompletionRequest:
        return self._request(ChatCompletionRequest, body)

    def completion_request(self, body: dict) -> CompletionRequest:
        return self._request(CompletionRequest, body)

    def _request(self, model: type, body: dict) -> Any:
        for name in _UNSUPPORTED:
            if body.get(name):
                raise Refused(400, f"{name} is not supported by this server", param=name)
        try:
            request = model.model_validate(body)
        except ValidationError as err:
            raise _invalid(err) from None
        except VLLMClientError as err:  # raised by vLLM's own validators
            raise Refused(400, str(err), param=getattr(err, "parameter", None)) from None
        if request.model not in (None, self.model_name):
            raise Refused(404, f"The model `{request.model}` does not exist.", param="model")
        return request

    async def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        """The prompt ids `vllm serve` would give the request (template, tools, generation prompt)."""
        try:
            result = await self.online.render_chat(request)
        except VLLMClientError as err:  # vLLM's own checks of the request (lengths, tools, parameters)
            raise Refused(400, str(err), param=getattr(err, "parameter", None)) from None
        except (ValueError, TypeError, KeyError, TemplateError) as err:  # the template refused the messages
            raise Refused(400, f"messages: the chat template cannot render them: {err}", param="messages") from None
        except Exception as err:  # jinja2's own errors (undefined names, raise_exception in templates)
            if type(err).__module__.startswith("jinja2"):
                raise Refused(400, f"messages: the chat template cannot render them: {err}",
                              param="messages") from None
            raise
        if isinstance(result, ErrorResponse):
            raise Refused(result.error.code, result.error.message, param=result.error.param)
        return list(result[1][0]["prompt_token_ids"])

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        if prompt is None or prompt == [] or prompt == "":
            raise Refused(400, "prompt: a text, a list of token ids or a list of either is required", param="prompt")
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        prompts = []
        vocab = self.engine.limits.vocab_size
        for i, item in enumerate(prompt):
            ids = list(self.engine.tokenizer.encode(item, add_special_tokens=True)) if isinstance(item, str) else item
            if not ids:
                raise Refused(400, f"prompt[{i}]: empty", param="prompt")
            if max(ids) >= vocab:
                raise Refused(400, f"prompt[{i}]: token id {max(ids)} is outside the vocabulary ({vocab})",
                              param="prompt")
            prompts.append(ids)
        return prompts

    def follow(self, request: ChatCompletionRequest, messages: list[dict[str, Any]]) -> list[int]:
        """Ids of `messages` after an end-of-message token, then the generation prompt (sessions)."""
        tools = None if not request.tools or request.tool_choice == "none" else [t.model_dump() for t in
                                                                                 request.tools]
        options = request.chat_template_kwargs or {}
        key = json.dumps([tools, options], sort_keys=True, default=str)
        chat = self._follow.get(key)
        try:
            if chat is None:
                chat = ChatTokens(self.engine.tokenizer, sorted(self.eos_ids), tools, options)
                self._follow[key] = chat
                if len(self._follow) > 64:
                    self._follow.popitem(last=False)
            self._follow.move_to_end(key)
            return chat.following([_plain(m) for m in messages])
        except TemplateError as err:
            raise Refused(400, f"messages: the session cannot follow them token-exact: {err}",
                          param="messages") from None

    def plan(self, request: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]],
             record: bool) -> Plan:
        """Sampling parameters of every sample (n = 1 each: the engine runs n requests) and the
        prompts, or a 400 naming the field; with `record`, the sampled tokens' log-probs always."""
        limits = self.engine.limits
        n = 1 if request.n is None else request.n
        if not 1 <= n <= limits.max_samples_per_prompt:
            raise Refused(400, f"n must be in [1, {limits.max_samples_per_prompt}], got {n}", param="n")
        asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
        longest = max(len(ids) for ids in prompts)
        if asked is not None and asked < 1:
            raise Refused(400, f"max_tokens must be at least 1, got {asked}", param="max_tokens")
        if longest + (asked or 1) > limits.max_model_len:
            raise Refused(400, f"This model's maximum context length is {limits.max_model_len} tokens. However, "
                               f"you requested {asked or 1} output tokens and your prompt contains {longest} input "
                               "tokens, for a total of more than the maximum context length.",
                          param="max_tokens")
        max_tokens = asked or limits.max_model_len - longest
        try:
            params: SamplingParams = request.to_sampling_params(max_tokens, self.defaults)
            params.n = 1
            if params.logprobs is None and record:  # a session keeps each sampled token's log-prob
                params.logprobs = 0
            params.skip_clone = False
        except (ValueError, TypeError, VLLMClientError) as err:
            raise Refused(400, str(err), param=getattr(err, "parameter", None)) from None
        seed = request.seed
        return Plan([list(ids) for ids in prompts], n, seed, params)

    def parser(self, request: ChatCompletionRequest, prompt_ids: list[int]) -> Any:
        """A fresh tool/reasoning parser for one choice (they keep state), or None without one."""
        if self.parser_cls is None:
            return None
        parser = self.parser_cls(self.engine.tokenizer, request.tools,
                                 chat_template_kwargs=request.chat_template_kwargs or {},
                                 model_config=self.engine.llm.model_config)
        parser.set_prompt_token_ids(prompt_ids)
        return parser


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    """A request's message as chat templates take it: text parts joined into one string."""
    message = dict(message)
    content = message.get("content")
    if isinstance(content, list):
        message["content"] = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    elif content is None:
        message["content"] = ""
    return message
