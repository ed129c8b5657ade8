"""`python -m launch.ray_train [overrides]`: the same training run on Ray Train workers.

    python -m launch.ray_train experiment=tiny comm=ep2          # embedded local Ray
    RAY_ADDRESS=ray://head:10001 python -m launch.ray_train ...   # an existing cluster

A `TorchTrainer` starts `ray.num_workers` workers (default `comm.ep_size`); Ray
initialises torch.distributed among them (gloo on CPU, NCCL with GPUs) and each worker
runs `launch.training.loop.train` as its rank, so each hosts the experts of its EP rank. Every
checkpoint the run writes is reported with `ray.train.report`; when a worker dies, Ray
replaces the worker group (at most `ray.max_failures` times) and the new workers resume
from the last reported checkpoint. `run_dir` must be on storage every worker can read
(on one machine, any local path); Ray's own records go to `run_dir/ray`.

`run_ray` also runs distillation (`launch.ray_distill`): given a
`launch.training.distillation.DistillRunConfig`, each worker runs `launch.training.distillation.distill`
instead, with the same reports and the same recovery.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from launch.cli import exits_on_bad_input
from launch.config import Backend, RunConfig, register_configs, to_run_config
from launch.runtime import ProcessInfo
from launch.training.checkpointing import plain
from launch.training.distillation import DistillRunConfig, distill, to_distill_config
from launch.training.loop import train


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Body of every Ray worker: its rank comes from Ray's train context."""
    import ray.train

    run: Any
    if loop_config["kind"] == "distill":
        config: Any = to_distill_config(loop_config["config"])
        run = distill
    else:
        config = to_run_config(loop_config["config"])
        run = train
    context = ray.train.get_context()
    info = ProcessInfo(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        local_world_size=context.get_local_world_size(),
    )

    def report(step: int, path: Path, metrics: dict[str, float]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if info.is_main else None
        scalars = {f"eval/{k}": v for k, v in metrics.items()}
        ray.train.report({"step": step, **scalars}, checkpoint=checkpoint)

    restored = ray.train.get_checkpoint()
    if restored is None:
        run(config, info, on_checkpoint=report)
        return
    with restored.as_directory() as directory:
        print(f"[ray worker {info.rank}] resuming from {directory}", flush=True)
        run(config, info, on_checkpoint=report, resume_from=Path(directory))


def _init_ray(config: RunConfig | DistillRunConfig, num_workers: int) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    num_cpus = config.ray.num_cpus or max(2, math.ceil(num_workers * config.ray.cpus_per_worker))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def run_ray(config: RunConfig | DistillRunConfig) -> Any:
    """Train (or, for a `DistillRunConfig`, distil) `config` with Ray Train; returns Ray's
    `Result` (raises if the run failed more than `ray.max_failures` times)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    num_workers = config.ray.num_workers or config.comm.ep_size
    if num_workers % config.comm.ep_size:
        raise ValueError(
            f"ray.num_workers={num_workers} is not a multiple of comm.ep_size="
            f"{config.comm.ep_size}; every EP group needs all its ranks"
        )
    _init_ray(config, num_workers)
    use_gpu = config.ray.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= num_workers
    if config.comm.backend == Backend.AUTO:
        backend = "nccl" if use_gpu else "gloo"
    else:
        backend = config.comm.backend.value
    # Workers may run elsewhere (another cwd, another node): give them absolute paths.
    run_dir = Path(config.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    data = config.data
    if data.path is not None:
        data = dataclasses.replace(data, path=str(Path(data.path).resolve()))
    config = dataclasses.replace(config, run_dir=str(run_dir), data=data)
    kind = "train"
    if isinstance(config, DistillRunConfig):
        kind = "distill"
        config = dataclasses.replace(config, teacher=str(Path(config.teacher).resolve()))
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"kind": kind, "config": plain(config)},
        torch_config=TorchConfig(backend=backend, timeout_s=int(config.comm.timeout_s)),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": config.ray.cpus_per_worker},
        ),
        run_config=RayRunConfig(
            name=kind,
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=config.ray.max_failures),
            # Ray keeps its own copy of each reported checkpoint; keep as few as we do.
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_last),
        ),
    )
    return trainer.fit()


@hydra.main(config_path="../conf", config_name="config", version_base=None)
@exits_on_bad_input("launch.ray_train")
def main(cfg: DictConfig) -> None:
    result = run_ray(to_run_config(cfg))
    print(f"[ray] finished; last metrics: {result.metrics}", flush=True)


register_configs()

if __name__ == "__main__":
    main()
