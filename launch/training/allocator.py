"""The host allocator setting of a training process (`train.reuse_heap`).

glibc's malloc serves every block above its mmap threshold (at most 32 MiB on 64-bit,
and it starts at 128 KiB) with a fresh `mmap`, and unmaps it on free. A training step
allocates the same large temporaries every step: at bench_layer's E=64 the expert weight
gradients are `[64, 512, 512]` (64 MiB each) and the routed activations 32 MiB, so each
step page-faults and zeroes them again. Keeping freed memory in the heap (no mmap, no
trimming: `M_MMAP_MAX=0`, `M_TRIM_THRESHOLD` very large) lets the next step reuse it.
Measured in `scripts/layer_anatomy.py` (docs/BENCHMARKS.md): 773 -> 574 ms per E=64 layer
step, 549 -> 479 ms for the dense floor. The cost: the process keeps its peak heap
resident until it exits, which a training process reaches on its first step anyway.

This is `mallopt(3)`, the runtime form of
`GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`; it changes
nothing on a C library other than glibc (musl, macOS), where `reuse_heap` returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def reuse_heap() -> bool:
    """Keep freed blocks in this process's heap from now on (see the module docstring).
    True when applied (glibc), False where the C library has no such setting."""
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success.
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM))
