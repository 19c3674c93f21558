"""How much memory vLLM's KV cache takes: the one default every vLLM engine here starts with.

On vLLM's CPU backend, left alone, the KV cache asks for `gpu_memory_utilization` (90%) of the
NUMA node and the engine refuses to start on a small machine; there it is sized to the
machine instead. On GPUs vLLM's own sizing (`gpu_memory_utilization`) stays in charge.
`VLLM_CPU_KVCACHE_SPACE` (GiB), where exported, still wins: vLLM reads it itself.
"""

from __future__ import annotations

GIB = 1 << 30
CPU_SHARE = 0.05  # of the machine's memory
CPU_MIN_GIB, CPU_MAX_GIB = 1, 4


def kv_cache_memory_bytes(kv_cache_gib: float | None) -> int | None:
    """vLLM's `kv_cache_memory_bytes` for a setting of `kv_cache_gib` (None: the default)."""
    if kv_cache_gib is not None:
        return int(kv_cache_gib * GIB)
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    import psutil

    share = psutil.virtual_memory().total * CPU_SHARE
    return int(min(max(share, CPU_MIN_GIB * GIB), CPU_MAX_GIB * GIB))
