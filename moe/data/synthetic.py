"""A seeded synthetic corpus with task structure, for benchmarks and tests.

Each task is a first-order Markov chain over bytes with its own alphabet (a random subset
of the 256 byte values) and its own sparse transition table (every symbol is followed by
one of `branching` successors, drawn with Dirichlet(1) weights). A model can learn the
task from a few bytes of context, so task-level routing has something to find, and the
entropy rate of every task is at most log2(branching) bits per byte, which gives a floor
for validation bits per byte (`entropy_rate_bits`).

Shape legend: A alphabet symbols, S successors per symbol (`branching`), C parallel chains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moe.data.corpus import TaskCorpus

_NUM_CHAINS = 256  # chains generated side by side; their concatenation is the stream


@dataclass(frozen=True)
class MarkovTask:
    """One task's chain: `alphabet_A` byte values, `successors_AS` indices into the
    alphabet, `probabilities_AS` (rows sum to 1)."""

    alphabet_A: np.ndarray
    successors_AS: np.ndarray
    probabilities_AS: np.ndarray


def make_markov_task(rng: np.random.Generator, alphabet_size: int, branching: int) -> MarkovTask:
    """A random sparse Markov chain over a random alphabet of `alphabet_size` bytes."""
    alphabet_A = rng.choice(256, size=alphabet_size, replace=False).astype(np.uint8)
    successors_AS = np.stack(
        [rng.choice(alphabet_size, size=branching, replace=False) for _ in range(alphabet_size)]
    )
    probabilities_AS = rng.dirichlet(np.ones(branching), size=alphabet_size)
    return MarkovTask(alphabet_A, successors_AS, probabilities_AS)


def sample_markov(task: MarkovTask, length: int, rng: np.random.Generator) -> np.ndarray:
    """`length` bytes of the chain: `_NUM_CHAINS` chains run side by side (vectorised)
    from uniform start symbols, concatenated chain after chain."""
    steps = -(-length // _NUM_CHAINS)
    cumulative_AS = np.cumsum(task.probabilities_AS, axis=1)
    cumulative_AS[:, -1] = 1.0
    states_C = rng.integers(len(task.alphabet_A), size=_NUM_CHAINS)
    uniforms = rng.random((steps, _NUM_CHAINS))
    symbols = np.empty((steps, _NUM_CHAINS), dtype=np.int64)
    for step in range(steps):
        symbols[step] = states_C
        choice_C = (uniforms[step, :, None] > cumulative_AS[states_C]).sum(axis=1)
        states_C = task.successors_AS[states_C, choice_C]
    return task.alphabet_A[symbols.T.reshape(-1)[:length]]


def entropy_rate_bits(task: MarkovTask) -> float:
    """The chain's entropy rate in bits per byte: sum_i pi_i H(P_i), with pi the stationary
    distribution (power iteration from uniform; the chain's average over its start)."""
    size = len(task.alphabet_A)
    transition = np.zeros((size, size))
    for symbol in range(size):
        np.add.at(transition[symbol], task.successors_AS[symbol], task.probabilities_AS[symbol])
    pi = np.full(size, 1.0 / size)
    average = np.zeros(size)
    iterations = 2000
    for _ in range(iterations):  # Cesaro average: converges for periodic chains too
        average += pi
        pi = pi @ transition
    average /= iterations
    probabilities = task.probabilities_AS
    row_entropy = -(probabilities * np.log2(np.clip(probabilities, 1e-300, None))).sum(axis=1)
    return float(average @ row_entropy)


def make_synthetic_tasks(
    num_tasks: int, alphabet_size: int = 32, branching: int = 4, seed: int = 0
) -> list[MarkovTask]:
    """The chains of `make_synthetic_corpus` (same seed, same chains)."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks={num_tasks} is invalid; accepted: an integer >= 1")
    if not 2 <= alphabet_size <= 256:
        raise ValueError(f"alphabet_size={alphabet_size} is invalid; accepted: 2..256")
    if not 1 <= branching <= alphabet_size:
        raise ValueError(
            f"branching={branching} is invalid; accepted: 1..alphabet_size={alphabet_size}"
        )
    return [
        make_markov_task(np.random.default_rng([seed, task, 0]), alphabet_size, branching)
        for task in range(num_tasks)
    ]


def make_synthetic_corpus(
    num_tasks: int = 4,
    train_bytes_per_task: int = 1 << 16,
    val_bytes_per_task: int = 1 << 13,
    alphabet_size: int = 32,
    branching: int = 4,
    seed: int = 0,
) -> TaskCorpus:
    """A corpus of `num_tasks` Markov-chain tasks; the same arguments give the same bytes."""
    for key, value in (
        ("train_bytes_per_task", train_bytes_per_task),
        ("val_bytes_per_task", val_bytes_per_task),
    ):
        if value < 1:
            raise ValueError(f"{key}={value} is invalid; accepted: an integer >= 1")
    tasks = make_synthetic_tasks(num_tasks, alphabet_size, branching, seed)
    train_N, val_N = [], []
    for index, task in enumerate(tasks):
        train_N.append(
            torch.from_numpy(
                sample_markov(task, train_bytes_per_task, np.random.default_rng([seed, index, 1]))
            )
        )
        val_N.append(
            torch.from_numpy(
                sample_markov(task, val_bytes_per_task, np.random.default_rng([seed, index, 2]))
            )
        )
    names = tuple(f"markov_{task}" for task in range(num_tasks))
    return TaskCorpus(
        name=f"synthetic:seed={seed}",
        task_names=names,
        train_N=tuple(train_N),
        val_N=tuple(val_N),
        train_documents=tuple((f"{name}/train",) for name in names),
        val_documents=tuple((f"{name}/val",) for name in names),
    )
