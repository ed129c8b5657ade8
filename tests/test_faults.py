"""Faults from outside the product, at a moment the test chooses at random (seeded; the
seed is printed, and `FAULT_SEED=N` repeats a run's choices):

- torchrun (`--max-restarts 1`) and Ray Train (`FailureConfig`): one worker of a 2-rank
  EP=2 run is SIGKILLed mid-run (its pid read from the run's `events.jsonl`); the run
  restarts, resumes from its last checkpoint and finishes, and every evaluation, the
  final validation loss included, equals the uninterrupted run's bit for bit (dropless
  routing, the batch of a step a function of (seed, step), fixed thread counts).
- A process killed in the middle of a checkpoint write (before the first file, between
  files, after meta.json but before the rename, after the rename but before `latest`
  moves, after `latest` moved, and while a re-save of the step `latest` names swaps the
  directories): `latest` always names a complete checkpoint that loads, no step
  directory is half-written, and the resumed run finishes where the uninterrupted one
  does. `tests/checkpoint_pause.py` stops the writes; the product knows nothing of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import tiny_config

from launch.training.loop import EVENTS_FILE, train
from moe.checkpoint import load_checkpoint, resolve_latest, verify_checkpoint
from moe.checkpoint.files import STEP_DIR
from moe.transformer import MoETransformer

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
# EP=2, dropless, an evaluation after every step (so that the test sees each step end).
KILL_RUN = (
    "comm=ep2",
    "routing=dropless",
    "train.steps=16",
    "train.warmup_steps=1",
    "train.eval_every=1",
    "train.checkpoint_every=4",
    "train.keep_last=2",
)
KILL_STEPS = 16
TIMEOUT_S = 300.0


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    seed = int(os.environ.get("FAULT_SEED") or random.SystemRandom().randrange(1_000_000))
    print(f"{request.node.name}: FAULT_SEED={seed}", flush=True)
    return random.Random(seed)


def _records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of `path` (a last line still being written is left out)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def _wait_until(condition: Callable[[], Any], what: str, timeout_s: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _kill_a_worker(run_dir: Path, rng: random.Random, running: Callable[[], bool]) -> dict:
    """SIGKILL a random rank after a random step (and a random fraction of the next),
    its pid from the run's own records; returns what was done."""
    after_step, rank, delay = rng.randint(5, KILL_STEPS - 5), rng.randrange(2), rng.random() / 5

    def reached() -> bool:
        if not running():
            raise AssertionError("the run ended before the test killed a worker")
        return any(r["step"] >= after_step for r in _records(run_dir / "metrics.jsonl"))

    _wait_until(reached, f"step {after_step} in metrics.jsonl")
    starts = _records(run_dir / EVENTS_FILE)
    assert len(starts) == 1, starts
    worker = starts[0]["workers"][rank]
    assert worker["rank"] == rank and worker["pid"] != os.getpid()
    time.sleep(delay)  # the moment itself, not a wait for a condition
    os.kill(worker["pid"], signal.SIGKILL)
    # Every step needs both ranks, so the run gets at most one step further.
    reached_step = max(r["step"] for r in _records(run_dir / "metrics.jsonl"))
    done = {"after_step": after_step, "rank": rank, "delay_s": delay, "pid": worker["pid"]}
    done["reached_step"] = reached_step
    print(f"killed {done}", flush=True)
    return done


def _torchrun(run_dir: Path, max_restarts: int, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        f"--max-restarts={max_restarts}", "-m", "launch.train", "experiment=tiny",
        f"run_dir={run_dir}", "wandb.mode=disabled", "train.progress=false", *KILL_RUN,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # torchrun shares its rendezvous TCPStore with the workers' init_process_group; a
    # restarted worker group then reads the dead workers' gloo addresses from the last
    # attempt and fails to connect (pytorch/pytorch#135712). A store per attempt:
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    with open(log, "wb") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: _stop ends its workers too
        )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill what is left of a torchrun started by `_torchrun` (agent and workers)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _finish(proc: subprocess.Popen[bytes], log: Path) -> None:
    try:
        code = proc.wait(timeout=TIMEOUT_S)
    finally:
        _stop(proc)
    assert code == 0, log.read_text()[-4000:]


def _same_numbers(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "tokens_per_s"}


def _check_recovered(run_dir: Path, killed: dict, reference: list[dict[str, Any]]) -> None:
    """Two starts, the second from a checkpoint no later than the kill; every evaluation
    (those before the kill and those repeated after it) equals the uninterrupted run's."""
    starts = _records(run_dir / EVENTS_FILE)
    assert len(starts) == 2, starts
    assert starts[1]["resumed_from"] is not None
    assert 0 < starts[1]["step"] <= killed["reached_step"] + 1
    assert starts[1]["step"] % 4 == 0
    assert starts[1]["workers"][killed["rank"]]["pid"] != killed["pid"]
    by_step = {r["step"]: _same_numbers(r) for r in reference}
    records = _records(run_dir / "metrics.jsonl")
    assert records[-1]["step"] == KILL_STEPS
    for record in records:
        assert _same_numbers(record) == by_step[record["step"]], record["step"]
    assert resolve_latest(run_dir / "checkpoints") == run_dir / "checkpoints" / "step_16"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The evaluations of the uninterrupted run (torchrun, 2 ranks)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    log = run_dir / "torchrun.log"
    _finish(_torchrun(run_dir / "run", 0, log), log)
    records = _records(run_dir / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, KILL_STEPS + 1))
    return records


@pytest.mark.distributed
def test_torchrun_restarts_after_a_worker_is_sigkilled(
    tmp_path: Path, rng: random.Random, reference: list[dict[str, Any]]
) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "torchrun.log"
    proc = _torchrun(run_dir, 1, log)
    try:
        killed = _kill_a_worker(run_dir, rng, lambda: proc.poll() is None)
        _finish(proc, log)
    finally:
        _stop(proc)
    assert "restart" in log.read_text().lower()
    _check_recovered(run_dir, killed, reference)


@pytest.mark.ray
@pytest.mark.distributed
def test_ray_replaces_a_sigkilled_worker(
    tmp_path: Path,
    rng: random.Random,
    reference: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ray = pytest.importorskip("ray")
    from launch.ray_train import run_ray

    # The workers inherit the driver's environment: the reference's thread count.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, *KILL_RUN, "ray.max_failures=1")
    fitting = threading.Event()
    fitting.set()
    outcome: dict[str, Any] = {}

    def killer() -> None:
        try:
            outcome["killed"] = _kill_a_worker(run_dir, rng, fitting.is_set)
        except BaseException as error:  # reported by the test below
            outcome["error"] = error

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = run_ray(config)
    finally:
        fitting.clear()
        ray.shutdown()
        thread.join(timeout=10)
    if "error" in outcome:
        raise outcome["error"]
    assert result.error is None
    assert result.metrics["step"] == KILL_STEPS
    _check_recovered(run_dir, outcome["killed"], reference)


# --- killed in the middle of a checkpoint write -----------------------------------------

# One process; a checkpoint every 2 steps; each save writes the dense file, 8 expert files
# and the optimizer state (write indices 0..10), then meta.json and `latest`.
CHECKPOINT_RUN = (
    "routing=dropless",
    "train.steps=10",
    "train.warmup_steps=1",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.keep_last=2",
)
SHARD_WRITES = 11


class Pauser:
    """`tests/checkpoint_pause.py`, started once; each job is a forked training process."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.jobs = 0
        self.running: tuple[int, Path] | None = None  # the job's pid and status file
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "checkpoint_pause.py")],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def run(self, run_dir: Path, spec: dict[str, Any], resume_from: Path | None = None) -> int:
        """Run a job; if `spec` names a moment, SIGKILL the job there. Its exit status."""
        self.jobs += 1
        signal_file = self.tmp_path / f"job{self.jobs}.signal"
        status_file = Path(f"{signal_file}.status")
        log = self.tmp_path / f"job{self.jobs}.log"
        job = {
            "spec": spec,
            "signal": str(signal_file),
            "run_dir": str(run_dir),
            "resume_from": None if resume_from is None else str(resume_from),
            "overrides": list(CHECKPOINT_RUN),
            "log": str(log),
        }
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        self.running = (pid, status_file)
        if spec:
            _wait_until(
                lambda: signal_file.exists() or status_file.exists(), f"the pause at {spec}"
            )
            assert signal_file.exists(), f"job ended before {spec}:\n{log.read_text()[-3000:]}"
            print(f"job {self.jobs}: {json.loads(signal_file.read_text())}", flush=True)
            os.kill(pid, signal.SIGKILL)
        _wait_until(status_file.exists, f"job {self.jobs} to end")
        status = int(status_file.read_text())
        assert status == (-signal.SIGKILL if spec else 0), log.read_text()[-3000:]
        return status

    def close(self) -> None:
        if self.running is not None and not self.running[1].exists():
            with contextlib.suppress(ProcessLookupError):  # a job left by a failed check
                os.kill(self.running[0], signal.SIGKILL)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _check_checkpoints(run_dir: Path, latest_step: int, complete: set[int]) -> Path:
    """`latest` names a complete checkpoint of `latest_step` that loads (every file
    sha256-checked, optimizer state included); the step directories are exactly
    `complete`, each whole."""
    directory = run_dir / "checkpoints"
    latest = resolve_latest(directory)
    assert latest is not None
    meta = verify_checkpoint(latest)
    assert meta["step"] == latest_step
    config = tiny_config(run_dir, *CHECKPOINT_RUN)
    model = MoETransformer(config.model, config.routing, seed=7)
    loaded = load_checkpoint(latest, model, load_optimizer=True)
    assert loaded.step == latest_step and loaded.optimizer_state
    steps = {int(m.group(1)) for p in directory.iterdir() if (m := STEP_DIR.match(p.name))}
    assert steps == complete
    for step in steps:
        assert verify_checkpoint(directory / f"step_{step}")["step"] == step
    return latest


def _last_start(run_dir: Path) -> dict[str, Any]:
    return _records(run_dir / EVENTS_FILE)[-1]


def test_killed_mid_checkpoint_write_resumes_from_a_whole_checkpoint(
    tmp_path: Path, rng: random.Random
) -> None:
    uninterrupted = train(tiny_config(tmp_path / "uninterrupted", *CHECKPOINT_RUN))
    run_dir = tmp_path / "run"
    between = rng.randint(1, SHARD_WRITES - 1)
    pauser = Pauser(tmp_path)
    try:
        # Before the first file of step 4's checkpoint: step_2 stays the latest.
        pauser.run(run_dir, {"save": 2, "when": "before", "index": 0})
        step_2 = _check_checkpoints(run_dir, 2, {2})
        # Between two files (at random) of step 4's checkpoint, resumed from step_2.
        pauser.run(run_dir, {"save": 1, "when": "before", "index": between})
        assert _last_start(run_dir)["resumed_from"] == str(step_2)
        _check_checkpoints(run_dir, 2, {2})
        # meta.json written, the directory not yet renamed: it is not taken for step_4.
        pauser.run(run_dir, {"save": 1, "when": "after", "match": "meta.json"})
        _check_checkpoints(run_dir, 2, {2})
        # Renamed to step_4 but `latest` not yet moved: step_2 stays the latest.
        pauser.run(run_dir, {"save": 1, "when": "before", "match": "latest"})
        assert _last_start(run_dir)["resumed_from"] == str(step_2)
        _check_checkpoints(run_dir, 2, {2, 4})
        # Step 4 saved again (replacing step_4), step 6 saved, killed after `latest`
        # moved but before the oldest checkpoint is pruned.
        pauser.run(run_dir, {"save": 2, "when": "after", "match": "latest"})
        assert _last_start(run_dir)["resumed_from"] == str(step_2)
        step_6 = _check_checkpoints(run_dir, 6, {2, 4, 6})
        # A run restarted from an older checkpoint than `latest` (as Ray restores the last
        # one it was told of) saves step 6 again while `latest` names step_6: killed
        # between moving the old step_6 aside and moving the new one in.
        pauser.run(
            run_dir,
            {"save": 1, "when": "after", "match": "rename step_6 -> "},
            resume_from=run_dir / "checkpoints" / "step_4",
        )
        _check_checkpoints(run_dir, 6, {2, 4})
        # The last start runs to the end.
        pauser.run(run_dir, {})
        assert _last_start(run_dir)["step"] == 6
    finally:
        pauser.close()
    assert Path(_last_start(run_dir)["resumed_from"]).name in (step_6.name, ".step_6.replaced")
    _check_checkpoints(run_dir, 10, {8, 10})
    assert not list((run_dir / "checkpoints").glob(".step_*")), "leftovers of killed saves"
    records = _records(run_dir / "metrics.jsonl")
    assert records[-1]["step"] == 10
    assert _same_numbers(records[-1]) == _same_numbers(uninterrupted.evaluations[-1])
