"""launch.training.allocator.reuse_heap: after it, a freed large block stays in the process (the
next allocation of that size reuses it) instead of going back to the kernel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import torch
from launch.training.allocator import reuse_heap

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

applied = reuse_heap() if sys.argv[1] == "reuse" else False
before = rss_mb()
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, above glibc's largest mmap threshold
held = rss_mb()
del block
after_free = rss_mb()
print(json.dumps({"applied": applied, "held": held - before, "after_free": after_free - before}))
"""


def _probe(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_reuse_heap_keeps_freed_blocks() -> None:
    default, reuse = _probe("default"), _probe("reuse")
    assert reuse["applied"] is True
    assert default["held"] > 60 and reuse["held"] > 60, (default, reuse)
    assert default["after_free"] < 8, default  # glibc's default unmaps the block
    assert reuse["after_free"] > 60, reuse  # kept in the heap for the next step
