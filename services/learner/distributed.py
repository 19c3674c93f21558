"""Data parallelism under torchrun: rank 0 (the leader) talks to the services, pushes weights and
writes checkpoints; every rank trains its share of each step's micro-batches, with a full copy
of the models (DDP) or a shard of them (FSDP2, `fully_shard` per decoder layer).

`torchrun --nproc-per-node N -m rlhf_mesh train ...` starts N processes with RANK and
WORLD_SIZE set; gloo is the backend on CPU, NCCL on GPU (rank r on cuda:LOCAL_RANK). The
other ranks (followers) wait for the leader's messages: a step's rollouts to train on, a
request for their RNG states, or None, the end of the run. With FSDP2 every forward pass, and
every gathering of full weights (for a push, a checkpoint, an evaluation), is a collective: the
followers take part in those too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls, device: torch.device, timeout_s: float) -> World:
        """Join the launch's process group (once per process); a single World without torchrun."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        if int(os.environ.get("RANK", "0")) > 0 and threading.current_thread() is threading.main_thread():
            # torchrun passes SIGTERM to every rank; the leader decides when the run ends.
            # (Under `serve learner` the server's own handler waits for the leader instead.)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return cls(dist.get_rank(), dist.get_world_size())

    @staticmethod
    def device(name: str) -> torch.device:
        """The device of this rank: `cuda` means this rank's own GPU under torchrun."""
        device = torch.device(name)
        if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return device

    def broadcast(self, message: Any = None) -> Any:
        """The leader's message, on every rank."""
        if self.size == 1:
            return message
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, item: Any) -> list[Any]:
        """Every rank's item, in rank order, on the leader (an empty list elsewhere)."""
        if self.size == 1:
            return [item]
        items: list[Any] | None = [None] * self.size if self.leader else None
        dist.gather_object(item, items, dst=0)
        return items or []

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def wrap(self, module: torch.nn.Module | None) -> torch.nn.Module | None:
        """A trainable module whose gradients are averaged over the ranks in backward (DDP)."""
        if module is None or self.size == 1:
            return module
        device = next(module.parameters()).device
        # Buffers (rotary tables) never change: no broadcast of them before every forward.
        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                       broadcast_buffers=False)

    def shard(self, module: torch.nn.Module | None, device: torch.device) -> None:
        """FSDP2 in place: each decoder layer (the classes a transformers model names in
        `_no_split_modules`) is one unit whose parameters are gathered for its pass, the rest
        of `module` (embeddings, head, final norm: tied ones stay tied) the root unit. Each
        unit's shard moves to `device` as it is made."""
        if module is None:
            return
        mesh = init_device_mesh(device.type, (self.size,))
        blocks = {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
        for layer in [m for m in module.modules() if type(m).__name__ in blocks]:
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)

    @staticmethod
    def accumulating(modules: list[torch.nn.Module | None], last: bool) -> contextlib.AbstractContextManager:
        """No gradient sync over the ranks but for the last micro-batch of a rank's share
        (DDP's no_sync; FSDP2 keeps the unsharded gradients until then)."""
        stack = contextlib.ExitStack()
        for module in modules:
            if isinstance(module, FSDPModule):
                module.set_requires_gradient_sync(last)
            elif isinstance(module, DistributedDataParallel) and not last:
                stack.enter_context(module.no_sync())
        return stack

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            # Every rank's last message is in before any rank tears its connections down: a rank
            # whose peer closed them while gloo still read aborted at exit.
            dist.barrier()
            dist.destroy_process_group()
