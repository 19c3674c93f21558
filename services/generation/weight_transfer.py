"""vLLM weight-transfer engine "rlhf_mesh": stage a whole update, verify it, then apply it at once.

Runs inside every vLLM worker (registered through the `vllm.general_plugins` entry point,
which vLLM loads in each of its processes). vLLM's own engines load each tensor into the
model as it arrives; this one keeps the served weights untouched until every tensor of the
update is in and verified, so a rejected or interrupted update changes nothing.

- `update_weights({"path": ...})`: the service already received and verified the tensors
  (in-band push) and wrote them to a safetensors file; the worker reads them.
- `update_weights({"names", "dtypes", "shapes", "digests"})`: the worker receives each tensor
  by gloo broadcast from the sender (rank 0) and checks its BLAKE3 digest.
- `load_as` names each tensor to load (a tied parameter once); those under transformers'
  run-time names are converted to the checkpoint's (`CheckpointNames.to_checkpoint`).
- `finish_weight_update()`: loads the staged tensors into the model (vLLM's layerwise
  reload, so fused and processed parameters come out right), then redoes what that reload
  misses on CPU: the layers that share a parameter (a tied LM head) and the experts' packed
  layout.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from rlhf_mesh.weights import CheckpointNames, digest, gloo_group

BACKEND = "rlhf_mesh"
REJECTED = "weight update rejected: "  # marks a refusal of the caller's tensors, as opposed to a fault


@dataclass
class InitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    world_size: int
    rank_offset: int
    timeout_s: float


@dataclass
class UpdateInfo(WeightTransferUpdateInfo):
    path: str = ""
    names: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)  # hex
    load_as: dict[str, str] = field(default_factory=dict)  # pushed name -> checkpoint name; others are dropped


class StagedWeightTransferEngine(WeightTransferEngine[InitInfo, UpdateInfo]):
    init_info_cls = InitInfo
    update_info_cls = UpdateInfo
    supports_draft_weight_update = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.group: torch.distributed.ProcessGroup | None = None
        self.timeout_s = 60.0
        self.staged: list[tuple[str, torch.Tensor]] = []
        self.names: CheckpointNames | None = None  # of the served folder, read at the first update

    def init_transfer_engine(self, init_info: InitInfo) -> None:
        rank = (self.parallel_config.data_parallel_index * self.parallel_config.world_size
                + self.parallel_config.rank + init_info.rank_offset)
        self.timeout_s = init_info.timeout_s
        self.group = gloo_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                                init_info.timeout_s)

    def start_weight_update(self) -> None:
        self.staged = []

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))  # CPU or not, nothing to synchronize

    def receive_weights(self, update_info: UpdateInfo) -> None:
        self.staged = []
        if update_info.path:
            from safetensors.torch import load_file

            # a copy now, so the pause only loads
            self.staged = self._load_as(update_info, load_file(update_info.path).items())
            return
        if self.group is None:
            raise RuntimeError("collective weight transfer not initialized: call InitWeightTransfer first")
        tensors = [torch.empty(shape, dtype=getattr(torch, dtype))
                   for dtype, shape in zip(update_info.dtypes, update_info.shapes, strict=True)]
        # All broadcasts are queued at once so that gloo receives the next tensor while this one's digest is checked.
        works = [self.group.broadcast(tensor, 0) for tensor in tensors]
        mismatch = None
        for name, tensor, expected, work in zip(update_info.names, tensors, update_info.digests, works, strict=True):
            work.wait()
            if mismatch is None and digest(tensor).hex() != expected:
                mismatch = name  # the sender sends every tensor: receive them all, so the group stays in step
        if mismatch is not None:
            raise ValueError(f"{REJECTED}tensor {mismatch!r}: BLAKE3 digest of the received bytes does not match")
        self.staged = self._load_as(update_info, zip(update_info.names, tensors, strict=True))

    def _load_as(self, update_info: UpdateInfo, tensors) -> list[tuple[str, torch.Tensor]]:
        """The received tensors under their checkpoint names, a tied parameter once."""
        if self.names is None:
            self.names = CheckpointNames(self.model_config.model)
        kept = {update_info.load_as[name]: t for name, t in tensors if name in update_info.load_as}
        return list(self.names.to_checkpoint(kept).items())

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        staged, self.staged = self.staged, []
        device = next(self.model.parameters()).device
        initialize_layerwise_reload(self.model)
        self.model.load_weights((name, tensor.to(device)) for name, tensor in staged)
        finalize_layerwise_reload(self.model, self.model_config)
        _reprocess_shared_parameters(self.model)
        _repack_experts(self.model)

    def shutdown(self) -> None:
        self.group = None
        self.staged = []


def _reprocess_shared_parameters(model: torch.nn.Module) -> None:
    """Redo the post-load processing of every layer that shares a parameter with another (a tied
    `lm_head` and `embed_tokens`).

    On CPU, `UnquantizedEmbeddingMethod.process_weights_after_loading`
    (vllm/model_executor/layers/vocab_parallel_embedding.py) hands the LM head's weight to a
    packed oneDNN or sgl GEMM (`dispatch_cpu_unquantized_gemm` in layers/utils.py), which holds a
    copy. A tied head receives no tensor of its own in a reload, so the layerwise reload
    (model_loader/reload/layerwise.py) only puts its kernel tensors back and never repacks it:
    the logits would come from the old embedding.
    """
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    for modules in owners.values():
        for module in modules if len(modules) > 1 else ():
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)


def _repack_experts(model: torch.nn.Module) -> None:
    """Put every mixture-of-experts layer's reloaded weights back into its kernel's layout.

    `UnquantizedFusedMoEMethod._setup_kernel` (vllm/model_executor/layers/fused_moe/
    unquantized_fused_moe_method.py) runs the experts' own `process_weights_after_loading`
    only on the first load; on a reload it copies the plain weights into storage that the
    CPU experts (`CPUUnquantizedExperts`, experts/cpu_moe.py) read in their prepacked
    grouped-GEMM layout. On GPUs vLLM converts the layout itself and the hook stays untouched.
    """
    if next(model.parameters()).device.type != "cpu":
        return
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None:
            kernel.fused_experts.process_weights_after_loading(module)


def register() -> None:
    """vLLM general plugin: make the engine available in this process (vLLM calls it in each)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    with contextlib.suppress(ValueError):  # registered already in this process
        WeightTransferEngineFactory.register_engine(BACKEND, StagedWeightTransferEngine)
