"""The schema of pruning (`PruneConfig`, the `prune` group of `launch.prune`,
`launch.train` and `launch.distill`), validated in `__post_init__`.

Methods (docs/INFERENCE.md, "Pruning and N:M sparsity"):
    none       no pruning of its own (a run that starts from a pruned checkpoint keeps
               that checkpoint's masks fixed);
    magnitude  one shot: zero the smallest |w| (unstructured, to `sparsity`, per matrix
               or over the whole scope) or keep the N largest of every M along the
               reduction dimension (`pattern=N:M`); in training it prunes at step
               `start` and keeps the masks fixed;
    gradual    Zhu & Gupta's gradual magnitude pruning during training (unstructured):
               the sparsity follows their cubic schedule from `initial_sparsity` at
               step `start` to `sparsity` at step `end`, pruning every `every` steps;
    sr_ste     N:M sparse training with SR-STE (Zhou & Ma et al. 2021): the forward uses
               the N:M-masked weights, the dense weights take the update, plus the
               sparse-refined decay `sr_ste_decay` on the masked ones.

`scope`: which weights (`moe.pruning.targets`): the experts, the dense weights
(attention projections and dense FFNs), or both; embeddings, the output head, norms,
biases, routers and gates are never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from routing.config import parse_enum


class PruneMethod(str, Enum):
    NONE = "none"
    MAGNITUDE = "magnitude"
    GRADUAL = "gradual"
    SR_STE = "sr_ste"


class PruneScope(str, Enum):
    EXPERTS = "experts"
    DENSE = "dense"
    ALL = "all"


class Granularity(str, Enum):
    """Where an unstructured sparsity target holds: in every matrix (each expert's
    projection is one matrix), or once over every weight of the scope (one threshold)."""

    MATRIX = "matrix"
    GLOBAL = "global"


UNSTRUCTURED = "unstructured"


@dataclass(frozen=True)
class NMPattern:
    """N:M: at most `n` non-zeros in every `m` consecutive weights along the reduction
    dimension (1 <= n < m)."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(pattern: str) -> NMPattern | None:
    """`unstructured` -> None; `N:M` -> NMPattern (ValueError unless 1 <= N < M)."""
    text = str(pattern).strip()
    if text == UNSTRUCTURED:
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(
            f"prune.pattern={pattern!r} is invalid; accepted: {UNSTRUCTURED} or N:M with "
            "integers 1 <= N < M (2:4 is what sparse tensor cores run)"
        )
    n, m = (int(part) for part in parts)
    if not 1 <= n < m:
        raise ValueError(
            f"prune.pattern={pattern!r} has N={n}, M={m}; accepted: 1 <= N < M (N kept of "
            "every M, e.g. 2:4)"
        )
    return NMPattern(n, m)


@dataclass
class PruneConfig:
    """What to prune and how (module docstring). `sparsity`: the fraction of zeros, in
    [0, 1) (unstructured; N:M implies 1 - N/M, and may be left unset). `permute`: search
    an expert hidden-channel permutation before N:M pruning (Pool & Yu 2021), at most
    `permute_seconds` per FFN and `permute_escapes` perturbations without improvement;
    `seed` draws the perturbations. `start`, `end`, `every`: the training steps of
    `magnitude` (at `start`) and `gradual` (the schedule)."""

    method: PruneMethod = PruneMethod.NONE
    scope: PruneScope = PruneScope.EXPERTS
    sparsity: float | None = None
    pattern: str = UNSTRUCTURED
    granularity: Granularity = Granularity.MATRIX
    permute: bool = False
    permute_seconds: float = 2.0
    permute_escapes: int = 20
    seed: int = 0
    start: int = 0
    end: int = 0
    every: int = 1
    initial_sparsity: float = 0.0
    sr_ste_decay: float = 2e-4

    def __post_init__(self) -> None:
        self.method = parse_enum(PruneMethod, self.method, "prune.method")
        self.scope = parse_enum(PruneScope, self.scope, "prune.scope")
        self.granularity = parse_enum(Granularity, self.granularity, "prune.granularity")
        nm = parse_pattern(self.pattern)
        self.pattern = UNSTRUCTURED if nm is None else str(nm)
        for key in ("sparsity", "initial_sparsity"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int | float) and 0.0 <= value < 1.0):
                raise ValueError(
                    f"prune.{key}={value!r} is invalid; accepted: a fraction of zeros in [0, 1)"
                )
        if nm is not None and self.sparsity is not None and abs(self.sparsity - nm.sparsity) > 1e-9:
            raise ValueError(
                f"prune.sparsity={self.sparsity} contradicts prune.pattern={nm} (sparsity "
                f"{nm.sparsity:g}); leave prune.sparsity unset with an N:M pattern"
            )
        one_shot_or_gradual = self.method in (PruneMethod.MAGNITUDE, PruneMethod.GRADUAL)
        if one_shot_or_gradual and nm is None and self.sparsity is None:
            raise ValueError(
                f"prune.method={self.method.value} needs prune.sparsity (a fraction in "
                "[0, 1)) or an N:M prune.pattern"
            )
        if self.method == PruneMethod.GRADUAL and nm is not None:
            raise ValueError(
                f"prune.method=gradual prunes unstructured; prune.pattern={nm} is pruned in "
                "one shot (prune.method=magnitude) or trained with prune.method=sr_ste"
            )
        if self.method == PruneMethod.SR_STE and nm is None:
            raise ValueError(
                "prune.method=sr_ste trains N:M sparse; set prune.pattern (2:4 is what sparse "
                "tensor cores run)"
            )
        if self.permute and nm is None:
            raise ValueError(
                "prune.permute=true searches a channel permutation for N:M pruning; set an "
                "N:M prune.pattern (unstructured pruning is permutation-invariant)"
            )
        if nm is not None and self.granularity == Granularity.GLOBAL:
            raise ValueError(
                f"prune.granularity=global ranks weights over the whole scope; N:M "
                f"(prune.pattern={nm}) is per group of {nm.m}: leave prune.granularity=matrix"
            )
        if self.method == PruneMethod.NONE and (self.sparsity is not None or nm is not None):
            raise ValueError(
                "prune.sparsity / prune.pattern are set but prune.method=none; accepted: "
                "prune.method=magnitude, gradual or sr_ste"
            )
        if self.permute_seconds <= 0 or self.permute_escapes < 0:
            raise ValueError(
                f"prune.permute_seconds={self.permute_seconds}, prune.permute_escapes="
                f"{self.permute_escapes} are invalid; accepted: seconds > 0, escapes >= 0"
            )
        for key in ("start", "end"):
            if getattr(self, key) < 0:
                raise ValueError(f"prune.{key}={getattr(self, key)} is invalid; accepted: >= 0")
        if self.every < 1:
            raise ValueError(f"prune.every={self.every} is invalid; accepted: >= 1")
        if self.method == PruneMethod.GRADUAL:
            if self.end <= self.start or (self.end - self.start) % self.every:
                raise ValueError(
                    f"prune.start={self.start}, prune.end={self.end}, prune.every={self.every}"
                    " are invalid for prune.method=gradual; accepted: end > start with end - "
                    "start a multiple of every (the schedule prunes at start + i * every)"
                )
            if self.sparsity is not None and self.initial_sparsity > self.sparsity:
                raise ValueError(
                    f"prune.initial_sparsity={self.initial_sparsity} exceeds prune.sparsity="
                    f"{self.sparsity}; accepted: initial <= final"
                )
        if self.sr_ste_decay < 0:
            raise ValueError(f"prune.sr_ste_decay={self.sr_ste_decay} is invalid; accepted: >= 0")

    @property
    def nm(self) -> NMPattern | None:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        """The final fraction of zeros: `sparsity`, or 1 - N/M."""
        nm = self.nm
        if nm is not None:
            return nm.sparsity
        return float(self.sparsity or 0.0)

    @property
    def active(self) -> bool:
        return self.method != PruneMethod.NONE
