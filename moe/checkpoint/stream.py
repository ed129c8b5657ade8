"""safetensors files written and checked one tensor at a time, for files larger than the
memory one wants to spend on them (importing and exporting whole HF models).

`safetensors.torch.save` needs every tensor of a file in memory at once and returns the
file as one `bytes` (a second copy); the library has no incremental writer. The format is
simple (an 8-byte little-endian header length, a JSON header with every tensor's dtype,
shape and byte range, then the raw little-endian bytes with no holes), so
`StreamingSafetensorsWriter` declares the tensors up front, writes the header, then each
tensor's bytes as it comes, hashing them on the way; readers are the library's own
(`safe_open`, `safetensors.torch.load`). `sha256_of_file` hashes a file in chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch

# The safetensors names of the torch dtypes a checkpoint may hold.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CHUNK_BYTES = 1 << 22


def tensor_bytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel * torch.empty((), dtype=dtype).element_size()


class StreamingSafetensorsWriter:
    """One safetensors file, written tensor by tensor in the declared order.

    `specs`: (name, dtype, shape) of every tensor the file will hold; `metadata`: the
    header's string-to-string `__metadata__` (transformers wants {"format": "pt"}). The file appears
    at `path` only on `close()` (written under a temporary name, fsynced, renamed);
    `close()` returns its sha256. Used as a context manager, an exception removes the
    partial file."""

    def __init__(
        self,
        path: str | Path,
        specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        names = [name for name, _, _ in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.path.name}: tensor names repeat in {names}")
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        self._order: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        offset = 0
        for name, dtype, shape in specs:
            if dtype not in DTYPE_NAMES:
                raise ValueError(
                    f"{name}: dtype {dtype} is not storable; accepted: {list(DTYPE_NAMES)}"
                )
            size = tensor_bytes(dtype, shape)
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": [int(s) for s in shape],
                "data_offsets": [offset, offset + size],
            }
            self._order.append((name, dtype, tuple(int(s) for s in shape)))
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._temp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.part")
        self._handle = open(self._temp, "wb")  # noqa: SIM115 (closed in close/abort)
        self._hash = hashlib.sha256()
        self._emit(struct.pack("<Q", len(text)) + text)
        self._next = 0

    def _emit(self, data: bytes | memoryview) -> None:
        self._handle.write(data)
        self._hash.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next declared tensor (its name, dtype and shape must match)."""
        if self._next >= len(self._order):
            raise ValueError(f"{self.path.name}: {name!r} is beyond the declared tensors")
        expected, dtype, shape = self._order[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (expected, dtype, shape):
            raise ValueError(
                f"{self.path.name}: got {name!r} {tensor.dtype} {tuple(tensor.shape)}; the next "
                f"declared tensor is {expected!r} {dtype} {shape}"
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self._emit(flat.view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> str:
        """Finish the file (every declared tensor written) and return its sha256."""
        if self._next != len(self._order):
            missing = [name for name, _, _ in self._order[self._next :]]
            self.abort()
            raise ValueError(f"{self.path.name}: tensors {missing[:5]} were never written")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._temp, self.path)
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Drop the partial file."""
        if not self._handle.closed:
            self._handle.close()
        self._temp.unlink(missing_ok=True)

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is not None:
            self.abort()


def sha256_of_file(path: str | Path) -> str:
    """The sha256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
