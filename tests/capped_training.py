"""Run by `tests/test_tokenizer_training.py` in a subprocess: train a run under a cap on
the process's private memory, so that a corpus read whole into memory fails.

    python tests/capped_training.py '{"config": {...}, "margin": BYTES}'

The cap is `RLIMIT_DATA` = the private data the process holds after its imports plus
`margin`. Since Linux 4.7 that limit counts every private writable mapping (heap,
anonymous mmap: where a copy of the corpus would live, whatever allocator made it) and
not read-only file mappings, which is what memory-mapped token shards are: they are read
through the page cache, which the kernel may drop and reread at will. After training it
checks that the cap bites: allocating `check_bytes` must fail. Prints one JSON line.

pyarrow runs on the system allocator here: its default, mimalloc, reserves address space
by the gigabyte in advance (VmData counts it though no page of it is touched), which
would measure mimalloc's reservations rather than what the data path holds.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
from pathlib import Path

os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"  # before pyarrow is imported

import matplotlib.figure  # noqa: F401  (the libraries training imports, before the cap)
import numpy as np
import pyarrow.parquet  # noqa: F401
import torch  # noqa: F401

from launch.config import to_run_config
from launch.training.loop import train


def private_data_bytes() -> int:
    """VmData of this process (private writable mappings), in bytes."""
    status = Path("/proc/self/status").read_text()
    match = re.search(r"VmData:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1)) * 1024


def main() -> None:
    args = json.loads(sys.argv[1])
    config = to_run_config(args["config"])
    cap = private_data_bytes() + int(args["margin"])
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    result = train(config)
    used = private_data_bytes()
    try:
        np.ones(int(args["check_bytes"]), dtype=np.uint8)
        cap_bites = False
    except MemoryError:
        cap_bites = True
    print(
        json.dumps(
            {"cap": cap, "final_step": result.final_step, "cap_bites": cap_bites, "used": used}
        )
    )


if __name__ == "__main__":
    main()
