"""Causal attention over a packed row, one sequence at a time.

transformers keeps packed sequences apart with a block-diagonal mask over the whole row, so
attention costs the square of the row's length. Here each sequence (its span starts where the
position ids restart at 0) is its own causal SDPA call: the sum of the squares of the sequence
lengths, as flash-attention's variable-length kernels give on CUDA. Padded rows (right-padded,
one sequence each) need no mask either: under causal attention no real token sees the padding
after it.
"""

from __future__ import annotations

import itertools

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "rlhf_mesh_sdpa_varlen"


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    if position_ids is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, None, dropout, scaling, **kwargs)
    starts = [*torch.nonzero(position_ids[0] == 0).flatten().tolist(), query.shape[2]]
    parts = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout, scaling,
                                    **kwargs)[0] for a, b in itertools.pairwise(starts)]
    return torch.cat(parts, dim=1), None


AttentionInterface.register(NAME, _attention)


def install(model: torch.nn.Module) -> bool:
    """Make `model` (a transformers model, or a PEFT one) attend this way, where it runs SDPA
    with no sliding window (whose mask this leaves out); whether it does now."""
    if model.config._attn_implementation != "sdpa" or any(
            getattr(m, "sliding_window", None) for m in model.modules()):
        return False
    model.config._attn_implementation = NAME
    return True


def uninstall(model: torch.nn.Module) -> None:
    """Back to transformers' SDPA (its packed-sequence mask)."""
    if model.config._attn_implementation == NAME:
        model.config._attn_implementation = "sdpa"
