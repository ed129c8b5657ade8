"""Build the model of a run on this rank, identical in value whatever the EP size.

Each rank first builds the whole model (every expert, EP=1) from the run's seed, then the
expert-parallel model, and copies into it the dense weights and its own slice of every
expert stack. So a run at EP=2 starts from exactly the weights of a run at EP=1, which is
what makes their training curves comparable (and equal when routing is dropless). The
whole model is built once on the CPU and dropped; for models whose experts do not fit in
one process, initialise at EP=1 once and load the checkpoint at the target EP size.
"""

from __future__ import annotations

import torch
from torch import nn

from launch.config import RunConfig
from launch.runtime import Runtime, dispatcher_factory
from moe.experts import Experts
from moe.transformer import MoETransformer


@torch.no_grad()
def copy_from_full(full: nn.Module, sharded: nn.Module) -> None:
    """Copy `full`'s weights into `sharded`: dense tensors whole, each expert stack
    indexed by its `expert_ids` (its local experts)."""
    full_modules = dict(full.named_modules())
    for name, module in sharded.named_modules():
        source = full_modules.get(name)
        if source is None:
            raise ValueError(f"module {name!r} of the sharded model is not in the full model")
        if isinstance(module, Experts):
            assert isinstance(source, Experts), name
            ids = list(module.expert_ids)
            for pname, param in module.named_parameters(recurse=False):
                param.copy_(getattr(source, pname)[ids])
            continue
        if any(isinstance(parent, Experts) for parent in _ancestors(sharded, name)):
            continue
        for pname, param in module.named_parameters(recurse=False):
            param.copy_(getattr(source, pname))
        for bname, buffer in module.named_buffers(recurse=False):
            if buffer is not None:
                buffer.copy_(getattr(source, bname))


def _ancestors(root: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".") if name else []
    modules, module = [], root
    for part in parts[:-1]:
        module = getattr(module, part)
        modules.append(module)
    return modules


def build_model(config: RunConfig, runtime: Runtime) -> MoETransformer:
    """The run's model on this rank's device, with EP dispatchers when `ep_size > 1`."""
    seed = config.train.seed
    factory = dispatcher_factory(runtime, config.comm)
    if factory is None:
        model = MoETransformer(config.model, config.routing, seed=seed)
    else:
        full = MoETransformer(config.model, config.routing, seed=seed)
        model = MoETransformer(config.model, config.routing, factory, seed=seed)
        copy_from_full(full, model)
        del full
    return model.to(runtime.device)
