"""`python -m launch.train [overrides]`: train with Hydra config, alone or under torchrun.

    python -m launch.train experiment=tiny
    torchrun --nproc-per-node 2 -m launch.train experiment=demo
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m launch.train comm.ep_size=16 run_dir=/shared/run

torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE are read here (and only
here); every rank composes the same config, and `launch.training.loop.train` does the rest.
Hydra writes nothing of its own outside `run_dir` (conf/config.yaml sets its run dir to
`run_dir` and turns off its `.hydra` subdirectory and log file).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from launch.cli import exits_on_bad_input
from launch.config import register_configs, to_run_config
from launch.runtime import process_info_from_env
from launch.training.loop import train

CONFIG_PATH = "../conf"


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base=None)
@exits_on_bad_input("launch.train")
def main(cfg: DictConfig) -> None:
    config = to_run_config(cfg)
    train(config, process_info_from_env())


register_configs()

if __name__ == "__main__":
    main()
