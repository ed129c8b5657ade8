"""DynaMoE against fixed capacity and dropless: padded slots, drops, step time, rebuilds,
cache hit rate.

Two workloads, every policy on the same data and seeds:

- `zipf`: one MoE layer (E=16, top-2) trained with Adam on a skewed load: every token
  prefers one expert, drawn with probability proportional to 1/(e+1)^s (Zipf), and is
  that expert's router key plus noise; batches are drawn from a fixed pool of samples
  (so samples recur, as in multi-epoch training, and the assignment cache can converge).
- `kjv`: a short KJV training run (`launch.train experiment=demo`, fewer steps) at EP=1
  (one process, 2 threads) or `--ep 2` (torchrun, two processes of 1 thread), eager or
  `--compile`d; figures from its metrics.jsonl, windows after the first.

Figures per policy: *padded slots* = the rows the experts process per layer forward in a
static-shape step (fixed C: E * round(C*K*T/E); dynamic: the sum of the bucketed
capacities; dropless: the kept rows, which needs dynamic shapes), the dropped fraction
of token-slots, the median step time (shared machine: indicative only), the rebuild
count and the cache hit rate. Slots and drops are deterministic.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=offline \\
        .venv/bin/python scripts/bench_dynamic.py --workload zipf --steps 120
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=offline \\
        .venv/bin/python scripts/bench_dynamic.py --workload kjv --steps 100 [--ep 2] [--compile]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import run_demo_training

from moe.layer import MoELayer
from routing import RoutingConfig
from routing.state import PolicyState, model_policy_state

ROOT = Path(__file__).resolve().parents[1]
POLICIES: dict[str, dict[str, Any]] = {
    "fixed_c1.0": dict(capacity="fixed", capacity_factor=1.0),
    "fixed_c1.25": dict(capacity="fixed", capacity_factor=1.25),
    "fixed_c2.0": dict(capacity="fixed", capacity_factor=2.0),
    "dropless": dict(capacity="dropless"),
    # The routing=dynamic preset: buckets are multiples of a quarter of K*T/E.
    "dynamic": dict(capacity="dynamic", dynamic_bucket_step=0.25, cache_max_entries=4096),
    "dynamic_pow2": dict(capacity="dynamic", dynamic_bucket_step=0.0, cache_max_entries=4096),
}
# The routing=dynamic preset's controller and cache settings (window, headroom, bounds,
# rebuild cap, cache threshold), read from its file so the benchmark runs what users get.
DYNAMIC_DEFAULTS: dict[str, Any] = {
    key: value
    for key, value in OmegaConf.to_container(
        OmegaConf.load(ROOT / "conf" / "routing" / "dynamic.yaml")
    ).items()  # type: ignore[union-attr]
    if key.startswith(("dynamic_", "cache_threshold"))
}


def _padded_slots(layer: MoELayer, num_tokens: int, policy: dict[str, Any]) -> int:
    """Rows the experts process in a static-shape step (see the module docstring)."""
    last = layer.last_stats
    assert last is not None
    if policy["capacity"] == "fixed":
        k, e = layer.routing.top_k, layer.num_experts
        capacity = max(1, math.floor(policy["capacity_factor"] * k * num_tokens / e + 0.5))
        return e * capacity
    if policy["capacity"] == "dynamic":
        dynamic: Any = layer.capacity_state
        assert dynamic is not None
        return sum(dynamic.controller.capacities(num_tokens))
    return int(last.tokens_per_expert_E.sum())


def run_zipf(name: str, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    experts, top_k, d_model, d_hidden = 16, 2, 64, 128
    gen = torch.Generator().manual_seed(0)
    # Expert e has a key vector; a token's preferred expert z ~ Zipf(s) over the experts
    # and the token is its key plus noise, so the router's first choice follows Zipf.
    keys_ED = torch.linalg.qr(torch.randn(d_model, experts, generator=gen)).Q.t()
    zipf_E = torch.tensor([(e + 1.0) ** -args.zipf_s for e in range(experts)])
    preferred_PS = torch.multinomial(
        zipf_E / zipf_E.sum(), args.pool * args.seq, replacement=True, generator=gen
    ).view(args.pool, args.seq)
    pool = keys_ED[preferred_PS] + 0.3 * torch.randn(args.pool, args.seq, d_model, generator=gen)
    policy = POLICIES[name]
    extra = DYNAMIC_DEFAULTS if policy["capacity"] == "dynamic" else {}
    routing = RoutingConfig(top_k=top_k, **(extra | policy))
    torch.manual_seed(1)
    layer = MoELayer(d_model, d_hidden, experts, routing)
    with torch.no_grad():
        layer.router.gate.weight.copy_(args.bias_scale * keys_ED)
    optimizer = torch.optim.Adam(layer.parameters(), lr=args.lr)
    state = model_policy_state([(0, layer.capacity_state)])
    num_tokens = args.batch * args.seq
    slots, drops, times = [], [], []
    for step in range(steps):
        order = torch.randperm(args.pool, generator=torch.Generator().manual_seed(step))
        ids = order[: args.batch]
        x = pool[ids] + 0.05 * torch.randn(
            args.batch, args.seq, d_model, generator=torch.Generator().manual_seed(10_000 + step)
        )
        state.before_forward(ids, num_tokens)
        start = time.perf_counter()
        out = layer(x)
        loss = out.y.square().mean() + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state.end_step(None)
        times.append(time.perf_counter() - start)
        stats = layer.last_stats
        assert stats is not None
        slots.append(_padded_slots(layer, num_tokens, policy))
        drops.append(float(stats.dropped_fraction))
    return _summary(layer, state, slots, drops, times, num_tokens * top_k)


def _summary(
    layer: MoELayer,
    state: PolicyState,
    slots: list[int],
    drops: list[float],
    times: list[float],
    routed_slots: int,
) -> dict[str, Any]:
    scalars = state.scalars()
    dynamic: Any = layer.capacity_state
    warm = times[len(times) // 4 :]
    return {
        "padded_slots_per_forward": statistics.mean(slots),
        "padded_slots_over_routed": statistics.mean(slots) / routed_slots,
        "dropped_fraction": statistics.mean(drops),
        "step_time_ms_median": 1000 * statistics.median(warm),
        "rebuilds": dynamic.controller.rebuilds if dynamic is not None else 0,
        "reshuffles": dynamic.controller.reshuffles if dynamic is not None else 0,
        "frozen": bool(dynamic.controller.frozen) if dynamic is not None else False,
        "cache_hit_rate": scalars.get("dynamic/cache_hit_rate"),
        "final_capacities": (
            list(dynamic.controller.bucket_vector or ()) if dynamic is not None else None
        ),
    }


def _warm_tokens_per_s(records: list[dict[str, Any]]) -> float | None:
    """Median tokens/s over the windows after the first in which no graph was compiled
    (all of them when eager); None when every window compiled."""
    warm = [
        record["tokens_per_s"]
        for previous, record in itertools.pairwise(records)
        if record.get("compile/compilations") == previous.get("compile/compilations")
    ]
    return statistics.median(warm) if warm else None


def run_kjv(name: str, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    """`launch.train experiment=demo` with the policy, at EP=`args.ep` (1: one process,
    2 threads; 2: torchrun, two processes of 1 thread), eager or `--compile`d. Windows
    of `--window-steps` steps (steps/4); the figures average the windows of the last
    three quarters; `warm_tokens_per_s` is the median over the windows after the first
    in which nothing was compiled. `--set` overrides the dynamic policies' settings."""
    policy = POLICIES[name]
    extra = DYNAMIC_DEFAULTS | args.set if policy["capacity"] == "dynamic" else {}
    window = args.window_steps or max(steps // 4, 1)
    overrides = [
        f"routing.{key}={value}".replace(" ", "") for key, value in (extra | policy).items()
    ] + [
        f"train.steps={steps}", f"train.eval_every={window}", f"train.log_every={window}",
        f"train.compile={str(args.compile).lower()}",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as run_dir:
        records = run_demo_training(args.ep, overrides, Path(run_dir))
    # The last three quarters of the run, whatever the window size (the router moves
    # most in the first quarter).
    warm = [r for r in records if r["step"] > steps // 4] or records
    # Tokens per forward on one rank: the demo's batch of 32 x 128 bytes split over EP.
    num_tokens = 32 * 128 // args.ep
    routed = num_tokens * 2
    if policy["capacity"] == "dynamic":
        slots = statistics.mean(r["dynamic_processed_rows_per_forward"] for r in warm)
    elif policy["capacity"] == "fixed":
        slots = 8 * max(1, math.floor(policy["capacity_factor"] * routed / 8 + 0.5))
    else:
        slots = routed * (1 - statistics.mean(r["routing_dropped_fraction"] for r in warm))
    return {
        "ep": args.ep,
        "compile": args.compile,
        "padded_slots_per_forward": slots,
        "padded_slots_over_routed": slots / routed,
        "dropped_fraction": statistics.mean(r["routing_dropped_fraction"] for r in warm),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in warm),
        "step_time_ms_median": 1000 * 32 * 128 / statistics.median(r["tokens_per_s"] for r in warm),
        "val_bpb": records[-1]["val_bpb"],
        "rebuilds": records[-1].get("dynamic_rebuilds", 0.0),
        "rebuilds_by_window": [r.get("dynamic_rebuilds", 0.0) for r in records],
        "reshuffles": records[-1].get("dynamic_reshuffles", 0.0),
        "compile_rebuilds": records[-1].get("compile/rebuilds", 0.0),
        "compile_time_s": records[-1].get("compile/time_s", 0.0),
        "slots_over_routed_by_window": [
            r["dynamic_processed_rows_per_forward"] / routed
            for r in records
            if "dynamic_processed_rows_per_forward" in r
        ],
        "dropped_fraction_by_window": [r["routing_dropped_fraction"] for r in records],
        "tokens_per_s_by_window": [r["tokens_per_s"] for r in records],
        "warm_tokens_per_s": _warm_tokens_per_s(records),
        "settings": extra | policy,
        "cache_hit_rate": statistics.mean(
            r["dynamic_cache_hit_rate"] for r in warm if "dynamic_cache_hit_rate" in r
        ) if any("dynamic_cache_hit_rate" in r for r in warm) else None,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["zipf", "kjv"], default="zipf")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--policies", nargs="*", default=list(POLICIES))
    parser.add_argument("--batch", type=int, default=16, help="zipf: samples per step")
    parser.add_argument("--seq", type=int, default=32, help="zipf: tokens per sample")
    parser.add_argument("--pool", type=int, default=64, help="zipf: distinct samples")
    parser.add_argument("--zipf-s", type=float, default=1.0)
    parser.add_argument("--bias-scale", type=float, default=4.0, help="router key scale")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ep", type=int, choices=[1, 2], default=1, help="kjv: EP size")
    parser.add_argument("--compile", action="store_true", help="kjv: train.compile=true")
    parser.add_argument("--window-steps", type=int, default=0, help="kjv: steps per window")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE",
        help="kjv: routing settings of the dynamic policies, e.g. dynamic_rebuild_interval=50",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.set = dict(item.split("=", 1) for item in args.set)
    torch.set_num_threads(1)
    runner = run_zipf if args.workload == "zipf" else run_kjv
    results = {}
    for name in args.policies:
        results[name] = runner(name, args.steps, args)
        print(name, json.dumps(results[name]), flush=True)
    base = results.get("fixed_c2.0")
    for name in [n for n in results if n.startswith("dynamic")]:
        if base is None:
            break
        key = next(k for k in results[name] if k.startswith("padded_slots_per"))
        saving = 1 - results[name][key] / base[key]
        results[name]["fewer_slots_than_fixed_c2.0"] = saving
        print(f"{name} vs fixed C=2.0: {100 * saving:.1f}% fewer padded slots", flush=True)
    date = datetime.date.today().isoformat()
    tag = "" if args.workload == "zipf" else f"_ep{args.ep}" + ("_compiled" if args.compile else "")
    out = args.out or ROOT / "docs" / "results" / f"dynamic_{args.workload}{tag}_{date}.json"
    out.write_text(json.dumps({"workload": args.workload, "date": date, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
    }, "results": results}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
