"""Alpha-beta cost model of flat vs hierarchical all-to-all, its calibration, and a CLI.

Per rank, with P = M nodes x G ranks per node and B bytes sent by each rank (uniform
splits; the rank's own chunk never leaves it):

  flat:          1 call;  G-1 intra messages of B/P;  P-G inter messages of B/P
  hierarchical:  3 calls (counts, intra, inter; fewer when G or M is 1);
                 2(G-1) intra messages (the M-int counts, then B/G each);
                 M-1 inter messages of B/M;  two local regroups of B bytes

  time = call_s * calls + alpha_intra * intra_msgs + alpha_inter * inter_msgs
       + beta_intra * intra_bytes + beta_inter * inter_bytes + beta_copy * copied_bytes

Messages are counted one after another (the pessimistic textbook model: each message
pays its latency). Hierarchical trades (P-G) - (M-1) inter-node latencies for M times
more intra-node volume, two extra calls and two regroups, so it wins below a
crossover size and loses above it.

`python -m comm.cost --calibrate BENCH.json` fits the parameters to `comm.bench`
alltoall and memcpy rows by non-negative least squares on relative error, prints the
prediction error (optionally on a second run, `--evaluate OTHER.json`), and the
crossover table of a projected cluster (`--cluster-nodes`, `--link-gbps`, ...).
On one host the intra and inter links are the same wire, so by default one alpha and one
beta are fitted for both ("tied"); `--separate-links` fits them apart when the data
(real multi-node runs) can tell them apart.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FEATURES = ("call_s", "alpha_intra_s", "alpha_inter_s", "beta_intra_s_per_B",
            "beta_inter_s_per_B", "beta_copy_s_per_B", "copy_call_s")  # fmt: skip


@dataclass(frozen=True)
class CostModel:
    call_s: float
    alpha_intra_s: float
    alpha_inter_s: float
    beta_intra_s_per_B: float
    beta_inter_s_per_B: float
    beta_copy_s_per_B: float
    copy_call_s: float

    @staticmethod
    def projected_cluster(
        link_gbps: float = 400.0, alpha_intra_us: float = 1.0, alpha_inter_us: float = 2.0
    ) -> CostModel:
        """Assumed GPU cluster (H100-class): NVLink inside a node (~300 GB/s effective per
        GPU, `alpha_intra_us` per message), one `link_gbps` NIC per GPU between nodes
        (`alpha_inter_us` per message), 10 us per collective call, regroups at ~1.5 TB/s
        (HBM, read + write) plus 5 us each. Assumptions, not measurements; calibrate on
        the real machine when you have one."""
        return CostModel(
            10e-6,
            alpha_intra_us * 1e-6,
            alpha_inter_us * 1e-6,
            1 / 300e9,
            8 / (link_gbps * 1e9),
            1 / 1.5e12,
            5e-6,
        )

    def time_s(self, algo: str, num_nodes: int, ranks_per_node: int, nbytes: float) -> float:
        features = features_of(algo, num_nodes, ranks_per_node, nbytes)
        return float(sum(f * p for f, p in zip(features, asdict(self).values())))

    def choose(self, num_nodes: int, ranks_per_node: int, nbytes: float) -> str:
        """`flat` or `hierarchical`, whichever the model says is faster (flat on ties)."""
        flat = self.time_s("flat", num_nodes, ranks_per_node, nbytes)
        hier = self.time_s("hierarchical", num_nodes, ranks_per_node, nbytes)
        return "hierarchical" if hier < flat else "flat"

    def crossover_bytes(self, num_nodes: int, ranks_per_node: int) -> float | None:
        """Per-rank bytes below which hierarchical wins; None when one always wins."""
        at0 = [self.time_s(a, num_nodes, ranks_per_node, 0.0) for a in ("flat", "hierarchical")]
        at1 = [self.time_s(a, num_nodes, ranks_per_node, 1.0) for a in ("flat", "hierarchical")]
        fixed_gain = at0[0] - at0[1]  # latency hierarchical saves
        slope_loss = (at1[1] - at0[1]) - (at1[0] - at0[0])  # seconds per byte it adds
        if fixed_gain <= 0 or slope_loss <= 0:
            return None
        return fixed_gain / slope_loss


def features_of(algo: str, num_nodes: int, ranks_per_node: int, nbytes: float) -> list[float]:
    """Counts that multiply each parameter of `CostModel` (same order as FEATURES)."""
    if num_nodes < 1 or ranks_per_node < 1:
        raise ValueError(f"need num_nodes >= 1 and ranks_per_node >= 1, got "
                         f"{num_nodes}, {ranks_per_node}")  # fmt: skip
    m, g = num_nodes, ranks_per_node
    p = m * g
    if algo in ("flat", "raw", "raw_alloc"):
        return [1.0, g - 1.0, p - g, nbytes * (g - 1) / p, nbytes * (p - g) / p, 0.0, 0.0]
    if algo == "hierarchical":
        calls = (2.0 if g > 1 else 0.0) + (1.0 if m > 1 else 0.0)
        return [calls, 2.0 * (g - 1), m - 1.0, nbytes * (g - 1) / g, nbytes * (m - 1) / m,
                2.0 * nbytes, 2.0]  # fmt: skip
    if algo == "memcpy":
        return [0.0, 0.0, 0.0, 0.0, 0.0, nbytes, 1.0]
    raise ValueError(
        f"unknown algorithm {algo!r}; accepted: flat, raw, raw_alloc, hierarchical, memcpy"
    )


def _nnls(a: torch.Tensor, b: torch.Tensor, max_iter: int = 100) -> torch.Tensor:
    """Non-negative least squares, min |a x - b| with x >= 0 (Lawson-Hanson active set)."""
    import torch  # calibration only: the model itself is plain arithmetic

    n = a.shape[1]
    x = torch.zeros(n, dtype=a.dtype)
    passive = torch.zeros(n, dtype=torch.bool)
    for _ in range(max_iter):
        gradient = a.t() @ (b - a @ x)
        candidates = (~passive) & (gradient > 1e-12 * gradient.abs().max().clamp_min(1e-300))
        if not bool(candidates.any()):
            break
        passive[int(torch.where(candidates, gradient, -torch.inf).argmax())] = True
        while True:
            z = torch.zeros(n, dtype=a.dtype)
            z[passive] = torch.linalg.lstsq(
                a[:, passive], b.unsqueeze(1), rcond=1e-12, driver="gelsd"
            ).solution.squeeze(1)
            if bool((z[passive] > 0).all()):
                x = z
                break
            # Step from x towards z until the first passive coefficient hits zero.
            shrinking = passive & (z <= 0)
            step = (x[shrinking] / (x[shrinking] - z[shrinking])).min()
            x = x + step * (z - x)
            passive &= x > 1e-15 * x.abs().max().clamp_min(1e-300)
            x[~passive] = 0.0
    return x


def _rows_of(bench: dict[str, object]) -> list[dict[str, object]]:
    rows = bench["rows"]
    assert isinstance(rows, list)
    return [r for r in rows if r["op"] == "alltoall" and r["algo"] != "memcpy"] + [
        r for r in rows if r["algo"] == "memcpy"
    ]


def _layout(bench: dict[str, object]) -> tuple[int, int]:
    nproc, per_node = int(str(bench["nproc"])), int(str(bench["ranks_per_node"]))
    return nproc // per_node, per_node


def calibrate(bench: dict[str, object], separate_links: bool = False) -> CostModel:
    """Fit a CostModel to the alltoall (raw/flat/hierarchical) and memcpy rows."""
    import torch  # calibration only: the model itself is plain arithmetic

    m, g = _layout(bench)
    rows = _rows_of(bench)
    feats = torch.tensor(
        [features_of(str(r["algo"]), m, g, float(str(r["bytes"]))) for r in rows],
        dtype=torch.float64,
    )
    times = torch.tensor([float(str(r["time_us"])) * 1e-6 for r in rows], dtype=torch.float64)
    if not separate_links:  # one alpha (columns 1+2), one beta (columns 3+4)
        feats = torch.stack(
            [
                feats[:, 0],
                feats[:, 1] + feats[:, 2],
                feats[:, 3] + feats[:, 4],
                feats[:, 5],
                feats[:, 6],
            ],
            1,
        )
    scale = feats.abs().amax(0).clamp_min(1e-30)  # conditioning
    weighted = feats / scale / times.unsqueeze(1)  # relative error
    params = _nnls(weighted, torch.ones_like(times)) / scale
    values = params.tolist()
    if not separate_links:
        values = [values[0], values[1], values[1], values[2], values[2], values[3], values[4]]
    return CostModel(*values)


def prediction_errors(model: CostModel, bench: dict[str, object]) -> list[tuple[str, int, float]]:
    """(algo, bytes, relative error of the prediction) for each alltoall/memcpy row."""
    m, g = _layout(bench)
    out = []
    for r in _rows_of(bench):
        measured = float(str(r["time_us"])) * 1e-6
        predicted = model.time_s(str(r["algo"]), m, g, float(str(r["bytes"])))
        out.append((str(r["algo"]), int(str(r["bytes"])), (predicted - measured) / measured))
    return out


def _fmt_bytes(nbytes: float | None) -> str:
    if nbytes is None:
        return "never"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes:.0f} B"


def crossover_table(model: CostModel, nodes: list[int], per_node: list[int]) -> str:
    """Markdown table: per-rank bytes below which hierarchical beats flat."""
    lines = ["| nodes | " + " | ".join(f"G={g}" for g in per_node) + " |",
             "|---|" + "---|" * len(per_node)]  # fmt: skip
    for m in nodes:
        cells = [_fmt_bytes(model.crossover_bytes(m, g)) for g in per_node]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m comm.cost", description=__doc__.split("\n")[0])
    parser.add_argument("--calibrate", metavar="BENCH_JSON", help="fit to a comm.bench JSON")
    parser.add_argument("--evaluate", metavar="BENCH_JSON", help="prediction error on this run")
    parser.add_argument("--separate-links", action="store_true")
    parser.add_argument("--link-gbps", type=float, default=400.0)
    parser.add_argument("--alpha-intra-us", type=float, default=1.0)
    parser.add_argument("--alpha-inter-us", type=float, default=2.0)
    parser.add_argument("--cluster-nodes", default="2,4,8,16,32,64")
    parser.add_argument("--cluster-ranks-per-node", default="4,8")
    parser.add_argument("--bytes", default="4096,65536,1048576,16777216")
    args = parser.parse_args(argv)
    nodes = [int(v) for v in args.cluster_nodes.split(",")]
    per_node = [int(v) for v in args.cluster_ranks_per_node.split(",")]
    if args.calibrate:
        with open(args.calibrate) as handle:
            bench = json.load(handle)
        model = calibrate(bench, args.separate_links)
        print("# calibrated on", args.calibrate)
        for name, value in asdict(model).items():
            print(f"#   {name:>20} = {value:.3e}")
        for label, path in (("fit", args.calibrate), ("held-out", args.evaluate)):
            if not path:
                continue
            with open(path) as handle:
                errors = prediction_errors(model, json.load(handle))
            print(
                f"\n## prediction error ({label}: {path})\n| algo | bytes | error |\n|---|---|---|"
            )
            for algo, nbytes, err in errors:
                print(f"| {algo} | {nbytes} | {100 * err:+.0f}% |")
            mean_abs = sum(abs(e) for *_, e in errors) / len(errors)
            print(f"\nmean |error| = {100 * mean_abs:.0f}%")
        m, g = _layout(bench)
        print(f"\n## calibrated model, {m} nodes x {g}: crossover "
              f"{_fmt_bytes(model.crossover_bytes(m, g))}")  # fmt: skip
    cluster = CostModel.projected_cluster(args.link_gbps, args.alpha_intra_us, args.alpha_inter_us)
    print(
        f"\n## projected cluster ({args.link_gbps:g} Gb/s per GPU, alpha intra "
        f"{args.alpha_intra_us:g} us, inter {args.alpha_inter_us:g} us): hierarchical wins below"
    )
    print(crossover_table(cluster, nodes, per_node))
    sizes = [int(v) for v in args.bytes.split(",")]
    print(f"\n## projected time (us), {nodes[-1]} nodes x {per_node[-1]}: flat / hierarchical")
    print("| bytes per rank | flat | hierarchical | choice |\n|---|---|---|---|")
    for nbytes in sizes:
        flat = cluster.time_s("flat", nodes[-1], per_node[-1], nbytes) * 1e6
        hier = cluster.time_s("hierarchical", nodes[-1], per_node[-1], nbytes) * 1e6
        choice = cluster.choose(nodes[-1], per_node[-1], nbytes)
        print(f"| {_fmt_bytes(nbytes)} | {flat:.0f} | {hier:.0f} | {choice} |")


if __name__ == "__main__":
    main()
