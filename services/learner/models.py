"""The learner's models: policy, frozen reference, critic, and their per-token outputs.

Rollouts are batched right-padded (`prompt + response + pad`), so every real token sits at
the position vLLM gave it. `response_index` points at the logits that predict each response
token: position p + j - 1 for response token j of a prompt of p tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification


@dataclass
class Batch:
    """Rollouts as tensors: `[B, L]` sequences, `[B, T]` response positions."""

    input_ids: torch.Tensor  # [B, L] prompt + response, right-padded
    attention_mask: torch.Tensor  # [B, L]
    response_index: torch.Tensor  # [B, T] position of the logits that predict each response token
    response_ids: torch.Tensor  # [B, T] response tokens, pad after the end
    mask: torch.Tensor  # [B, T] 1 on response tokens

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, rows: torch.Tensor) -> Batch:
        return Batch(*(t[rows] for t in (self.input_ids, self.attention_mask, self.response_index,
                                         self.response_ids, self.mask)))

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.response_index,
                                              self.response_ids, self.mask)))


def make_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
               loss_masks: list[list[int] | None] | None = None) -> Batch:
    """Pack token-id lists into a right-padded Batch (every response needs one token at least);
    an episode's loss mask leaves its observations out of `mask`, which is else 1 on every response token."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width, response_width = max(lengths), max(len(r) for r in responses)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    response_ids = torch.full((len(prompts), response_width), pad_id, dtype=torch.long)
    response_index = torch.zeros((len(prompts), response_width), dtype=torch.long)
    mask = torch.zeros((len(prompts), response_width))
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        n = len(prompt) + len(response)
        input_ids[row, :n] = torch.tensor(prompt + response)
        attention_mask[row, :n] = 1
        response_ids[row, : len(response)] = torch.tensor(response)
        # Padding positions point at the last real logit: finite, and masked out anyway.
        response_index[row] = torch.clamp(torch.arange(response_width) + len(prompt) - 1, max=n - 2)
        loss_mask = loss_masks[row] if loss_masks is not None else None
        mask[row, : len(response)] = 1 if loss_mask is None else torch.tensor(loss_mask, dtype=mask.dtype)
    return Batch(input_ids, attention_mask, response_index, response_ids, mask)


def gather_positions(per_position: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, L, ...] -> [B, T, ...] at the response positions."""
    shape = (*index.shape, *per_position.shape[2:])
    expanded = index.view(*index.shape, *([1] * (per_position.dim() - 2))).expand(shape)
    return per_position.gather(1, expanded)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] without materialising the full log-softmax."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class Critic(torch.nn.Module):
    """Per-token values: a *ForSequenceClassification model's backbone and score head applied
    at every position (TRL's value model), or a linear head on the policy's hidden states."""

    def __init__(self, model: torch.nn.Module | None = None, hidden_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.head = torch.nn.Linear(hidden_size, 1) if model is None else None
        if self.head is not None:
            torch.nn.init.zeros_(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)

    @property
    def is_head(self) -> bool:
        return self.head is not None

    def forward(self, batch: Batch, policy_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] values at the response positions; a head needs the policy's `policy_hidden`."""
        if self.head is not None:
            return self.head(gather_positions(policy_hidden, batch.response_index)).squeeze(-1).float()
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          use_cache=False).last_hidden_state
        return gather_positions(self.model.score(hidden), batch.response_index).squeeze(-1).float()


@dataclass
class Models:
    policy: torch.nn.Module  # a PeftModel with LoRA
    reference: torch.nn.Module | None  # None with LoRA (the policy with its adapter disabled) or without KL
    critic: Critic | None


def with_lora(policy: torch.nn.Module, adapter: str | None, r: int, alpha: int, dropout: float,
              target_modules: list[str] | None) -> torch.nn.Module:
    """`policy` as a PEFT model whose LoRA adapter alone trains: a new one, or the one saved in `adapter`."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        return PeftModel.from_pretrained(policy, adapter, is_trainable=True)
    targets = target_modules[0] if target_modules == ["all-linear"] else target_modules
    return get_peft_model(policy, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                             task_type="CAUSAL_LM"))


def load_models(policy_path: str, reference_path: str | None, critic_path: str | None, value_head: bool,
                with_critic: bool, device: str, with_reference: bool = True,
                reference_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                lora: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> Models:
    """Policy (float32, trainable), frozen reference (in `reference_dtype`: it is only ever run
    under autocast to it), critic (None when critic-free). `lora` (`with_lora`) makes the policy
    a PEFT model, and then there is no reference copy: it is the policy with the adapter disabled.
    Without `with_reference` (no KL term) there is no reference at all."""
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).to(device)
    reference = None
    if lora is None and with_reference:
        reference = copy.deepcopy(policy) if reference_path is None else \
            AutoModelForCausalLM.from_pretrained(reference_path, dtype=torch.float32).to(device)
        reference.to(reference_dtype).eval().requires_grad_(False)
    critic = None
    if with_critic and value_head:
        critic = Critic(hidden_size=policy.config.hidden_size).to(device)
    elif with_critic:
        value_model = AutoModelForSequenceClassification.from_pretrained(
            critic_path or policy_path, num_labels=1, dtype=torch.float32
        )
        if value_model.config.pad_token_id is None:
            value_model.config.pad_token_id = policy.config.pad_token_id
        critic = Critic(value_model.to(device))
    # Dropout would make recomputed log-probs differ from the rollout's: eval mode while training,
    # or, where gradient checkpointing needs train mode (transformers checkpoints only then), no dropout.
    for model in (policy, critic.model if critic is not None and not critic.is_head else None):
        if model is None:
            continue
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            disable_dropout(model.train())
        else:
            model.eval()
    if critic is not None and critic.is_head:
        critic.eval()
    if lora is not None:  # after the dropout was disabled: LoRA's own dropout is the trainer's to switch
        policy = lora(policy)
        for module in lora_dropouts(policy):
            module.eval()
    return Models(policy, reference, critic)


def lora_dropouts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The dropout modules on the LoRA inputs of a PEFT model (none in any other)."""
    return [module for name, module in model.named_modules() if name.endswith("lora_dropout")]


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout of `model` at 0, the modules' and the attention's (a float attribute)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


def forward(policy: torch.nn.Module, batch: Batch, temperature: float,
            hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Response-token logits / temperature `[B, T, V]`, their log-probs `[B, T]`, and the
    last hidden states `[B, L, H]` when asked (for a value head)."""
    out = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=hidden,
                 use_cache=False)
    logits = gather_positions(out.logits, batch.response_index).float() / temperature
    return logits, token_logprobs(logits, batch.response_ids), out.hidden_states[-1] if hidden else None


def padded(rows: list[list[float]], width: int) -> torch.Tensor:
    """Rows of different lengths as one zero-padded (rows, width) tensor."""
    out = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out
