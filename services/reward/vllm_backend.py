"""The reward model on vLLM's pooling runner.

vLLM applies a sigmoid to single-label classifiers by default; `use_activation=False`
keeps the raw logit, the same score the transformers backend returns. Tokenization,
truncation and versions are the service's own, so both backends score the same tokens.
"""

from __future__ import annotations

from transformers import AutoConfig

from rlhf_mesh.services.reward.reward_model import RewardModel
from rlhf_mesh.vllm_memory import kv_cache_memory_bytes


class VllmRewardModel(RewardModel):
    backend = "vllm"
    pads_batches = False  # vLLM packs the sequences of a batch

    def __init__(self, name: str, path: str, *, dtype: str, max_length: int | None, truncation: str,
                 kv_cache_gib: float | None = None) -> None:
        from vllm import LLM
        from vllm.config import PoolerConfig

        super().__init__(name, path, dtype=dtype, config=AutoConfig.from_pretrained(path), max_length=max_length,
                         truncation=truncation)
        self.llm = LLM(
            model=path, runner="pooling", dtype=dtype, max_model_len=self.max_length, enforce_eager=True,
            pooler_config=PoolerConfig(use_activation=False), kv_cache_memory_bytes=kv_cache_memory_bytes(kv_cache_gib),
        )

    def close(self) -> None:
        # The engine core runs in its own process; the server's exit (os._exit) would orphan it.
        self.llm.llm_engine.engine_core.shutdown()

    def score(self, batch: list[list[int]]) -> list[float]:
        outputs = self.llm.classify([{"prompt_token_ids": ids} for ids in batch], use_tqdm=False)
        return [out.outputs.probs[0] for out in outputs]
