"""Int8 experts against fp32 on a trained checkpoint: expert memory, validation bits per
byte, and each MoE layer's output error (decode speed: `scripts/bench_generate.py`).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/int8_report.py --checkpoint runs/demo \\
        --json docs/results/int8_report.json

Both models route dropless (as the engine does) and see the same validation batches
(`train.batch_size` rows of the run's data, the first `--batches`). The layer error is
max |y_int8 - y_fp32| / max |y_fp32| over the MoE layer outputs of the first batch, with
the fp32 layer inputs fed to both (so errors do not compound across layers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.training.evaluation import evaluate
from moe.data import DataConfig, build_dataset
from moe.experts import expert_modules
from moe.inference import load_model
from moe.transformer import MoETransformer
from routing import CapacityOverride


def expert_bytes(model: MoETransformer) -> int:
    return sum(t.nbytes for _, m in expert_modules(model) for t in m.state_dict().values())


@torch.no_grad()
def layer_errors(fp32: MoETransformer, int8: MoETransformer, tokens_BT: torch.Tensor,
                 task_ids_B: torch.Tensor) -> list[float]:  # fmt: skip
    """Per MoE layer: the int8 layer on the fp32 layer's own input, relative max error."""
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_pre_hook(lambda _m, args, b=block: inputs.__setitem__(b, args[0]))
        for block, layer in fp32.moe_layers()
    ]
    fp32(tokens_BT, task_ids_B)
    for handle in handles:
        handle.remove()
    errors = []
    for (block, want_layer), (_, got_layer) in zip(fp32.moe_layers(), int8.moe_layers()):
        task_ids = (
            task_ids_B[:, None].expand(tokens_BT.shape)
            if want_layer.routing.needs_task_ids
            else None
        )
        want = want_layer(inputs[block], task_ids).y
        got = got_layer(inputs[block], task_ids).y
        errors.append(float((got - want).abs().max() / want.abs().max()))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo", help="run or step directory")
    parser.add_argument("--batches", type=int, default=16, help="validation batches")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.batches < 1 or args.threads < 1:
        parser.error(f"--batches={args.batches} and --threads={args.threads} must be >= 1")
    torch.set_num_threads(args.threads)
    fp32 = load_model(args.checkpoint)
    int8 = load_model(args.checkpoint, quantize="int8")
    run = fp32.run_config
    dataset = build_dataset(DataConfig(**run["data"]))
    batch_size = int(run["train"]["batch_size"])
    cpu = torch.device("cpu")
    results: dict = {"checkpoint": str(fp32.checkpoint), "batches": args.batches}
    for name, loaded in (("fp32", fp32), ("int8", int8)):
        model = loaded.model
        model.override_capacity(CapacityOverride.DROPLESS)
        evaluation = evaluate(model, dataset, batch_size, args.batches, 0, 1, cpu)
        results[name] = {"val_bpb": evaluation.val_bpb, "expert_bytes": expert_bytes(model)}
    batch = next(iter(dataset.validation_batches(batch_size, 0, 1, 1)))
    tokens_BT = batch.tokens_BT[:, :-1]
    results["layer_rel_error"] = layer_errors(fp32.model, int8.model, tokens_BT, batch.task_ids_B)
    results["expert_memory_ratio"] = (
        results["int8"]["expert_bytes"] / results["fp32"]["expert_bytes"]
    )
    results["val_bpb_change"] = results["int8"]["val_bpb"] - results["fp32"]["val_bpb"]
    print(f"checkpoint {results['checkpoint']} ({args.batches} validation batches, dropless)")
    for name in ("fp32", "int8"):
        row = results[name]
        print(
            f"  {name}: val {row['val_bpb']:.4f} bpb, experts {row['expert_bytes'] / 2**20:.2f} MiB"
        )
    print(f"  expert memory int8/fp32 {results['expert_memory_ratio']:.3f}, "
          f"bpb change {results['val_bpb_change']:+.4f}")  # fmt: skip
    print("  MoE layer output error (relative max): "
          + ", ".join(f"{e:.2e}" for e in results["layer_rel_error"]))  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
