"""The optional DeepSpeed engine (`train.engine=deepspeed`): ZeRO stage 1 or 2 over the
data-parallel ranks, expert parallelism through DeepSpeed's MoE parameter groups, on CPU
too (DS_ACCELERATOR=cpu, gloo).

AdamW with the torch engine's parameter groups (dense, dense without decay, experts);
DeepSpeed reduces the gradients, clips by the global norm and steps. ZeRO partitions the
dense groups' optimizer state (stage 1) and gradients (stage 2) over every rank, and the
expert group's over the expert-data-parallel group (the ranks holding the same experts).

How our experts become DeepSpeed experts (DeepSpeed 0.19 knows only its own
`deepspeed.moe.layer.MoE` modules, so we tell it what those modules would have told it):
- every expert parameter (`moe.experts.expert_parameter_ids`) carries `allreduce=False`
  and `group_name="ep_size_<EP>"`, as DeepSpeed's own experts do, and
  `deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer` moves them
  into an optimizer group `{"name": "ep_size_<EP>", "moe": True}`;
- `deepspeed.utils.groups` gets *our* EP and expert-data-parallel groups under that name
  (DeepSpeed would otherwise build its own, `MoE.set_deepspeed_parallelism`);
- the module handed to DeepSpeed holds a parameterless `MoE` subclass
  (`_ExpertParallelMarker`): DeepSpeed turns on its MoE handling (`has_moe_layers`: the
  ZeRO optimizer reduces and partitions the `moe` group over the expert-data-parallel
  group, and the rank-0 weight broadcast leaves each rank's experts alone) only when it
  finds an `MoE` instance. The marker is never called: our dispatchers do the all-to-all.

Precision (`train.precision`, `moe.precision`): bf16 and fp16 become DeepSpeed's
`torch_autocast` section in that dtype, with no module's gradients reduced in it. So the
module keeps its fp32 parameters (the master weights: checkpoints hold them, resumption
is exact), the forward runs under `torch.autocast` as the torch engine's does, and the
gradients are reduced in fp32: the torch engine's numerics. fp16 adds DeepSpeed's loss
scaling (torch's GradScaler inside its ZeRO optimizer; CUDA only, like fp16 itself).
DeepSpeed's other mode, its `bf16` section, would cast the module to bf16 and hold the
fp32 masters only in its optimizer partitions, so a checkpoint's model files would be
bf16.

Dense parameters use DeepSpeed's data-parallel group, its copy of the world group: the
same ranks as our dense data-parallel group (dense weights are replicated on every rank).
Gradient convention: DeepSpeed divides every gradient by the world size and sums over
the parameter's group, which is `launch.training.gradients.reduce_gradients`' rule; its global norm
sums each partition's squares over all ranks, each expert once, as `launch.training.optim` does.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from launch.config import TrainConfig
from launch.runtime import Runtime
from launch.training.optim import param_groups
from moe.experts import expert_parameter_ids
from moe.precision import FULL_PRECISION, ResolvedPrecision


def deepspeed_config(
    config: TrainConfig, world_size: int, precision: ResolvedPrecision = FULL_PRECISION
) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run (ZeRO stage `config.zero_stage`; the
    precision as the module docstring says)."""
    autocast: dict[str, Any] = {}
    if precision.mixed:
        autocast = {
            "torch_autocast": {
                "enabled": True,
                "dtype": str(precision.dtype).removeprefix("torch."),
                "lower_precision_safe_modules": [],  # every gradient reduced in fp32
            }
        }
    return {
        "train_micro_batch_size_per_gpu": config.batch_size // world_size,
        "gradient_accumulation_steps": config.grad_accum,
        "gradient_clipping": config.grad_clip,
        # Not elastic: `load_optimizer_state` relies on each rank's state being its own.
        "zero_optimization": {"stage": config.zero_stage, "elastic_checkpoint": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **autocast,
    }


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the groups of EP size `ep_size` (it parses the number back)."""
    return f"ep_size_{ep_size}"


_LOSS_SCALER = "loss_scaler"
_SLICE_MAPPINGS = "param_slice_mappings"  # for universal checkpoints only; objects


def register_expert_groups(runtime: Runtime) -> str:
    """Hand our EP and expert-data-parallel groups to `deepspeed.utils.groups` (under
    DeepSpeed's name for them, returned) in place of the ones DeepSpeed would build.
    Entries of an earlier run in this process are dropped: their groups are gone."""
    from deepspeed.utils import groups as ds_groups

    assert runtime.groups is not None, "the DeepSpeed engine runs with process groups"
    topology, rank = runtime.topology, runtime.info.rank
    name = expert_group_name(runtime.ep_size)
    (ep_ranks,) = [ranks for ranks in topology.ep_groups() if rank in ranks]
    (replica_ranks,) = [ranks for ranks in topology.expert_replica_groups() if rank in ranks]
    for table in (
        ds_groups._EXPERT_PARALLEL_GROUP,
        ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
        ds_groups._EXPERT_DATA_PARALLEL_GROUP,
        ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
    ):
        table.clear()
    ds_groups._EXPERT_PARALLEL_GROUP[name] = runtime.groups.ep
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ep_ranks
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = runtime.groups.expert_dp
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = replica_ranks
    return name


def deepspeed_param_groups(model: nn.Module, weight_decay: float, group_name: str) -> list[dict]:
    """`launch.training.optim.param_groups` as DeepSpeed wants them: expert parameters tagged as
    DeepSpeed experts (`allreduce=False`, `group_name`) and moved by DeepSpeed into one
    `moe` group named `group_name`; no empty group is left behind."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    expert_ids = expert_parameter_ids(model)
    for param in model.parameters():
        if id(param) in expert_ids:
            # DeepSpeed's expert tags: attributes it reads on the Parameter, which torch's
            # Parameter type does not declare.
            param.allreduce = False  # type: ignore[attr-defined]
            param.group_name = group_name  # type: ignore[attr-defined]
    groups = [
        {key: value for key, value in group.items() if key != "moe"}
        for group in param_groups(model, weight_decay)
    ]
    split = split_params_into_different_moe_groups_for_optimizer(groups)
    return [group for group in split if group["params"]]


def _marker_module(num_experts: int, ep_size: int, group_name: str) -> nn.Module:
    """A parameterless `deepspeed.moe.layer.MoE`: what makes DeepSpeed treat the model as
    an MoE model (see the module docstring). It builds no gate, experts or groups."""
    from deepspeed.moe.layer import MoE

    class _ExpertParallelMarker(MoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)  # not MoE.__init__: it would build its own experts
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.expert_group_name = group_name

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """The groups are ours, registered by `register_expert_groups`."""

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the expert-parallel marker is never called")

    return _ExpertParallelMarker()


class _DeepSpeedModule(nn.Module):
    """The model plus the marker; its forward is the model's."""

    def __init__(self, model: nn.Module, marker: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.marker = marker

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def _num_experts(model: nn.Module) -> int:
    """The global expert count of the model's largest MoE layer (0 without MoE layers)."""
    layers = getattr(model, "moe_layers", None)
    if layers is None:
        return 0
    return max((layer.num_experts for _, layer in layers()), default=0)


class DeepSpeedEngine:
    """`launch.training.engines.TrainingEngine` on top of `deepspeed.initialize`."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        runtime: Runtime,
        precision: ResolvedPrecision = FULL_PRECISION,
    ) -> None:
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
        assert runtime.topology.dense_dp_ranks() == list(range(info.world_size)), (
            "DeepSpeed reduces dense gradients over every rank"
        )
        group_name = register_expert_groups(runtime)
        groups = deepspeed_param_groups(model, config.weight_decay, group_name)
        optimizer = torch.optim.AdamW(
            groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=True
        )  # the torch engine's update (launch.training.optim.build_optimizer), element for element
        module: nn.Module = model
        if expert_parameter_ids(model):
            marker = _marker_module(_num_experts(model), runtime.ep_size, group_name)
            module = _DeepSpeedModule(model, marker)
        self.config = config
        self.data_parallel_size = info.world_size
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=deepspeed_config(config, info.world_size, precision),
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

    def gradient_scale(self) -> float:
        """1.0: DeepSpeed steps inside `backward` (fp16: with its own loss scale), so no
        caller sees its gradients between the backward and the update (pruning, which
        would, is refused with this engine)."""
        return 1.0

    def finish_step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def scalars(self) -> dict[str, float]:
        return {}

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's ZeRO partition of the optimizer state, without its loss-scaler
        object (fp32 training has a static scale of 1) and its slice mappings (checkpoints
        hold plain data only)."""
        state = self.optimizer.state_dict()
        return {k: v for k, v in state.items() if k not in (_LOSS_SCALER, _SLICE_MAPPINGS)}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Load this rank's partition (saved by this rank, same world size). DeepSpeed
        wants every rank's state and reads the entry at its data-parallel rank; an
        unchanged layout reads only that one, so this rank's stands for all."""
        state = {**state, _LOSS_SCALER: self.optimizer.loss_scaler}
        self.optimizer.load_state_dict(
            [state] * self.data_parallel_size, load_optimizer_states=True
        )
