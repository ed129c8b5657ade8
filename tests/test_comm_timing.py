"""CommTimer: accumulates the host time of measured blocks and resets on take()."""

from __future__ import annotations

import time

import pytest
import torch

from comm.timing import CommTimer


def test_timer_accumulates_and_resets() -> None:
    timer = CommTimer()
    cpu = torch.device("cpu")
    for _ in range(3):
        with timer.measure(cpu):
            time.sleep(0.01)
    assert timer.calls == 3
    seconds = timer.take()
    assert 0.03 <= seconds < 1.0
    assert timer.calls == 0 and timer.take() == 0.0


def test_timer_counts_a_block_that_raises() -> None:
    timer = CommTimer()
    with pytest.raises(RuntimeError, match="peer went away"), timer.measure(torch.device("cpu")):
        time.sleep(0.005)
        raise RuntimeError("peer went away")
    assert timer.calls == 1 and timer.take() >= 0.005
