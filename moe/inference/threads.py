"""Intra-op threads of an engine step on CPU: a step of few tokens runs on one thread
(llama.cpp's `--threads` against `--threads-batch`: decode and prompt processing get
their own thread counts).

A decode step's products are tiny (B rows x the model's width), yet some CPU kernels
open an OpenMP parallel region for every call whatever its size: oneDNN's bf16 matmul
(every `nn.Linear` and expert product of a bf16 model: 29 regions per decode step of the
demo model at B=1, against 4 in fp32, where MKL keeps products this small on the calling
thread), its GELU, and the int8 weight-only product. Each region ends in a barrier that
waits for every thread of the team; on a host whose cores are shared (load above the
core count), a thread of the team is often descheduled and the barrier waits for its
next time slice. Measured on the 2-core host at load ~3.5 (2 threads, ONEDNN_VERBOSE):
every oneDNN call of a bf16 decode step took ~11 ms, so a step took 26 ms where fp32
took 4.5 ms; a [1, 128] x [128, 256] bf16 product took 7.8 ms on 2 threads and 32 us on
one (docs/BENCHMARKS.md, Generation). The arithmetic of such a step does not need a
second thread, so a step of at most `SERIAL_STEP_TOKENS` tokens (`InferenceEngine`'s
`serial_step_tokens`) runs with one intra-op thread and the caller's count is restored
after it; larger steps (prefill) keep it. On a quiet host (load below the core count)
two threads did as well at B=1 and up to 16% better at B=32 (12.4 against 10.4 ms per
bf16 step, 3 rounds): hence the default of 8 tokens (small batches, where one thread
never lost); a host that is shared beyond its cores gains from a higher limit (a loaded
B=32 bf16 step: 56.8 ms on two threads, 12.9 on one).

`torch.set_num_threads` sets the calling thread's OpenMP team size (the engine's step
runs on one thread at a time), and MKL's; it costs a few microseconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

SERIAL_STEP_TOKENS = 8


@contextlib.contextmanager
def step_threads(
    tokens: int, device: torch.device, limit: int = SERIAL_STEP_TOKENS
) -> Iterator[None]:
    """Run the body with one intra-op thread when it is a CPU step of at most `limit`
    packed tokens (0: never); with the caller's threads otherwise."""
    previous = torch.get_num_threads()
    if device.type != "cpu" or tokens > limit or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
