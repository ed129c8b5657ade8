"""When a training run prunes, and to what sparsity.

Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"): with t0 =
`prune.start`, dt = `prune.every`, n = (`prune.end` - t0) / dt, s_i =
`prune.initial_sparsity` and s_f = `prune.sparsity`, the run prunes at the steps
t = t0, t0 + dt, ..., t0 + n dt to

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3,

fast at first, when redundant weights are many, then slower. A "step" here is the
0-based index of the optimizer step about to run: the masks of step t are set before
its forward. One-shot `magnitude` pruning in training prunes once, at t0, to s_f (or
N:M); `sr_ste` recomputes its N:M masks at every step.
"""

from __future__ import annotations

from moe.pruning.config import PruneConfig, PruneMethod


def gmp_sparsity(step: int, config: PruneConfig) -> float:
    """s_t of Zhu & Gupta's cubic schedule (module docstring); s_i before t0, s_f after
    the last pruning step."""
    final = config.target_sparsity
    if step <= config.start:
        return config.initial_sparsity
    if step >= config.end:
        return final
    progress = (step - config.start) / (config.end - config.start)
    return final + (config.initial_sparsity - final) * (1.0 - progress) ** 3


def pruning_sparsity(step: int, config: PruneConfig) -> float | None:
    """The sparsity to prune to before optimizer step `step`, or None when the step does
    not prune (`magnitude`: only t0; `gradual`: t0 + i * every up to the end)."""
    if config.method == PruneMethod.MAGNITUDE:
        return config.target_sparsity if step == config.start else None
    if config.method == PruneMethod.GRADUAL:
        offset = step - config.start
        if offset >= 0 and step <= config.end and offset % config.every == 0:
            return gmp_sparsity(step, config)
    return None
