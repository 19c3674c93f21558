"""The service side of a weight update: check the manifest, stage in-band bytes, verify them.

An in-band push is written straight into a safetensors file (header first, then each chunk
at its offset) in a memory-backed folder; once every byte is in and every digest matches,
the vLLM workers read the file (services/generation/weight_transfer.py). A push that fails
or is interrupted only ever touched its own staging file.

An adapter push (a LoRA adapter, `check_adapter`) is staged the same way, then moved into a
folder laid out as PEFT saves an adapter, which vLLM loads.

A delta push names a base version: the service keeps the staging file of its last in-band
push (`BaseFile`) and rebuilds each changed tensor from its zstd-framed XOR against it;
unchanged ones are copied from it. The digests of the whole tensors are checked either way,
so a delta never installs other bytes than the full push would.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import torch
import zstandard

from rlhf_mesh.v1 import generation_pb2
from rlhf_mesh.weights import SAFETENSORS_DTYPES, TORCH_DTYPES, CheckpointNames, chunk_requests, digest

PREFIX = "rlhf-mesh-push-"  # then the owner's pid: staging files and bases of a process that died can go


def remove_orphans(folder: str) -> list[Path]:
    """Remove the staging files, kept bases and adapters of processes that are gone, e.g. killed mid-push."""
    removed = []
    for path in Path(folder).glob(f"{PREFIX}*"):
        owner = path.name.removeprefix(PREFIX).split("-", 1)[0]
        if owner.isdigit() and not psutil.pid_exists(int(owner)):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class WeightRejected(ValueError):
    """The tensors of a push do not fit the served policy (INVALID_ARGUMENT)."""


class StaleVersion(ValueError):
    """The push's version is not above the served one (FAILED_PRECONDITION)."""


def check_manifest(manifest: generation_pb2.WeightManifest, names: CheckpointNames, dtype: torch.dtype,
                   served_version: int) -> dict[str, str]:
    """A full set of the policy's tensors, in the served dtype, for a newer version.

    Each tensor comes under its checkpoint name or under the one transformers gives it at run
    time (`model.state_dict()`: renamed, fused experts), and the two may mix. A tied parameter may
    come once, under any of its names (`names.aliases`), or under several with the same bytes.
    Returns the name each tensor is loaded under (the checkpoint's, or a run-time name that
    `names.to_checkpoint` converts); a tied copy beyond the first is left out.
    """
    if manifest.policy_version <= served_version:
        raise StaleVersion(
            f"policy_version {manifest.policy_version} is not above the served version {served_version}"
        )
    layout = names.layout
    load_as: dict[str, str] = {}
    first: dict[str, generation_pb2.TensorSpec] = {}  # loaded name -> the first tensor given for it
    seen = set()
    for i, spec in enumerate(manifest.tensors):
        where = f"tensors[{i}] {spec.name!r}"
        stored = names.aliases.get(spec.name, spec.name)
        expected = layout[stored] if stored in layout else names.runtime.get(stored)
        if expected is None:
            raise WeightRejected(f"{where}: not a parameter of the served policy")
        if spec.name in seen:
            raise WeightRejected(f"{where}: given twice")
        seen.add(spec.name)
        if TORCH_DTYPES.get(spec.dtype) != dtype:
            known = spec.dtype in generation_pb2.TensorDtype.values()
            got = generation_pb2.TensorDtype.Name(spec.dtype) if known else f"{spec.dtype} (not a TensorDtype)"
            raise WeightRejected(f"{where}: dtype {got}, the served policy is {str(dtype).removeprefix('torch.')}")
        if tuple(spec.shape) != expected:
            raise WeightRejected(f"{where}: shape {list(spec.shape)}, expected {list(expected)}")
        if spec.size_bytes != torch.Size(spec.shape).numel() * dtype.itemsize:
            raise WeightRejected(f"{where}: size_bytes {spec.size_bytes} does not match its shape and dtype")
        if len(spec.blake3_digest) != 32:
            raise WeightRejected(f"{where}: blake3_digest must be 32 bytes")
        if stored in first:
            if spec.blake3_digest != first[stored].blake3_digest:
                raise WeightRejected(f"{where} and {first[stored].name!r} are tied in the served policy "
                                     "but their bytes differ")
            continue
        first[stored] = spec
        load_as[spec.name] = stored
    shapes = _converted_shapes({name: tuple(spec.shape) for name, spec in first.items()}, names, dtype)
    for name, shape in shapes.items():
        if layout.get(name) != shape:  # what transformers made of run-time tensors of the right shapes
            raise WeightRejected(f"the tensors under run-time names convert to {name!r} of shape {list(shape)}, "
                                 "which is not a parameter of the served policy in that shape")
    missing = sorted(set(layout) - set(shapes))
    if missing:
        raise WeightRejected(f"missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                             f"({len(missing)} of {len(layout)})")
    return load_as


def _converted_shapes(given: dict[str, tuple[int, ...]], names: CheckpointNames, dtype: torch.dtype
                      ) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensors that `given` (loaded names -> shapes) makes: the stored ones as
    they are, the others converted on the meta device as the workers convert their bytes. Refuses
    a tensor given in both forms."""
    stored = {name: shape for name, shape in given.items() if name in names.layout}
    runtime = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in given.items()
               if name not in stored}
    try:
        converted = names.to_checkpoint(runtime)
    except Exception as err:  # transformers' conversion of the caller's tensors: any failure is theirs
        raise WeightRejected(f"the tensors under run-time names do not convert to the checkpoint's: {err}") from None
    twice = sorted(converted.keys() & stored.keys())
    if twice:
        raise WeightRejected(f"{twice[:3]}{' ...' if len(twice) > 3 else ''}: given both under the checkpoint's "
                             "name and within a tensor under a run-time name")
    if sum(t.numel() for t in converted.values()) != sum(t.numel() for t in runtime.values()):
        raise WeightRejected("the tensors under run-time names do not convert one to one: some overlap")
    return {**stored, **{name: tuple(t.shape) for name, t in converted.items()}}


class NotServable(ValueError):
    """The replica is not in a state to take this kind of push (FAILED_PRECONDITION)."""


_ADAPTER_TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")


def check_adapter(manifest: generation_pb2.WeightManifest, layout: dict[str, tuple[int, ...]], max_lora_rank: int,
                  served_version: int) -> None:
    """A LoRA adapter of the served base model (PEFT's tensor names), within the served rank, for a
    newer version. max_lora_rank 0: the replica was started without LoRA."""
    if not max_lora_rank:
        raise NotServable("this replica serves no LoRA adapters: start it with enable_lora")
    if manifest.policy_version <= served_version:
        raise StaleVersion(
            f"policy_version {manifest.policy_version} is not above the served version {served_version}"
        )
    if manifest.HasField("base_version"):
        raise WeightRejected("an adapter push is sent in full: no base_version")
    adapter = manifest.lora_adapter
    if not 1 <= adapter.r <= max_lora_rank:
        raise WeightRejected(f"lora_adapter.r {adapter.r} is not within 1..{max_lora_rank} (max_lora_rank)")
    if not adapter.lora_alpha > 0 or not adapter.target_modules:
        raise WeightRejected("lora_adapter needs lora_alpha > 0 and target_modules")
    parts: dict[str, set[str]] = {}
    for i, spec in enumerate(manifest.tensors):
        where = f"tensors[{i}] {spec.name!r}"
        match = _ADAPTER_TENSOR.fullmatch(spec.name)
        if match is None:
            raise WeightRejected(f"{where}: not a LoRA tensor (base_model.model.<module>.lora_A|lora_B.weight)")
        module, part = match["module"], match["part"]
        base = layout.get(f"{module}.weight")
        if base is None or len(base) != 2:
            raise WeightRejected(f"{where}: {module!r} is not a linear layer of the served policy")
        if not any(module == t or module.endswith(f".{t}") for t in adapter.target_modules):  # PEFT's matching
            targets = list(adapter.target_modules)
            raise WeightRejected(f"{where}: {module!r} is not in target_modules "
                                 f"{targets[:8]}{' ...' if len(targets) > 8 else ''}")
        if part in parts.setdefault(module, set()):
            raise WeightRejected(f"{where}: given twice")
        parts[module].add(part)
        expected = (adapter.r, base[1]) if part == "A" else (base[0], adapter.r)
        if tuple(spec.shape) != expected:
            raise WeightRejected(f"{where}: shape {list(spec.shape)}, expected {list(expected)}")
        dtype = TORCH_DTYPES.get(spec.dtype)
        if dtype is None or spec.size_bytes != torch.Size(spec.shape).numel() * dtype.itemsize:
            raise WeightRejected(f"{where}: size_bytes {spec.size_bytes} does not match its shape and dtype")
        if len(spec.blake3_digest) != 32:
            raise WeightRejected(f"{where}: blake3_digest must be 32 bytes")
    if not parts:
        raise WeightRejected("an adapter push needs at least one module's lora_A and lora_B")
    half = sorted(module for module, got in parts.items() if len(got) != 2)
    if half:
        raise WeightRejected(f"lora_A or lora_B missing for {half[:5]}")


def adapter_folder(staged: str, manifest: generation_pb2.WeightManifest) -> str:
    """A verified adapter push as PEFT saves an adapter (what vLLM loads): the staged safetensors
    file moved into a folder beside it, with its adapter_config.json."""
    adapter = manifest.lora_adapter
    folder = Path(staged).with_name(f"{PREFIX}{os.getpid()}-adapter-{manifest.policy_version}")
    folder.mkdir()
    Path(staged).rename(folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": adapter.r, "lora_alpha": adapter.lora_alpha, "use_rslora": adapter.use_rslora,
        "target_modules": list(adapter.target_modules), "bias": "none",
    }))
    return str(folder)


class StaleBase(ValueError):
    """A delta push against a version this replica does not serve or holds no full copy of
    (FAILED_PRECONDITION: the sender pushes in full instead)."""


def _max_frame(size: int) -> int:
    """The largest zstd frame a delta of `size` bytes may take (zstd's worst case, with room)."""
    return size + size // 128 + 1024


def check_delta(manifest: generation_pb2.WeightManifest, base: BaseFile | None, served_version: int) -> None:
    """A full push carries raw bytes only; a delta push names the served version as its base,
    which this replica holds in full, and every encoded tensor fits its base's."""
    if not manifest.HasField("base_version"):
        for i, spec in enumerate(manifest.tensors):
            if spec.encoding != generation_pb2.TENSOR_ENCODING_UNSPECIFIED:
                raise WeightRejected(f"tensors[{i}] {spec.name!r}: an encoded tensor needs base_version (a delta push)")
        return
    wanted = manifest.base_version
    if base is None or base.version != wanted or served_version != wanted:
        held = "no full copy" if base is None else f"the full tensors of version {base.version}"
        raise StaleBase(f"a delta against version {wanted}: this replica serves version {served_version} and "
                        f"holds {held}; push in full")
    for i, spec in enumerate(manifest.tensors):
        where = f"tensors[{i}] {spec.name!r}"
        if spec.encoding == generation_pb2.TENSOR_ENCODING_UNSPECIFIED:
            continue  # raw bytes, as in a full push
        old = base.specs.get(spec.name)
        if old is None or old.dtype != spec.dtype or list(old.shape) != list(spec.shape):
            raise StaleBase(f"{where}: not in the base version {wanted} with this dtype and shape; push in full")
        if spec.encoding == generation_pb2.TENSOR_ENCODING_UNCHANGED:
            if spec.encoded_size_bytes:
                raise WeightRejected(f"{where}: an unchanged tensor carries no bytes")
            if spec.blake3_digest != old.blake3_digest:  # the sender's base is another one
                raise StaleBase(f"{where}: marked unchanged, but its digest is not the one of version {wanted} "
                                "held here; push in full")
        elif spec.encoding == generation_pb2.TENSOR_ENCODING_XOR_ZSTD:
            if not 0 < spec.encoded_size_bytes <= _max_frame(spec.size_bytes):
                raise WeightRejected(f"{where}: encoded_size_bytes {spec.encoded_size_bytes} out of range for "
                                     f"{spec.size_bytes} bytes")
        else:
            raise WeightRejected(f"{where}: unknown encoding {spec.encoding}")


def full_manifest(manifest: generation_pb2.WeightManifest) -> generation_pb2.WeightManifest:
    """The manifest of the full push of the same tensors (a delta's, without its encodings)."""
    full = generation_pb2.WeightManifest(policy_version=manifest.policy_version, tensors=manifest.tensors)
    for spec in full.tensors:
        spec.ClearField("encoding")
        spec.ClearField("encoded_size_bytes")
    return full


class BaseFile:
    """The full tensors of the last in-band push, kept in the staging folder: what a delta applies
    to, and what a peer that catches up is sent."""

    def __init__(self, path: str, manifest: generation_pb2.WeightManifest, owned: bool = True) -> None:
        self.path, self.version, self.owned = path, manifest.policy_version, owned
        self.manifest = full_manifest(manifest)
        self.specs = {spec.name: spec for spec in self.manifest.tensors}
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        (length,) = struct.unpack("<Q", self._file.read(8))
        header = json.loads(self._file.read(length))
        self._ranges = {name: (8 + length + a, 8 + length + b) for name, entry in header.items()
                        if name != "__metadata__" for a, b in [entry["data_offsets"]]}
        size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + length else None

    def view(self, name: str) -> memoryview:
        start, end = self._ranges[name]
        return memoryview(self._map)[start:end] if self._map is not None else memoryview(b"")

    def reopen(self) -> BaseFile:
        """A reader of its own, which stays readable when this base is replaced and removed."""
        return BaseFile(self.path, self.manifest, owned=False)

    def messages(self) -> Iterator[bytes]:
        """The serialized FetchWeightsResponse messages of these tensors: the manifest, then each
        tensor's chunks (one copy of the bytes; protobuf messages would take four)."""
        yield generation_pb2.FetchWeightsResponse(manifest=self.manifest).SerializeToString()
        yield from chunk_requests((i, self.view(spec.name)) for i, spec in enumerate(self.manifest.tensors))

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._file.close()
        if self.owned:
            Path(self.path).unlink(missing_ok=True)


class StagingFile:
    """A safetensors file laid out from the manifest, filled chunk by chunk.

    A tensor's digest is computed in a thread as soon as its last byte is in, while the
    stream goes on; `verify` waits for the rest. In a delta push (`base`), an encoded tensor's
    frame is buffered, then decoded against the base's bytes into the file, and an unchanged
    one is copied from the base (whose digests were checked when it was pushed).
    """

    def __init__(self, folder: str, manifest: generation_pb2.WeightManifest, base: BaseFile | None = None) -> None:
        self.specs = list(manifest.tensors)
        self.base = base if manifest.HasField("base_version") else None
        header: dict[str, dict] = {}
        offset = 0
        self.offsets = []
        for spec in self.specs:
            header[spec.name] = {"dtype": SAFETENSORS_DTYPES[TORCH_DTYPES[spec.dtype]], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.size_bytes]}
            self.offsets.append(offset)
            offset += spec.size_bytes
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.data_start = 8 + len(encoded)
        fd, self.path = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", suffix=".safetensors", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            f.truncate(self.data_start + offset)
        self._file = open(self.path, "r+b")  # noqa: SIM115 - closed in close()
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if offset else None  # digests
        self.received = [0] * len(self.specs)
        self._frames: dict[int, bytearray] = {}  # encoded tensors of a delta push, as they arrive
        self._digests: dict[int, Future[bytes]] = {}
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="push-digest")
        self._kept = False
        for i, spec in enumerate(self.specs):
            if spec.encoding == generation_pb2.TENSOR_ENCODING_UNCHANGED:
                self._digests[i] = self._hasher.submit(self._copy_base, i)

    def _expected(self, spec: generation_pb2.TensorSpec) -> int:
        """The bytes that come for a tensor."""
        if spec.encoding == generation_pb2.TENSOR_ENCODING_UNSPECIFIED:
            return spec.size_bytes
        return spec.encoded_size_bytes

    def write(self, chunk: generation_pb2.WeightChunk) -> None:
        if chunk.tensor_index >= len(self.specs):
            raise WeightRejected(f"chunk for tensor_index {chunk.tensor_index}; the manifest has {len(self.specs)}")
        index, spec = chunk.tensor_index, self.specs[chunk.tensor_index]
        expected = self._expected(spec)
        end = chunk.offset_bytes + len(chunk.data)
        if end > expected:
            raise WeightRejected(f"tensor {spec.name!r}: chunk at offset {chunk.offset_bytes} of "
                                 f"{len(chunk.data)} bytes runs past its {expected} bytes")
        if spec.encoding == generation_pb2.TENSOR_ENCODING_XOR_ZSTD:
            frame = self._frames.setdefault(index, bytearray(expected))
            frame[chunk.offset_bytes:end] = chunk.data
        else:
            os.pwrite(self._file.fileno(), chunk.data, self.data_start + self.offsets[index] + chunk.offset_bytes)
        self.received[index] += len(chunk.data)
        if self.received[index] == expected and index not in self._digests:
            work = self._decode if spec.encoding == generation_pb2.TENSOR_ENCODING_XOR_ZSTD else self._digest
            self._digests[index] = self._hasher.submit(work, index)

    @property
    def received_bytes(self) -> int:
        return sum(self.received)

    def _digest(self, index: int) -> bytes:
        if self._map is None:
            return digest(b"")
        start = self.data_start + self.offsets[index]
        with memoryview(self._map)[start : start + self.specs[index].size_bytes] as view:
            return digest(view)

    def _decode(self, index: int) -> bytes:
        """The base's bytes XOR the decoded frame, into the file; their digest."""
        spec = self.specs[index]
        try:
            delta = zstandard.ZstdDecompressor().decompress(bytes(self._frames.pop(index)),
                                                           max_output_size=spec.size_bytes)
        except zstandard.ZstdError as err:
            raise WeightRejected(f"tensor {spec.name!r}: its delta does not decode ({err})") from None
        if len(delta) != spec.size_bytes:
            raise WeightRejected(f"tensor {spec.name!r}: its delta decodes to {len(delta)} bytes, "
                                 f"not {spec.size_bytes}")
        with self.base.view(spec.name) as old:
            rebuilt = np.bitwise_xor(np.frombuffer(delta, np.uint8), np.frombuffer(old, np.uint8))
        os.pwrite(self._file.fileno(), rebuilt.data, self.data_start + self.offsets[index])
        return self._digest(index)

    def _copy_base(self, index: int) -> bytes:
        """An unchanged tensor: the base's bytes, with the base's digest (check_delta compared it)."""
        spec = self.specs[index]
        with self.base.view(spec.name) as old:
            os.pwrite(self._file.fileno(), old, self.data_start + self.offsets[index])
        return spec.blake3_digest

    def verify(self) -> None:
        """Every byte arrived once and every digest matches; raises WeightRejected naming the tensor."""
        for i, spec in enumerate(self.specs):
            expected = self._expected(spec)
            if self.received[i] != expected:
                raise WeightRejected(f"tensor {spec.name!r}: received {self.received[i]} of {expected} bytes")
            # bytes that arrived after the digest was taken would have made received exceed the size
            taken = self._digests[i].result() if i in self._digests else self._digest(i)  # empty, never sent
            if taken != spec.blake3_digest:
                raise WeightRejected(f"tensor {spec.name!r}: BLAKE3 digest of the received bytes does not match")

    def keep(self) -> str:
        """Leave the file in place when closed (the next delta's base); its path."""
        self._kept = True
        return self.path

    def close(self) -> None:
        self._hasher.shutdown(cancel_futures=True)  # waits for a digest that is running
        if self._map is not None:
            self._map.close()
        self._file.close()
        if not self._kept:
            Path(self.path).unlink(missing_ok=True)
