"""Weight-update pieces both ends share: dtypes, digests, manifests, delta pushes and the gloo group.

Torch only (no vLLM), so a learner can import it anywhere.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np
import torch
import torch.distributed as dist
import zstandard
from safetensors import safe_open

from rlhf_mesh.v1 import generation_pb2

# proto dtype <-> torch dtype <-> safetensors dtype
TORCH_DTYPES = {
    generation_pb2.TENSOR_DTYPE_FLOAT32: torch.float32,
    generation_pb2.TENSOR_DTYPE_FLOAT16: torch.float16,
    generation_pb2.TENSOR_DTYPE_BFLOAT16: torch.bfloat16,
}
PROTO_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
CHUNK_BYTES = 4 << 20  # the in-band chunk limit of the contract


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order (little-endian on every platform torch runs on)."""
    return memoryview(tensor.detach().contiguous().view(torch.uint8).numpy()).cast("B")


def digest(data: torch.Tensor | memoryview | bytes) -> bytes:
    """BLAKE3-256 of a tensor's raw bytes."""
    if isinstance(data, torch.Tensor):
        data = raw_bytes(data)
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a Hugging Face checkpoint folder: safetensors (one file or the shards
    its index names) or, where there are none, PyTorch `.bin` files."""
    folder = Path(model_dir)
    for suffix, index in ((".safetensors", "model.safetensors.index.json"), (".bin", "pytorch_model.bin.index.json")):
        if (folder / index).is_file():
            shards = json.loads((folder / index).read_text())["weight_map"].values()
            return [folder / name for name in sorted(set(shards))]
        files = sorted(p for p in folder.glob(f"*{suffix}") if p.name.startswith(("model", "pytorch_model")))
        if files:
            return files
    raise FileNotFoundError(f"{model_dir}: no model*.safetensors or pytorch_model*.bin weights")


def checkpoint_layout(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a Hugging Face checkpoint folder (tied weights appear once)."""
    layout = {}
    for path in checkpoint_files(model_dir):
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    layout[name] = tuple(f.get_slice(name).get_shape())
        else:  # mmap: shapes without reading the tensors
            tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            layout.update((name, tuple(t.shape)) for name, t in tensors.items())
    return layout


def _meta_model(model_dir: str | Path) -> torch.nn.Module:
    """The folder's causal LM as transformers builds it, on the meta device (no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


def _tied_aliases(model: torch.nn.Module, stored: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Names transformers gives a tied parameter besides the one the checkpoint stores
    (`lm_head.weight` -> `model.embed_tokens.weight`); `stored` is the checkpoint's layout."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    aliases = {}
    for group in names.values():
        kept = [n for n in group if n in stored]
        if len(group) > 1 and len(kept) == 1:
            aliases.update((n, kept[0]) for n in group if n != kept[0])
    return aliases


class CheckpointNames:
    """The tensors of a Hugging Face checkpoint folder under its own names, and under those
    transformers gives them at run time.

    transformers 5 renames some between the two (GPT-NeoX's `embed_out.weight` is `lm_head.weight`
    at run time), fuses others (a mixture of experts' per-expert projections are one
    `mlp.experts.gate_up_proj`), and names a tied parameter under each of its names: a model's
    `state_dict()` is in run-time terms, the checkpoint and vLLM in the checkpoint's. transformers'
    own conversion mapping goes both ways; `to_checkpoint` takes it back, as `save_pretrained` does.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.layout = checkpoint_layout(model_dir)  # the checkpoint's names -> shapes
        self.model = _meta_model(model_dir)  # what transformers looks its conversion mapping up for
        # transformers' names at run time -> shapes (a tied parameter under each of its names)
        self.runtime = {name: tuple(t.shape) for name, t in self.model.state_dict().items()}
        self.aliases = _tied_aliases(self.model, self.layout)  # a tied parameter's other names -> the stored one

    def to_checkpoint(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` under the checkpoint's names: those under another name converted by
        transformers (`revert_weight_conversion`: renamed, fused experts split), the
        others as they are. Meta tensors convert too (shapes only)."""
        runtime = {name: t for name, t in tensors.items() if name not in self.layout}
        if not runtime:
            return tensors
        from transformers.core_model_loading import revert_weight_conversion

        kept = {name: t for name, t in tensors.items() if name in self.layout}
        return {**kept, **revert_weight_conversion(self.model, runtime)}


def state_dict_of(weights: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face parameter names -> tensors, on CPU.

    A transformers model gives its tensors as `save_pretrained` writes them, which is what the
    served checkpoint holds: a tied parameter once, and fused layers (mixture-of-experts experts
    in transformers 5) under their checkpoint names. A PEFT model gives its base model's, with
    the active LoRA adapter merged in (computed aside: the model itself is left unmerged). A model
    sharded with FSDP2 gives the same, gathered on rank 0 (`on_cpu`): every rank must call it.
    A state dict (or another module's) goes as it is: a replica takes the checkpoint's names and
    transformers' run-time ones (`model.state_dict()`) alike, and converts them (`CheckpointNames`).
    """
    if hasattr(weights, "peft_config"):
        model, tensors = weights.get_base_model(), _merged_lora(weights)
    elif hasattr(weights, "save_pretrained"):
        model, tensors = weights, weights.state_dict()
    else:
        model, tensors = None, weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    if model is None:
        return {name: on_cpu(t) for name, t in tensors.items()}
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    tensors = remove_tied_weights_from_state_dict(tensors, model)
    return revert_weight_conversion(model, {name: on_cpu(t) for name, t in tensors.items()})


def on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor whole, detached, on CPU. An FSDP2 shard (DTensor) is gathered from every rank, a
    collective that all ranks make in the same order; rank 0 alone keeps the values, the others
    the shape (on the meta device), so that gathering a whole model costs them no memory."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor().detach()
        if dist.get_rank() > 0:
            return tensor.to("meta")
    return tensor.detach().to("cpu")


@torch.no_grad()
def _merged_lora(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its own names, each LoRA layer's weight plus its delta."""
    from peft.tuners.lora import LoraLayer

    base, adapter = peft_model.get_base_model(), peft_model.active_adapter
    deltas = {f"{name}.base_layer.weight": module.get_delta_weight(adapter) for name, module in base.named_modules()
              if isinstance(module, LoraLayer) and adapter in module.lora_A and not module.merged}
    tensors = {}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        tensors[name.replace(".base_layer.", ".")] = tensor + deltas[name] if name in deltas else tensor
    return tensors


@dataclass(frozen=True)
class Snapshot:
    """Tensors as pushed at `version`, with their manifest: what a delta push is computed against."""

    version: int
    tensors: dict[str, torch.Tensor]
    manifest: generation_pb2.WeightManifest


@dataclass(frozen=True)
class Push:
    """One push as it goes on the wire: its manifest, and each tensor's bytes (None: none sent)."""

    manifest: generation_pb2.WeightManifest
    payloads: list[memoryview | bytes | None]

    @property
    def sent_bytes(self) -> int:
        return sum(len(p) for p in self.payloads if p is not None)


@dataclass(frozen=True)
class Update:
    """A version ready to push: its full push and, given a base, its delta against it."""

    snapshot: Snapshot
    full: Push
    delta: Push | None


def _same(name: str, tensor: torch.Tensor, base: Snapshot | None) -> bool:
    old = base.tensors.get(name) if base is not None else None
    return old is not None and old.dtype == tensor.dtype and old.shape == tensor.shape and torch.equal(old, tensor)


def _unchanged(tensors: dict[str, torch.Tensor], base: Snapshot | None) -> set[str]:
    """The names of the tensors equal to `base`'s."""
    return {name for name, tensor in tensors.items() if _same(name, tensor, base)}


def manifest(tensors: dict[str, torch.Tensor], version: int, base: Snapshot | None = None,
             unchanged: set[str] | None = None, adapter: generation_pb2.LoraAdapter | None = None
             ) -> generation_pb2.WeightManifest:
    """The manifest of a full push of `tensors` becoming `version` (with `adapter`: of a LoRA
    adapter); the digests of tensors equal to `base`'s (`unchanged`, found when not given) are
    taken from its manifest, not computed again."""
    known = {spec.name: spec.blake3_digest for spec in base.manifest.tensors} if base is not None else {}
    if unchanged is None:
        unchanged = _unchanged(tensors, base)
    specs = []
    for name, tensor in tensors.items():
        if tensor.dtype not in PROTO_DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot be pushed (float32, float16 or bfloat16)")
        reused = name in known and name in unchanged
        specs.append(generation_pb2.TensorSpec(
            name=name, dtype=PROTO_DTYPES[tensor.dtype], shape=list(tensor.shape),
            size_bytes=tensor.numel() * tensor.element_size(), blake3_digest=known[name] if reused else digest(tensor),
        ))
    return generation_pb2.WeightManifest(policy_version=version, tensors=specs, lora_adapter=adapter)


def full_push(tensors: dict[str, torch.Tensor], version: int, base: Snapshot | None = None,
              adapter: generation_pb2.LoraAdapter | None = None) -> Push:
    """Every tensor's raw bytes (digests of those equal to `base`'s reused)."""
    return Push(manifest(tensors, version, base, adapter=adapter), [raw_bytes(t) for t in tensors.values()])


def lora_adapter_of(peft_model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], generation_pb2.LoraAdapter]:
    """A PEFT model's active LoRA adapter as an adapter push sends it: its tensors under the names
    `save_pretrained` writes to adapter_model.safetensors, on CPU, and its configuration."""
    from peft import get_peft_model_state_dict

    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    if config.peft_type != "LORA":
        raise ValueError(f"adapter {name!r} is {config.peft_type}, not LoRA")
    tensors = get_peft_model_state_dict(peft_model, adapter_name=name)
    if isinstance(config.target_modules, str):
        raise ValueError(f"adapter {name!r}: target_modules as a pattern ({config.target_modules!r}) cannot be "
                         "pushed; list the modules")
    spec = generation_pb2.LoraAdapter(r=config.r, lora_alpha=config.lora_alpha,
                                      target_modules=sorted(config.target_modules),
                                      use_rslora=config.use_rslora)
    return {n: on_cpu(t) for n, t in tensors.items()}, spec


def prepare(tensors: dict[str, torch.Tensor], version: int, base: Snapshot | None = None,
            adapter: generation_pb2.LoraAdapter | None = None) -> Update:
    """`tensors` as `version`: the full push, and with `base` the delta push, hashed once for both.
    The snapshot holds a copy, so a model trained on afterwards leaves it as pushed.

    The delta sends each changed tensor as a zstd frame of its raw bytes XOR the base's: the
    values an optimizer step leaves as they were (most bf16 ones) XOR to zero bytes, which
    compress to almost nothing. An unchanged tensor costs only its manifest entry.
    """
    tensors = {name: t.detach().clone() for name, t in tensors.items()}  # the base of a later delta: frozen
    unchanged = _unchanged(tensors, base)  # compared once, for the digests and the delta
    full = manifest(tensors, version, base, unchanged, adapter)
    push, snapshot = Push(full, [raw_bytes(t) for t in tensors.values()]), Snapshot(version, tensors, full)
    if base is None or adapter is not None:  # an adapter is small: always sent in full
        return Update(snapshot, push, None)
    compressor = zstandard.ZstdCompressor(level=1)
    delta = generation_pb2.WeightManifest(policy_version=version, tensors=full.tensors, base_version=base.version)
    payloads: list[memoryview | bytes | None] = []
    for spec, (name, tensor) in zip(delta.tensors, tensors.items(), strict=True):
        old = base.tensors.get(name)
        if name in unchanged:
            spec.encoding = generation_pb2.TENSOR_ENCODING_UNCHANGED
            payloads.append(None)
        elif old is not None and old.dtype == tensor.dtype and old.shape == tensor.shape:
            xor = np.bitwise_xor(np.frombuffer(raw_bytes(tensor), np.uint8), np.frombuffer(raw_bytes(old), np.uint8))
            payloads.append(compressor.compress(xor.data))
            spec.encoding, spec.encoded_size_bytes = generation_pb2.TENSOR_ENCODING_XOR_ZSTD, len(payloads[-1])
        else:  # not in the base: its raw bytes
            payloads.append(raw_bytes(tensor))
    return Update(snapshot, push, Push(delta, payloads))


def push_requests(push: Push) -> Iterator[bytes]:
    """The serialized PushWeightsRequest messages of an in-band push: the manifest, then the chunks."""
    yield generation_pb2.PushWeightsRequest(manifest=push.manifest).SerializeToString()
    yield from chunk_requests((i, p) for i, p in enumerate(push.payloads) if p is not None)


def chunk_requests(payloads: Iterable[tuple[int, memoryview | bytes]], chunk_bytes: int = CHUNK_BYTES
                   ) -> Iterable[bytes]:
    """Each (manifest index, bytes) as serialized `PushWeightsRequest` chunks of at most `chunk_bytes`
    (field 2, as in `FetchWeightsResponse`).

    Encoded here rather than through `WeightChunk(data=...)`: protobuf copies each chunk into a
    fresh arena and again when it is nested, 0.35 s of a 195 MB push; this is one copy.
    """
    for index, data in payloads:
        for offset in range(0, max(len(data), 1), chunk_bytes):
            piece = data[offset : offset + chunk_bytes]
            # WeightChunk: tensor_index and offset_bytes as protobuf writes them, then field 3 (data)
            head = generation_pb2.WeightChunk(tensor_index=index, offset_bytes=offset).SerializeToString()
            if len(piece):
                head += b"\x1a" + _varint(len(piece))
            yield b"".join((b"\x12", _varint(len(head) + len(piece)), head, piece))  # PushWeightsRequest.chunk


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def gloo_group(master_address: str, master_port: int, rank: int, world_size: int,
               timeout_s: float) -> dist.ProcessGroup:
    """A gloo group of its own (the default process group is left alone); rank 0 hosts the store."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore("rlhf_mesh_weights", store), rank, world_size, timeout)
