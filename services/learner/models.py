"""The learner's models: policy, frozen reference, critic, and their per-token outputs.

Rollouts are batched right-padded (`prompt + response + pad`), so every real token sits at
the position vLLM gave it. `response_index` points at the logits that predict each response
token: position p + j - 1 for response token j of a prompt of p tokens. The models may instead
see the rows packed, padding-free (`model_inputs`), and the LM head may run on the response
tokens alone, a chunk at a time (`forward`)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_mesh.services.learner import packed_attention, ppo


@dataclass
class Batch:
    """Rollouts as tensors: `[B, L]` sequences, `[B, T]` response positions."""

    input_ids: torch.Tensor  # [B, L] prompt + response, right-padded
    attention_mask: torch.Tensor  # [B, L]
    response_index: torch.Tensor  # [B, T] position of the logits that predict each response token
    response_ids: torch.Tensor  # [B, T] response tokens, pad after the end
    mask: torch.Tensor  # [B, T] 1 on response tokens in the loss (an episode's observations are not)
    valid: torch.Tensor  # [B, T] True on every response token

    def __len__(self) -> int:
        return len(self.input_ids)

    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def select(self, rows: torch.Tensor) -> Batch:
        """The rows `rows`, their sequences cut to the longest of them (responses keep the batch's width)."""
        picked = [t[rows] for t in self._tensors()]
        width = int(picked[1].sum(1).max()) if len(rows) else 0
        picked[0], picked[1] = picked[0][:, :width], picked[1][:, :width]
        return Batch(*picked)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in self._tensors()))

    def tokens(self) -> torch.Tensor:
        """[B] each row's prompt + response length."""
        return self.attention_mask.sum(1)


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
    valid = torch.zeros((len(prompts), response_width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        n = len(prompt) + len(response)
        input_ids[row, :n] = torch.tensor(prompt + response)
        attention_mask[row, :n] = 1
        response_ids[row, : len(response)] = torch.tensor(response)
        # Padding positions point at the row's last real logit: inside the row, never read.
        response_index[row] = torch.clamp(torch.arange(response_width) + len(prompt) - 1, max=n - 2)
        valid[row, : len(response)] = True
        loss_mask = loss_masks[row] if loss_masks is not None else None
        mask[row, : len(response)] = 1 if loss_mask is None else torch.tensor(loss_mask, dtype=mask.dtype)
    return Batch(input_ids, attention_mask, response_index, response_ids, mask, valid)


def model_inputs(batch: Batch, packed: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A causal LM's inputs for `batch`, and `[B, T]` indices of the response positions among the
    flattened positions of its outputs. Packed: every row's tokens one after another in a single
    row, with position ids restarting at each sequence (transformers then masks attention to stay
    inside each sequence); else the right-padded rows with their attention mask."""
    if not packed:
        rows, width = batch.input_ids.shape
        offsets = torch.arange(rows, device=batch.input_ids.device) * width
        return ({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},
                batch.response_index + offsets[:, None])
    keep = batch.attention_mask.bool()
    lengths = batch.tokens()
    inputs = {"input_ids": batch.input_ids[keep][None], "position_ids": (keep.cumsum(1) - 1)[keep][None]}
    return inputs, batch.response_index + (lengths.cumsum(0) - lengths)[:, None]


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

    def forward(self, batch: Batch, policy_hidden: torch.Tensor | None = None, packed: bool = False) -> torch.Tensor:
        """[B, T] values at the response positions; a head needs the policy's `policy_hidden`
        (`Output.hidden`)."""
        if self.head is not None:
            return self.head(policy_hidden).squeeze(-1).float()
        inputs, index = model_inputs(batch, packed)
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)
        return self.model.score(hidden[index]).squeeze(-1).float()


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


@dataclass
class Output:
    """A causal LM's per-response-token outputs (0 after each response)."""

    logprobs: torch.Tensor  # [B, T] log-probs of the response tokens at the temperature
    entropy: torch.Tensor  # [B, T] entropy of the distribution each was drawn from
    hidden: torch.Tensor | None  # [B, T, H] last hidden states there, when asked (a value head's input)


def forward(policy: torch.nn.Module, batch: Batch, temperature: float, hidden: bool = False, packed: bool = False,
            chunk: int = 0, entropy_grad: bool = False) -> Output:
    """The policy's outputs at the response tokens, from packed or padded rows (`model_inputs`).
    With `chunk`, the LM head runs on the response tokens only, `chunk` of them at a time, each
    chunk's logits recomputed in the backward pass: the logits never exist whole. Without it,
    the model's own logits at every position (whole, as transformers computes them)."""
    inputs, index = model_inputs(batch, packed)
    at, tokens = index[batch.valid], batch.response_ids[batch.valid]
    model = _unwrapped(policy)
    last: list[torch.Tensor] = []  # the backbone's output, the LM head's input (not every layer's, kept alive)
    hook = model.get_decoder().register_forward_hook(lambda _, __, out: last.append(out[0])) \
        if chunk or hidden else None
    try:
        out = policy(**inputs, use_cache=False, **({"logits_to_keep": 1} if chunk else {}))
    finally:
        if hook is not None:
            hook.remove()
    states = last[0].flatten(0, 1) if last else None
    if chunk:
        head = model.get_output_embeddings()
        parts = [checkpoint(_head_logprobs, head, s, t, temperature, entropy_grad, use_reentrant=False)
                 if s.requires_grad else _head_logprobs(head, s, t, temperature, entropy_grad)
                 for s, t in zip(states[at].split(chunk), tokens.split(chunk), strict=True)]
        logprobs, entropy = (torch.cat(column) for column in zip(*parts, strict=True))
    else:
        logprobs, entropy = _logprobs(out.logits.flatten(0, 1)[at], tokens, temperature, entropy_grad)
    zeros = torch.zeros(batch.valid.shape, device=logprobs.device)
    return Output(zeros.masked_scatter(batch.valid, logprobs), zeros.masked_scatter(batch.valid, entropy),
                  states[index] if hidden else None)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
              entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float() / temperature
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = ppo.entropy(logits)
    return token_logprobs(logits, tokens), entropy


def _head_logprobs(head: torch.nn.Module, states: torch.Tensor, tokens: torch.Tensor, temperature: float,
                   entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _logprobs(head(states), tokens, temperature, entropy_grad)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def layout_support(models: list[torch.nn.Module], critic: Critic | None, packing: bool,
                   chunking: bool) -> tuple[bool, bool]:
    """Whether packed rows give the padded rows' log-probs (values) on these causal LMs (and
    critic), and whether their LM heads applied apart give their own logits (a model may scale or
    cap them after its head, or not take `logits_to_keep`). Checked, where asked, on two short
    sequences against transformers' padded SDPA. Packed rows attend one sequence at a time
    (`packed_attention`) where that gives the same numbers, else through transformers' mask. A
    model that mixed the sequences would be off by far more than the tolerance bf16 weights need."""
    packs, head_apart = packing, chunking
    scorer = critic.model if critic is not None and not critic.is_head else None
    for model in [*models, scorer]:
        if model is None:
            continue
        atol = 1e-2 if next(model.parameters()).dtype == torch.float32 else 1e-1  # a reference stored in bf16
        ids = torch.randint(0, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(0)).tolist()
        batch = make_batch([ids[:3], ids[6:8]], [ids[3:6], ids[8:12]], pad_id=0).to(next(model.parameters()).device)

        def run(packed: bool, chunk: int = 0, model: torch.nn.Module = model, batch: Batch = batch) -> torch.Tensor:
            if model is scorer:
                return critic(batch, packed=packed)
            return forward(model, batch, 1.0, packed=packed, chunk=chunk).logprobs

        with torch.no_grad():
            expected = run(False)
            if packs:
                one_at_a_time = packed_attention.install(model)
                if one_at_a_time and not torch.allclose(run(True), expected, atol=atol):
                    packed_attention.uninstall(model)  # its attention is not handed the position ids
                    one_at_a_time = False
                packs = one_at_a_time or torch.allclose(run(True), expected, atol=atol)
            if head_apart and model is not scorer:
                try:
                    head_apart = torch.allclose(run(False, chunk=2), expected, atol=atol)
                except TypeError:  # a forward without logits_to_keep
                    head_apart = False
    return packs, head_apart


def padded(rows: list[list[float]], width: int) -> torch.Tensor:
    """Rows of different lengths as one zero-padded (rows, width) tensor."""
    out = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out
