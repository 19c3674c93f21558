"""Token ids of chat messages that follow a sampled turn, rendered without re-rendering it.

An episode (or a session) keeps the model's sampled ids as sampled. The messages after a turn
are rendered once, on their own, after a fixed base conversation (`ChatTokens.observation`), so
earlier turns are never rendered again: a chat template that rewrites history (Qwen3 drops
earlier `<think>` blocks, others trim) or a tokenizer that merges differently cannot change what
the model already saw.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

# Any conversation whose assistant message ends in the EOS the model samples.
_BASE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]


class TemplateError(ValueError):
    """A chat template this scheme cannot use; the message says why."""


class ChatTokens:
    """Token ids of an episode's (or a session's) messages under the policy's chat template and tools."""

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int], tools: list[dict] | None,
                 template_kwargs: dict[str, Any] | None = None) -> None:
        self.tokenizer, self.tools, self.template_kwargs = tokenizer, tools or None, template_kwargs or {}
        base = self._render(_BASE, generation_prompt=False)
        eos = set(eos_ids)
        ends = [i for i, token in enumerate(base) if token in eos]
        if not ends:
            raise TemplateError("the chat template does not end an assistant message with an end-of-sequence token, "
                                "so an episode cannot know where a turn ends")
        self.base = base[:ends[-1] + 1]  # the base conversation up to its assistant's EOS
        self.end_of_message = base[ends[-1]]

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        try:
            return list(self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=True,
                                                           return_dict=False, add_generation_prompt=generation_prompt,
                                                           **self.template_kwargs))
        except Exception as err:  # a template may refuse a role or an order of messages
            raise TemplateError(f"it cannot render these messages: {type(err).__name__}: {err}") from None

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The first prompt: reset()'s messages and the assistant's generation prompt."""
        return self._render(messages, generation_prompt=True)

    def observation(self, messages: list[dict[str, str]]) -> list[int]:
        """What follows a turn's EOS: the template's separator, the messages, the generation prompt
        (cached: environments repeat their observations, "Wrong, try again.")."""
        return list(self._observation(json.dumps(messages)))

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one per environment, for the server's life
    def _observation(self, messages: str) -> tuple[int, ...]:
        return tuple(self.following(json.loads(messages)))

    def following(self, messages: list[dict[str, Any]]) -> list[int]:
        """observation() uncached, for messages that seldom repeat (an agent's, a user's)."""
        ids = self._render(_BASE + messages, generation_prompt=True)
        if ids[:len(self.base)] != self.base:
            raise TemplateError("the chat template renders a conversation differently once messages follow it")
        return ids[len(self.base):]
