"""The compiled training step (`train.compile=true`): `torch.compile` of the model's
forward, and through AOTAutograd of its backward, with inductor (C++ on CPU, Triton on
CUDA). The optimizer step stays eager.

`CompiledStep` is what the trainer calls instead of the model. It

- counts compilations (every graph that dynamo hands to inductor) and their wall time
  (`compile/compilations`, `compile/time_s`; the backward graph is compiled at the first
  backward, which the trainer reports as `compile/first_step_s`);
- keys the compiled step: `key_fn()` (for example the routing policies' compile key,
  DynaMoE's padded rows per layer) is read before every call; a key not seen before is a
  rebuild (`compile/rebuilds`). Shapes are compiled static (`dynamic=False`), so new
  padded rows give new graphs through dynamo's guards, and a key seen before reuses
  its graphs: rebuilds happen only when the key changes to a new value. The recompile
  limit is raised to `max_keys` graphs per frame while the step runs (torch's default,
  8, would silently fall back to eager);
- points inductor's on-disk caches (FX graph cache, AOTAutograd cache, compiled C++) at
  `cache_dir` when one is given, so a second run with the same model and shapes loads
  its kernels instead of compiling them; otherwise torch's default directory
  (`/tmp/torchinductor_$USER`), shared by every run of the user on the machine.

The MoE layer compiles without graph breaks at EP=1 (tests/test_compile.py). At EP>1
the all-to-all stays outside the graph (the dispatcher's dispatch and combine run eagerly
between two compiled graphs): its split sizes come from a counts exchange (data on the
host), gloo collectives have no inductor lowering, and the rows it moves are already
contiguous, so the graph gains nothing from holding it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._dynamo import lookup_backend

from routing import PolicyState

# Environment variable through which inductor finds its cache directory (torch reads it
# on each use; this module is the launcher side, where the environment may be set).
CACHE_DIR_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def use_cache_dir(cache_dir: str | Path) -> Path:
    """Put inductor's on-disk caches under `cache_dir` (created); returns the path."""
    path = Path(cache_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_DIR_VARIABLE] = str(path)
    return path


class CompiledStep:
    """`module` compiled with `torch.compile` (see the module docstring); call it like
    the module. `key_fn`: the current compilation key (None: one key); `backend`: a
    dynamo backend name (inductor for training; the tests use cheaper ones)."""

    def __init__(
        self,
        module: nn.Module,
        key_fn: Callable[[], Hashable] | None = None,
        cache_dir: str | Path | None = None,
        fullgraph: bool = False,
        max_keys: int = 64,
        backend: str = "inductor",
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys={max_keys} must be >= 1")
        self.module = module
        self.key_fn = key_fn
        self.fullgraph = fullgraph
        self.max_keys = max_keys
        self.backend = backend
        self.cache_dir = use_cache_dir(cache_dir) if cache_dir else None
        self.compilations = 0
        self.compile_time_s = 0.0
        self.trace_time_s = 0.0  # wall time of the calls that compiled (tracing included)
        self.first_step_s = 0.0  # set by the trainer: its first step, compiles included
        self.rebuilds = 0
        self.keys: list[Hashable] = []
        self._compiled = self._build()

    def _build(self) -> Callable[..., Any]:
        return torch.compile(
            self.module, backend=self._backend, fullgraph=self.fullgraph, dynamic=False
        )

    def _backend(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        from torch._inductor.compile_fx import compile_fx

        compiler = compile_fx if self.backend == "inductor" else lookup_backend(self.backend)
        started = time.perf_counter()
        compiled = compiler(graph, example_inputs)
        self.compile_time_s += time.perf_counter() - started
        self.compilations += 1
        return compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = self.key_fn() if self.key_fn is not None else None
        if key not in self.keys:
            if self.keys:
                self.rebuilds += 1
            self.keys.append(key)
        started = time.perf_counter()
        before = self.compilations
        limit = max(8, self.max_keys)
        with torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=limit):
            out = self._compiled(*args, **kwargs)
        if self.compilations != before:
            # Dynamo's tracing and guard building around the inductor compile.
            self.trace_time_s += time.perf_counter() - started
        return out

    def rebuild(self) -> None:
        """Forget every compiled graph of the module (all keys) and compile afresh on
        the next call (counted as a rebuild). Dynamo's caches are per code object, so
        this resets them for every compiled function of the process."""
        torch._dynamo.reset()
        self.keys.clear()
        self.rebuilds += 1
        self._compiled = self._build()

    def report_first_step(self, first_step_s: float, is_main: bool) -> None:
        """Record the first step's wall time (compiles included) and print it (main)."""
        self.first_step_s = first_step_s
        if is_main:
            print(
                f"[compile] first step {first_step_s:.1f} s: {self.compilations} graphs "
                f"compiled in {self.compile_time_s:.1f} s (inductor, forward), cache "
                f"{self.cache_dir or 'torch default'}",
                flush=True,
            )

    def scalars(self) -> dict[str, float]:
        """What the trainer logs (wandb and metrics.jsonl)."""
        return {
            "compile/compilations": float(self.compilations),
            "compile/time_s": self.compile_time_s,
            "compile/first_calls_s": self.trace_time_s,
            "compile/first_step_s": self.first_step_s,
            "compile/rebuilds": float(self.rebuilds),
        }

    def train(self, mode: bool = True) -> CompiledStep:
        self.module.train(mode)
        return self

    def parameters(self) -> Any:
        return self.module.parameters()


def training_step(
    module: nn.Module, policy_state: PolicyState, train_cfg: Any
) -> CompiledStep | None:
    """The compiled forward + backward of `train.compile=true` (None when off), keyed by
    the routing policies' shapes (`routing.PolicyState.compile_key`: DynaMoE's padded
    rows per layer; one key for stateless routing). `module`: what the trainer calls
    (the engine's)."""
    if not train_cfg.compile:
        return None
    for note in policy_state.compile_notes():
        print(f"[compile] {note}", flush=True)
    return CompiledStep(
        module, key_fn=policy_state.compile_key, cache_dir=train_cfg.compile_cache_dir or None
    )
