"""The optional DeepSpeed engine (`train.engine=deepspeed`): ZeRO stage 1 or 2, on CPU
too (DS_ACCELERATOR=cpu, gloo).

AdamW with the same three parameter groups as the torch engine (dense, dense without
decay, experts), partitioned by ZeRO over the data-parallel ranks; DeepSpeed reduces the
gradients, clips by the global norm and steps.

Scope: expert parallelism stays with the torch engine (`comm.ep_size=1` here). DeepSpeed
recognises expert parameters only inside its own `deepspeed.moe.layer.MoE` modules (its
engine then builds expert-data-parallel groups and skips them when it broadcasts rank 0's
weights); our `GroupedExperts` are not such modules, so at EP > 1 DeepSpeed would
overwrite each rank's experts with rank 0's. At EP=1 every rank holds every expert and
the experts are ordinary data-parallel parameters, in their own optimizer group.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from launch.config import TrainConfig
from launch.optim import param_groups
from launch.runtime import Runtime


def deepspeed_config(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run (fp32; ZeRO stage `config.zero_stage`)."""
    return {
        "train_micro_batch_size_per_gpu": config.batch_size // world_size,
        "gradient_accumulation_steps": config.grad_accum,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


_LOSS_SCALER = "loss_scaler"
_SLICE_MAPPINGS = "param_slice_mappings"  # for universal checkpoints only; objects


class DeepSpeedEngine:
    """`launch.engines.Engine` on top of `deepspeed.initialize`."""

    def __init__(self, model: nn.Module, config: TrainConfig, runtime: Runtime) -> None:
        if runtime.ep_size != 1:
            raise ValueError(
                f"train.engine=deepspeed runs with comm.ep_size=1 (got {runtime.ep_size}); "
                "use train.engine=torch for expert parallelism (see launch.deepspeed_engine)"
            )
        import deepspeed

        # DeepSpeed insists on reading the launcher's variables; we are the launcher.
        info = runtime.info
        for name, value in (
            ("LOCAL_RANK", info.local_rank),
            ("RANK", info.rank),
            ("WORLD_SIZE", info.world_size),
            ("LOCAL_WORLD_SIZE", info.local_world_size),
        ):
            os.environ.setdefault(name, str(value))
        deepspeed.init_distributed(dist_backend=runtime.backend, auto_mpi_discovery=False)
        groups = [
            {key: value for key, value in group.items() if key != "moe"}
            for group in param_groups(model, config.weight_decay)
        ]
        optimizer = torch.optim.AdamW(
            groups, lr=config.lr, betas=(config.beta1, config.beta2), foreach=False
        )
        self.config = config
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=deepspeed_config(config, runtime.info.world_size),
        )
        self.module: nn.Module = self.engine

    def begin_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by gradient_accumulation_steps itself and updates the weights
        # at the accumulation boundary of step(), which it wants after every backward.
        self.engine.backward(loss)
        self.engine.step()

    def finish_step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def optimizer_state(self) -> dict[str, Any]:
        """The ZeRO optimizer's state without its loss-scaler object (fp32 training has
        a static scale of 1) and its slice mappings (checkpoints hold plain data only)."""
        state = self.optimizer.state_dict()
        return {k: v for k, v in state.items() if k not in (_LOSS_SCALER, _SLICE_MAPPINGS)}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        state = {**state, _LOSS_SCALER: self.optimizer.loss_scaler}
        self.optimizer.load_state_dict([state], load_optimizer_states=True)
