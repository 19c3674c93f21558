"""The reward model on vLLM's pooling runner.

vLLM applies a sigmoid to single-label classifiers by default; `use_activation=False`
keeps the raw logit, the same score the transformers backend returns. Tokenization,
truncation and versions are the service's own, so both backends score the same tokens.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoTokenizer

from rlhf_mesh.services.reward.model import RewardModel, Tokenization, weights_version


class VllmRewardModel(RewardModel):
    backend = "vllm"

    def __init__(self, name: str, path: str, *, dtype: str, max_length: int | None, truncation: str) -> None:
        from vllm import LLM
        from vllm.config import PoolerConfig

        self.name, self.path = name, str(path)
        self.version = weights_version(path)
        self.dtype = dtype
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "num_labels", 1) != 1:
            raise ValueError(f"{path}: a reward model has one label, this one has {config.num_labels}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        limit = config.max_position_embeddings
        self.max_length = min(max_length or limit, limit)
        self.tokenization = Tokenization(tokenizer, self.max_length, truncation)
        self.llm = LLM(
            model=path, runner="pooling", dtype=dtype, max_model_len=self.max_length, enforce_eager=True,
            pooler_config=PoolerConfig(use_activation=False),
        )

    def score(self, batch: list[list[int]]) -> list[float]:
        outputs = self.llm.classify([{"prompt_token_ids": ids} for ids in batch], use_tqdm=False)
        return [out.outputs.probs[0] for out in outputs]
