"""`python -m launch.ray_distill teacher=CHECKPOINT [overrides]`: a distillation run on
Ray Train workers (`conf/distill.yaml`, as `launch.distill`).

    python -m launch.ray_distill teacher=runs/demo comm=ep2 run_dir=runs/demo_student
    RAY_ADDRESS=ray://head:10001 python -m launch.ray_distill teacher=/shared/t ...

Each worker runs `launch.training.distillation.distill` as its rank (the teacher's experts of its
EP rank, the whole student), with the reports and recovery of `launch.ray_train`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from launch.cli import exits_on_bad_input
from launch.ray_train import run_ray
from launch.training.distillation import register_distill_configs, to_distill_config


@hydra.main(config_path="../conf", config_name="distill", version_base=None)
@exits_on_bad_input("launch.ray_distill")
def main(cfg: DictConfig) -> None:
    result = run_ray(to_distill_config(cfg))
    print(f"[ray] finished; last metrics: {result.metrics}", flush=True)


register_distill_configs()

if __name__ == "__main__":
    main()
