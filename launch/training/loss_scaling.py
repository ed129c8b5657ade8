"""Dynamic loss scaling for fp16 training (`train.precision=fp16`, CUDA).

fp16 keeps 5 exponent bits: small gradients flush to zero. The loss is multiplied by a
scale S before the backward pass, so the gradients are S times larger while they are
fp16, and divided by S (in fp32, after the reduction over the ranks) before the update.
A step whose gradients overflowed (a non-finite global norm) is skipped: the weights and
the optimizer state stay as they were, and S halves. After `growth_interval` good steps
in a row S doubles (Micikevicius et al. 2018; the rule and defaults of
`torch.amp.GradScaler`, whose update kernel `torch._amp_update_scale_` runs here).

Why not GradScaler itself: it decides to skip from the gradients this process holds.
Under expert parallelism each rank holds different experts' gradients, so one rank could
skip while another steps, and the replicated dense weights would part. Here the decision
reads the global gradient norm, which every rank computes equal
(`launch.training.optim.global_grad_norm`: dense squares after the all-reduce, expert
squares summed over the EP group), and it stays on the device: the fused AdamW reads
the overflow flag (`found_inf`) itself and leaves the step out, so nothing waits for the
host (the count of skipped steps is read when the loop logs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class DynamicLossScaler:
    """See the module docstring. `scale(loss)` before backward; `unscale_(grads)` after
    the gradients are reduced; `update(global_norm)` returns the overflow flag that the
    optimizer step must honour (`skip_step_if_overflow`)."""

    def __init__(
        self,
        device: torch.device,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if not init_scale > 0 or not growth_factor > 1 or not 0 < backoff_factor < 1:
            raise ValueError(
                f"loss scaling needs init_scale > 0, growth_factor > 1 and 0 < backoff_factor "
                f"< 1; got {init_scale}, {growth_factor}, {backoff_factor}"
            )
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        # 0-dim, as torch.amp.GradScaler keeps them (the fused optimizer's step counts are).
        self._scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self._skipped = torch.zeros((), dtype=torch.float32, device=device)

    def scale(self, loss: Tensor) -> Tensor:
        return loss * self._scale.to(loss.dtype)

    def current_scale(self) -> Tensor:
        """S, the factor the gradients carry until `unscale_` (0-dim fp32, on the device)."""
        return self._scale

    def unscale_(self, grads: list[Tensor]) -> None:
        """Divide every gradient by the scale, in place (fp32 gradients of fp32 masters)."""
        if grads:
            inverse = self._scale.double().reciprocal().float()
            torch._foreach_mul_(grads, inverse)

    def update(self, global_norm: Tensor) -> Tensor:
        """After `unscale_`: the overflow flag of this step (0-dim float, 1.0 when the
        norm is not finite) and the next scale, both on the device."""
        found_inf = (~torch.isfinite(global_norm)).to(torch.float32).reshape(())
        self._skipped += found_inf
        torch._amp_update_scale_(
            self._scale, self._growth_tracker, found_inf,
            self.growth_factor, self.backoff_factor, self.growth_interval,
        )  # fmt: skip
        return found_inf

    def scalars(self) -> dict[str, float]:
        """`loss_scale` and `skipped_steps` (since the run started; a host read)."""
        return {"loss_scale": float(self._scale), "skipped_steps": float(self._skipped)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self._scale.clone(),
            "growth_tracker": self._growth_tracker.clone(),
            "skipped": self._skipped.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("scale", "growth_tracker", "skipped"):
            getattr(self, f"_{name}").copy_(state[name])


def skip_step_if_overflow(optimizer: torch.optim.Optimizer, found_inf: Tensor | None) -> None:
    """Make the next `optimizer.step()` leave everything as it is when `found_inf` is 1:
    the fused AdamW reads the flag on the device (the protocol torch's GradScaler uses
    with optimizers that support it); None clears it."""
    if found_inf is not None and not getattr(optimizer, "_step_supports_amp_scaling", False):
        raise ValueError(
            f"{type(optimizer).__name__} cannot skip a step on the device; fp16 loss scaling "
            "needs an optimizer built with fused=True"
        )
    optimizer.found_inf = found_inf  # type: ignore[attr-defined]
    # The gradients are unscaled already (`DynamicLossScaler.unscale_`).
    optimizer.grad_scale = None  # type: ignore[attr-defined]
