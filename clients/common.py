"""Proto messages shared by the clients, built from plain Python values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rlhf_mesh.v1 import common_pb2


def conversation(messages: Sequence[Mapping[str, str]]) -> common_pb2.Conversation:
    """Chat messages given as `{"role", "content"}` dicts."""
    return common_pb2.Conversation(
        messages=[common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    )


def is_chat(items: Sequence[object]) -> bool:
    return bool(items) and all(isinstance(m, Mapping) for m in items)


def is_token_ids(items: Sequence[object]) -> bool:
    return all(isinstance(t, int) for t in items)
