"""A loaded reward model: input encoding (chat template, truncation), and the transformers backend.

How a sample becomes tokens:
- prompt + response, tokenizer with a chat template: the template renders a user turn with
  the prompt and an assistant turn with the response;
- prompt + response, no chat template: the prompt's tokens (with the tokenizer's special
  tokens) followed by the response's tokens (without);
- a chat conversation: rendered by the chat template (an error without one);
- token ids: used as given;
- a query (OpenRLHF's, or vLLM's /classify input): the whole text tokenized as it is, with
  the tokenizer's special tokens only when the query asks for them.
An input longer than the model length loses tokens from the left (the prompt side) so the
response survives, and its result says `truncated`; with truncation="error" it is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import blake3
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_mesh.v1 import reward_pb2

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class InvalidSample(ValueError):
    """A sample that cannot be scored; the message names its index."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(f"samples[{index}]: {problem}")
        self.problem = problem


@dataclass(frozen=True)
class Encoded:
    """Token ids ready for the model."""

    ids: list[int]
    truncated: bool


def right_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the right to the longest sequence, and their attention mask."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def weights_version(path: str | Path) -> str:
    """Content hash of a model folder's weight files: the model's version."""
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    files = sorted(p for p in Path(path).iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no weight files in {path}")
    for file in files:
        digest.update(file.name.encode())
        digest.update_mmap(file)
    return digest.hexdigest()[:16]


class Tokenization:
    """Turns ScoreSamples into token ids by the rules of the module docstring."""

    def __init__(self, tokenizer, max_length: int, truncation: str) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.vocab_size = len(tokenizer)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._turn_tokens = self._tokens_per_turn()

    def _tokens_per_turn(self) -> int:
        """Tokens the template (or the special tokens) add to one turn of empty text."""
        special = len(self.tokenizer("", add_special_tokens=True)["input_ids"])
        if not self.has_chat_template:
            return special
        try:
            rendered = self._render([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}])
        except Exception:  # a template that refuses empty turns; `bound` is checked after tokenizing anyway
            return special
        return max(special, -(-len(rendered) // 2))

    def bound(self, sample: reward_pb2.ScoreSample) -> int:
        """At most how many tokens `encode` makes of `sample`, from its size alone (admission before
        tokenizing): a byte-level BPE token holds one byte of text or more, the template adds its
        own per turn, and no input keeps more than max_length tokens."""
        kind = sample.WhichOneof("input")
        if kind == "token_ids":
            count = len(sample.token_ids.ids)
        else:
            turns = len(sample.chat.messages) if kind == "chat" else 2 if kind == "text" else 1
            count = sample.ByteSize() + turns * self._turn_tokens
        return min(count, self.max_length)

    def encode(self, index: int, sample: reward_pb2.ScoreSample) -> Encoded:
        kind = sample.WhichOneof("input")
        if kind is None:
            raise InvalidSample(index, "has no input: set text, query, chat or token_ids")
        if kind == "token_ids":
            ids = list(sample.token_ids.ids)
            if not ids:
                raise InvalidSample(index, "token_ids is empty")
            bad = next((t for t in ids if t >= self.vocab_size), None)
            if bad is not None:
                raise InvalidSample(index, f"token id {bad} is outside the vocabulary (size {self.vocab_size})")
            return self._fit(index, ids, protected=0)
        if kind == "query":
            ids = self.tokenizer(sample.query.text, add_special_tokens=sample.query.add_special_tokens)["input_ids"]
            if not ids:
                raise InvalidSample(index, "query text is empty")
            prompt_ids = self.tokenizer(sample.query.prompt, add_special_tokens=False)["input_ids"]
            protected = len(ids) - len(prompt_ids) if ids[: len(prompt_ids)] == prompt_ids else len(ids)
            return self._fit(index, ids, protected)
        if kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in sample.chat.messages]
            if not messages:
                raise InvalidSample(index, "chat has no messages")
            if not self.has_chat_template:
                raise InvalidSample(index, "chat input needs a model with a chat template")
            if any(not m["role"] for m in messages):
                raise InvalidSample(index, "every chat message needs a role")
            return self._fit(index, self._render(messages), protected=0)
        # An empty response is a real outcome of sampling (EOS first) and gets a score.
        prompt, response = sample.text.prompt, sample.text.response
        if self.has_chat_template:
            turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            ids = self._render(turns)
            prefix = self._render(turns[:1], add_generation_prompt=True)
            protected = len(ids) - len(prefix) if ids[: len(prefix)] == prefix else len(ids)
        else:
            head = self.tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
            tail = self.tokenizer(response, add_special_tokens=False)["input_ids"]
            ids, protected = head + tail, len(tail)
            if not ids:
                raise InvalidSample(index, "prompt and response are both empty")
        return self._fit(index, ids, protected)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
        return list(ids)

    def _fit(self, index: int, ids: list[int], protected: int) -> Encoded:
        """Left-truncate to max_length, never into the last `protected` tokens (the response)."""
        excess = len(ids) - self.max_length
        if excess <= 0:
            return Encoded(ids, truncated=False)
        if self.truncation == "error":
            raise InvalidSample(index, f"is {len(ids)} tokens, longer than the model's {self.max_length}")
        if protected > self.max_length:
            raise InvalidSample(
                index, f"response alone is {protected} tokens, longer than the model's {self.max_length}"
            )
        return Encoded(ids[excess:], truncated=True)


class RewardModel:
    """A reward model with one label: name, version, length limit and tokenization, the same for
    every backend. A backend loads the weights, calls this initialiser with the model's config
    and implements `score`."""

    backend: str
    pads_batches: bool  # whether a batch runs padded to its longest sample

    def __init__(self, name: str, path: str, *, dtype: str, config, max_length: int | None, truncation: str) -> None:
        if config.num_labels != 1:
            raise ValueError(f"{path}: a reward model has one label, this one has {config.num_labels}")
        self.name, self.path, self.dtype = name, str(path), dtype
        self.version = weights_version(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        limit = getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        self.max_length = min(max_length or limit, limit)
        self.tokenization = Tokenization(self.tokenizer, self.max_length, truncation)

    def close(self) -> None:
        """Release what the model holds outside this process (a backend's engine processes)."""

    def info(self, is_default: bool) -> reward_pb2.RewardModelInfo:
        return reward_pb2.RewardModelInfo(
            name=self.name, path=self.path, version=self.version, max_length_tokens=self.max_length,
            dtype=self.dtype, backend=self.backend, is_default=is_default,
        )

    def score(self, batch: list[list[int]]) -> list[float]:
        """The raw score (logit) of each token sequence."""
        raise NotImplementedError


class TransformersRewardModel(RewardModel):
    """A `*ForSequenceClassification` model scored with transformers."""

    backend = "transformers"
    pads_batches = True

    def __init__(self, name: str, path: str, *, dtype: str, device: str, max_length: int | None,
                 truncation: str) -> None:
        self.device = torch.device(device)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype))
        super().__init__(name, path, dtype=dtype, config=model.config, max_length=max_length, truncation=truncation)
        if model.config.pad_token_id is None:
            if self.tokenizer.pad_token_id is None:
                raise ValueError(f"{path}: neither the model config nor the tokenizer sets a pad token")
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.pad_token_id = model.config.pad_token_id
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def score(self, batch: list[list[int]]) -> list[float]:
        """Raw logits of right-padded sequences; the head pools each at its last real token."""
        ids, mask = right_padded(batch, self.pad_token_id)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return logits[:, 0].float().cpu().tolist()
