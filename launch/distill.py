"""`python -m launch.distill teacher=CHECKPOINT [overrides]`: distil an MoE into a dense
student with Hydra config, alone or under torchrun.

    python -m launch.distill teacher=runs/demo run_dir=runs/demo_student
    python -m launch.distill teacher=runs/tiny data=synthetic train=tiny \\
        distill.init=merge distill.temperature=4 distill.alpha=0 run_dir=runs/tiny_student
    torchrun --nproc-per-node 2 -m launch.distill teacher=runs/demo comm=ep2 \\
        run_dir=runs/demo_student          # the teacher's experts split over 2 ranks

torchrun's variables are read here (and only here); every rank composes the same
config (`conf/distill.yaml`) and `launch.training.distillation.distill` does the rest. Bad input
(a teacher that is not a checkpoint, a bad key or value) exits with the reason and
writes nothing under `run_dir`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from launch.cli import exits_on_bad_input
from launch.runtime import process_info_from_env
from launch.training.distillation import distill, register_distill_configs, to_distill_config

CONFIG_PATH = "../conf"


@hydra.main(config_path=CONFIG_PATH, config_name="distill", version_base=None)
@exits_on_bad_input("launch.distill")
def main(cfg: DictConfig) -> None:
    config = to_distill_config(cfg)
    distill(config, process_info_from_env())


register_distill_configs()

if __name__ == "__main__":
    main()
