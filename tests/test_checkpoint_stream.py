"""The streaming safetensors writer against the safetensors library's own readers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moe.checkpoint.stream import StreamingSafetensorsWriter, sha256_of_file


def test_written_tensors_read_back_with_the_library(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "embed": torch.randn(7, 5, generator=generator),
        "half": torch.randn(3, 3, generator=generator).to(torch.bfloat16),
        "fp16": torch.randn(2, 9, generator=generator).half(),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "ids": torch.randint(-5, 5, (11,), generator=generator, dtype=torch.int64),
        "int8": torch.randint(-128, 127, (3, 5), generator=generator, dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
        "slice": torch.randn(6, 8, generator=generator)[:, 2:5],  # not contiguous
    }
    path = tmp_path / "file.safetensors"
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with StreamingSafetensorsWriter(path, specs, metadata={"format": "pt"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        digest = writer.close()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_of_file(path)
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert torch.equal(handle.get_slice("embed")[2:4], tensors["embed"][2:4])
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_out_of_order_or_missing_tensors_are_refused_and_leave_nothing(tmp_path: Path) -> None:
    path = tmp_path / "file.safetensors"
    specs = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    with (
        pytest.raises(ValueError, match=r"got 'b'.*the next declared tensor is 'a'"),
        StreamingSafetensorsWriter(path, specs) as writer,
    ):
        writer.write("b", torch.zeros(3))
    with (
        pytest.raises(ValueError, match=r"got 'a' torch.float32 \(3,\)"),
        StreamingSafetensorsWriter(path, specs) as writer,
    ):
        writer.write("a", torch.zeros(3))
    writer = StreamingSafetensorsWriter(path, specs)
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match=r"tensors \['b'\] were never written"):
        writer.close()
    assert list(tmp_path.iterdir()) == []
