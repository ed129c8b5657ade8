"""The alpha-beta cost model: calibration recovers known parameters from synthetic
measurements, the crossover agrees with `choose`, and `comm.bench` runs end to end on
gloo with every result checked (its JSON feeds the calibration)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comm.cost import CostModel, calibrate, features_of, prediction_errors


def _synthetic_bench(model: CostModel, nproc: int, per_node: int) -> dict[str, object]:
    rows = []
    for algo in ("raw", "flat", "hierarchical", "memcpy"):
        for nbytes in (1024, 16384, 262144, 4194304):
            t = model.time_s(algo, nproc // per_node, per_node, nbytes)
            rows.append({"op": "alltoall", "algo": algo, "bytes": nbytes, "time_us": t * 1e6})
    return {"nproc": nproc, "ranks_per_node": per_node, "backend": "gloo", "rows": rows}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_recovers_tied_parameters(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    u = (torch.rand(6, generator=gen) + 0.5).tolist()
    alpha, beta = 5e-6 * u[1], 1e-9 * u[2]
    truth = CostModel(1e-3 * u[0], alpha, alpha, beta, beta, 1e-10 * u[3], 2e-5 * u[4])
    fitted = calibrate(_synthetic_bench(truth, 4, 2))
    for name in ("call_s", "alpha_intra_s", "beta_inter_s_per_B", "beta_copy_s_per_B"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    errors = prediction_errors(fitted, _synthetic_bench(truth, 4, 2))
    assert max(abs(e) for *_, e in errors) < 1e-6


def test_calibration_separates_links_with_several_layouts() -> None:
    truth = CostModel(1e-4, 2e-6, 9e-6, 1e-10, 8e-10, 5e-11, 1e-5)
    bench = _synthetic_bench(truth, 8, 2)
    rows = bench["rows"]
    assert isinstance(rows, list)
    fitted = calibrate(bench, separate_links=True)
    # one layout cannot tell every parameter apart, but the fit must reproduce the data
    assert max(abs(e) for *_, e in prediction_errors(fitted, bench)) < 1e-3


def test_crossover_agrees_with_choice_and_features() -> None:
    model = CostModel.projected_cluster()
    for nodes, per_node in [(8, 8), (64, 8), (16, 4)]:
        crossover = model.crossover_bytes(nodes, per_node)
        assert crossover is not None
        assert model.choose(nodes, per_node, crossover * 0.9) == "hierarchical"
        assert model.choose(nodes, per_node, crossover * 1.1) == "flat"
    assert model.crossover_bytes(2, 2) is None and model.choose(2, 2, 1024) == "flat"
    # message counts: flat sends P-1 messages, hierarchical (G-1) + (M-1) data messages
    flat = features_of("flat", 4, 8, 1.0)
    hier = features_of("hierarchical", 4, 8, 1.0)
    assert flat[1] + flat[2] == 31 and hier[2] == 3 and hier[1] == 2 * 7
    with pytest.raises(ValueError, match="unknown algorithm"):
        features_of("ring", 2, 2, 1.0)


@pytest.mark.distributed
def test_bench_cli_runs_checks_and_calibrates(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "comm.bench", "--nproc", "2", "--ranks-per-node", "1",
               "--min-bytes", "1024", "--max-bytes", "65536", "--factor", "8", "--iters", "3",
               "--warmup", "1", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "busbw" in done.stdout and "#wrong" in done.stdout
    bench = json.loads(out.read_text())
    assert (bench["nproc"], bench["ranks_per_node"], bench["backend"]) == (2, 1, "gloo")
    assert bench["command"].startswith("python -m comm.bench --nproc 2") and bench["date"]
    assert (bench["min_bytes"], bench["max_bytes"], bench["iters"]) == (1024, 65536, 3)
    seen = {(r["op"], r["algo"]) for r in bench["rows"]}
    alltoall = ("raw", "raw_alloc", "flat", "hierarchical", "memcpy")
    assert seen == {("alltoall", a) for a in alltoall} | {
        ("dispatch", a) for a in ("raw", "flat", "hierarchical")
    } | {("allreduce", "raw")}
    assert all(r["wrong"] == 0 and r["time_us"] > 0 for r in bench["rows"])
    for r in bench["rows"]:
        # n = 2: alltoall (n-1)/n = 0.5, allreduce 2(n-1)/n = 1, memcpy 1
        factor = 0.5 if r["op"] != "allreduce" and r["algo"] != "memcpy" else 1.0
        expected = r["algbw_GBps"] * factor
        assert r["busbw_GBps"] == pytest.approx(expected)
    model = calibrate(bench)
    assert all(value >= 0 for value in vars(model).values())


@pytest.mark.distributed
def test_bench_moves_bf16(tmp_path: Path) -> None:
    """`--dtype bfloat16`: the same checked cases with 2-byte elements (twice the count
    per byte), every result exact."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "comm.bench", "--nproc", "2", "--ranks-per-node", "1",
               "--min-bytes", "4096", "--max-bytes", "4096", "--iters", "2", "--warmup", "1",
               "--dtype", "bfloat16", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["type"] == "bfloat16" and r["wrong"] == 0 for r in rows)
    for r in rows:
        if r["op"] == "alltoall":
            assert r["bytes"] == 4096 and r["count"] == 2048
    bad = subprocess.run([*command[:-2], "--dtype", "fp8"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'fp8'" in bad.stderr
