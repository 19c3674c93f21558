"""Agent programs the EnvironmentService tests run (`--environment NAME=agents_for_tests:function`):
plain `openai` SDK code that knows nothing of sessions or training."""

from __future__ import annotations

import json
import re

import openai

LOOKUP = [{"type": "function", "function": {
    "name": "lookup", "description": "Look up how to answer.",
    "parameters": {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}}}]
# The tiny policy is random: its tool call is sampled under this regex (structured outputs), then
# read by the server's tool parser like any model's.
CALL_LOOKUP = '<tool_call>\\n\\{"name": "lookup", "arguments": \\{"topic": "(vowels|words)"\\}\\}\\n</tool_call>'
HINTS = {"vowels": "Start your answer with a vowel.", "words": "Answer in one word."}


def vowel_agent(task: dict, base_url: str, session_id: str) -> float:
    """Looks a hint up with its tool, then answers; 1 when the answer starts with a vowel."""
    client = openai.OpenAI(timeout=120, max_retries=0)  # OPENAI_BASE_URL and OPENAI_API_KEY come set
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": task["question"]}]
    first = client.chat.completions.create(model=model, messages=messages, tools=LOOKUP, max_tokens=80,
                                           extra_body={"structured_outputs": {"regex": CALL_LOOKUP}})
    message = first.choices[0].message
    (call,) = message.tool_calls
    topic = json.loads(call.function.arguments)["topic"]
    messages += [message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": HINTS[topic]}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=LOOKUP, tool_choice="none",
                                            max_tokens=6)
    return 1.0 if re.match(r"^\s*[aeiouAEIOU]", answer.choices[0].message.content or "") else 0.0


def silent_agent(task: dict, base_url: str, session_id: str) -> None:
    """Never calls the model."""
    return None
