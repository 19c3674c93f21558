"""The service side of a weight update: check the manifest, stage in-band bytes, verify them.

An in-band push is written straight into a safetensors file (header first, then each chunk
at its offset) in a memory-backed folder; once every byte is in and every digest matches,
the vLLM workers read the file (services/generation/weight_transfer.py). A push that fails
or is interrupted only ever touched its own staging file.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from rlhf_mesh.v1 import generation_pb2
from rlhf_mesh.weights import SAFETENSORS_DTYPES, TORCH_DTYPES, digest


class WeightRejected(ValueError):
    """The tensors of a push do not fit the served policy (INVALID_ARGUMENT)."""


class StaleVersion(ValueError):
    """The push's version is not above the served one (FAILED_PRECONDITION)."""


def check_manifest(manifest: generation_pb2.WeightManifest, layout: dict[str, tuple[int, ...]],
                   aliases: dict[str, str], dtype: torch.dtype, served_version: int) -> dict[str, str]:
    """A full set of the policy's tensors, in the served dtype, for a newer version.

    A tied parameter may come once, under any of its names (`aliases`: transformers' other
    name -> the checkpoint's), or under several with the same bytes. Returns the name each
    tensor to load goes under in the checkpoint's terms; a tied copy beyond the first is left out.
    """
    if manifest.policy_version <= served_version:
        raise StaleVersion(
            f"policy_version {manifest.policy_version} is not above the served version {served_version}"
        )
    load_as: dict[str, str] = {}
    first: dict[str, generation_pb2.TensorSpec] = {}  # checkpoint name -> the first tensor given for it
    seen = set()
    for i, spec in enumerate(manifest.tensors):
        where = f"tensors[{i}] {spec.name!r}"
        stored = aliases.get(spec.name, spec.name)
        if stored not in layout:
            raise WeightRejected(f"{where}: not a parameter of the served policy")
        if spec.name in seen:
            raise WeightRejected(f"{where}: given twice")
        seen.add(spec.name)
        if TORCH_DTYPES.get(spec.dtype) != dtype:
            got = generation_pb2.TensorDtype.Name(spec.dtype)
            raise WeightRejected(f"{where}: dtype {got}, the served policy is {str(dtype).removeprefix('torch.')}")
        if tuple(spec.shape) != layout[stored]:
            raise WeightRejected(f"{where}: shape {list(spec.shape)}, expected {list(layout[stored])}")
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
    missing = sorted(set(layout) - set(first))
    if missing:
        raise WeightRejected(f"missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                             f"({len(missing)} of {len(layout)})")
    return load_as


class StagingFile:
    """A safetensors file laid out from the manifest, filled chunk by chunk.

    A tensor's digest is computed in a thread as soon as its last byte is in, while the
    stream goes on; `verify` waits for the rest.
    """

    def __init__(self, folder: str, manifest: generation_pb2.WeightManifest) -> None:
        self.specs = list(manifest.tensors)
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
        fd, self.path = tempfile.mkstemp(prefix="rlhf-mesh-push-", suffix=".safetensors", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            f.truncate(self.data_start + offset)
        self._file = open(self.path, "r+b")  # noqa: SIM115 - closed in close()
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if offset else None  # digests
        self.received = [0] * len(self.specs)
        self._digests: dict[int, Future[bytes]] = {}
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="push-digest")

    def write(self, chunk: generation_pb2.WeightChunk) -> None:
        if chunk.tensor_index >= len(self.specs):
            raise WeightRejected(f"chunk for tensor_index {chunk.tensor_index}; the manifest has {len(self.specs)}")
        spec = self.specs[chunk.tensor_index]
        end = chunk.offset_bytes + len(chunk.data)
        if end > spec.size_bytes:
            raise WeightRejected(f"tensor {spec.name!r}: chunk at offset {chunk.offset_bytes} of "
                                 f"{len(chunk.data)} bytes runs past its {spec.size_bytes} bytes")
        start = self.data_start + self.offsets[chunk.tensor_index] + chunk.offset_bytes
        os.pwrite(self._file.fileno(), chunk.data, start)
        self.received[chunk.tensor_index] += len(chunk.data)
        if self.received[chunk.tensor_index] == spec.size_bytes and chunk.tensor_index not in self._digests:
            self._digests[chunk.tensor_index] = self._hasher.submit(self._digest, chunk.tensor_index)

    @property
    def received_bytes(self) -> int:
        return sum(self.received)

    def _digest(self, index: int) -> bytes:
        if self._map is None:
            return digest(b"")
        start = self.data_start + self.offsets[index]
        with memoryview(self._map)[start : start + self.specs[index].size_bytes] as view:
            return digest(view)

    def verify(self) -> None:
        """Every byte arrived once and every digest matches; raises WeightRejected naming the tensor."""
        for i, spec in enumerate(self.specs):
            if self.received[i] != spec.size_bytes:
                raise WeightRejected(f"tensor {spec.name!r}: received {self.received[i]} of {spec.size_bytes} bytes")
            # bytes that arrived after the digest was taken would have made received exceed the size
            taken = self._digests[i].result() if i in self._digests else self._digest(i)  # empty, never sent
            if taken != spec.blake3_digest:
                raise WeightRejected(f"tensor {spec.name!r}: BLAKE3 digest of the received bytes does not match")

    def close(self) -> None:
        self._hasher.shutdown(cancel_futures=True)  # waits for a digest that is running
        if self._map is not None:
            self._map.close()
        self._file.close()
        Path(self.path).unlink(missing_ok=True)
