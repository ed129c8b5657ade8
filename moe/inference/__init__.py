"""Inference: the batched engine, sampling, loading checkpoints (whole, expert-parallel,
task subsets, int8), task expert subsets and int8 experts.

Nothing in `routing`, `comm` or the MoE layer knows this package exists; it uses the
model and its layers as they are (the engine swaps the KV caches and the capacity
policy, the loaders the dispatchers and the experts).
"""

from moe.inference.cache import Segment, SlotKVCache
from moe.inference.engine import Completion, InferenceEngine, StepEvent, generate
from moe.inference.loading import LoadedModel, load_model, resolve_checkpoint
from moe.inference.sampling import SamplingParams, sample_tokens

__all__ = [
    "Completion",
    "InferenceEngine",
    "LoadedModel",
    "SamplingParams",
    "Segment",
    "SlotKVCache",
    "StepEvent",
    "generate",
    "load_model",
    "resolve_checkpoint",
    "sample_tokens",
]
