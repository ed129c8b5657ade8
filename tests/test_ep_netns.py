"""Two real "nodes": Linux network namespaces joined by a veth pair, 10.77.0.1/24 and
10.77.0.2/24, each running `torchrun --nnodes 2 --nproc-per-node 2` with the c10d
multi-node rendezvous at 10.77.0.1. The 4 ranks then run, as 2 nodes x 2 with EP=4,
the hierarchical-vs-flat all-to-all checks and the EP=4-equals-EP=1 layer check over
those addresses (gloo bound to the veth devices). Only the two namespace addresses and
loopback are used. Skipped, with the reason, where namespaces cannot be made (not root,
no `ip`, no permission). The namespaces are always deleted (which removes the veth).

Run as a script (by torchrun) it is the worker.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ADDRESSES = ("10.77.0.1", "10.77.0.2")
TIMEOUT_S = 240


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


def _make_nodes(tag: str) -> tuple[list[str], list[str]]:
    """Create the namespaces and the veth pair; raise RuntimeError with ip's message."""
    names = [f"moe{tag}n{i}" for i in range(2)]
    veths = [f"vm{tag}{i}"[:15] for i in range(2)]
    steps = [
        ("netns", "add", names[0]),
        ("netns", "add", names[1]),
        ("link", "add", veths[0], "type", "veth", "peer", "name", veths[1]),
    ]
    for i in range(2):
        steps += [
            ("link", "set", veths[i], "netns", names[i]),
            ("-n", names[i], "addr", "add", f"{ADDRESSES[i]}/24", "dev", veths[i]),
            ("-n", names[i], "link", "set", veths[i], "up"),
            ("-n", names[i], "link", "set", "lo", "up"),
        ]
    for step in steps:
        done = _ip(*step)
        if done.returncode != 0:
            raise RuntimeError(f"`ip {' '.join(step)}` failed: {done.stderr.strip()}")
    return names, veths


def _delete_nodes(tag: str) -> None:
    for i in range(2):
        _ip("netns", "del", f"moe{tag}n{i}")
    _ip("link", "del", f"vm{tag}0")  # only left over if moving it into a namespace failed


@pytest.mark.distributed
@pytest.mark.slow
def test_two_namespace_nodes_with_torchrun_rendezvous(tmp_path: Path) -> None:
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    tag = str(os.getpid() % 100000)
    try:
        try:
            names, veths = _make_nodes(tag)
        except RuntimeError as exc:
            pytest.skip(f"cannot create network namespaces here: {exc}")
        port = 29000 + os.getpid() % 1000
        procs = []
        for i in range(2):
            env = dict(os.environ, GLOO_SOCKET_IFNAME=veths[i], OMP_NUM_THREADS="1")
            command = [
                "ip", "netns", "exec", names[i], sys.executable, "-m", "torch.distributed.run",
                "--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={ADDRESSES[0]}:{port}", f"--rdzv-id=moe{tag}",
                f"--local-addr={ADDRESSES[i]}", "--max-restarts=0",
                # 10.77.0.1 is no address of the host's name, so say who serves the store.
                f"--rdzv-conf=is_host={'true' if i == 0 else 'false'},join_timeout=90",
                __file__, str(tmp_path),
            ]  # fmt: skip
            procs.append(
                subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            )
        outputs = []
        try:
            for proc in procs:
                out, _ = proc.communicate(timeout=TIMEOUT_S)
                outputs.append(out.decode(errors="replace")[-3000:])
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
        assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(outputs)
    finally:
        _delete_nodes(tag)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    addresses = [r["address"] for r in results]
    # Ranks 0,1 on one namespace's address, ranks 2,3 on the other's.
    assert addresses[0] == addresses[1] and addresses[2] == addresses[3], addresses
    assert sorted({addresses[0], addresses[2]}) == sorted(ADDRESSES), addresses
    for result in results:
        assert result["alltoall_checked"] == 24
        assert result["layer_algorithms"] == ["hierarchical", "flat"]


def _worker(out_dir: str) -> None:
    import socket

    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    from test_comm_alltoall import _check_layout
    from test_ep_layer import _check_case

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((ADDRESSES[0], 9))  # no packet is sent; picks the local address
        address = sock.getsockname()[0]
    checked = _check_layout(rank, world_size, 2, 4)
    algorithms = [
        _check_case(rank, world_size, 2, 4, "hierarchical", "fixed", True),
        _check_case(rank, world_size, 2, 4, "flat", "priority", False),
    ]
    dist.destroy_process_group()
    result = {"address": address, "alltoall_checked": checked, "layer_algorithms": algorithms}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1])
