"""Training processes whose checkpoint writes a test can stop at, to kill them there.

    python tests/checkpoint_pause.py

reads one JSON job per line on stdin: `{"spec", "signal", "run_dir", "resume_from",
"overrides", "log"}`. For each it forks a child that runs `launch.training.loop.train` on
`tests/test_train.tiny_config(run_dir, *overrides)` (one process, output to `log`) with
hooks around the checkpoint code's file writes (`write_bytes`, which every checkpoint
file, `meta.json` and `latest` go through) and directory renames (`os.replace` of a
directory); nothing in the product's config knows about them. It answers the child's pid
on stdout, and when the child ends writes its exit status (negative: the signal) to
`signal + ".status"`. The fork spares each job the imports (seconds of CPU each).

`spec` names one moment: `{"save": n, "when": "before"|"after", "index": k}` (the k-th
file write of the n-th checkpoint save of the child, from 0) or `{"save": n, "when": ...,
"match": s}` (the first write or rename of that save whose label contains `s`; a write's
label is its path under the checkpoints directory, a rename's `rename SRC -> DST`). `{}`
pauses nowhere. At that moment the child writes `signal` (JSON: the label, the step) and
waits to be killed. `resume_from`, unless null, is passed to `train(resume_from=...)`, as
the Ray launcher passes the checkpoint Ray restored.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PAUSE_LIMIT_S = 300.0


class Pauser:
    """Counts the checkpoint saves and their writes; stops at the moment of the spec."""

    def __init__(self, spec: dict[str, Any], signal: Path, checkpoints: Path) -> None:
        self.spec = spec
        self.signal = signal
        self.checkpoints = checkpoints
        self.save = 0
        self.step = -1
        self.writes = 0

    def begin(self, step: int) -> None:
        self.save, self.step, self.writes = self.save + 1, step, 0

    def event(self, when: str, label: str, index: int | None) -> None:
        spec = self.spec
        if not spec or spec["save"] != self.save or spec["when"] != when:
            return
        if "index" in spec and spec["index"] != index:
            return
        if "match" in spec and spec["match"] not in label:
            return
        record = {"save": self.save, "step": self.step, "when": when, "label": label}
        temp = self.signal.with_name(self.signal.name + ".part")
        temp.write_text(json.dumps(record))
        os.replace(temp, self.signal)
        print(f"[checkpoint_pause] paused {when} {label} (step {self.step})", flush=True)
        deadline = time.monotonic() + PAUSE_LIMIT_S
        while time.monotonic() < deadline:  # the test kills us here
            time.sleep(0.05)
        os._exit(3)

    def label(self, path: str | os.PathLike[str]) -> str:
        try:
            return str(Path(path).relative_to(self.checkpoints))
        except ValueError:
            return str(path)


def install(pauser: Pauser) -> None:
    import moe.checkpoint.files as files
    import moe.checkpoint.save as save

    real_write, real_begin, real_replace = files.write_bytes, save.begin_checkpoint, os.replace

    def write_bytes(path: Path, data: bytes) -> None:
        index, label = pauser.writes, pauser.label(path)
        pauser.writes += 1
        pauser.event("before", label, index)
        real_write(path, data)
        pauser.event("after", label, index)

    def begin_checkpoint(directory: str | Path, step: int) -> Path:
        pauser.begin(step)
        return real_begin(directory, step)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if not os.path.isdir(src):
            real_replace(src, dst, **kwargs)
            return
        label = f"rename {pauser.label(src)} -> {pauser.label(dst)}"
        pauser.event("before", label, None)
        real_replace(src, dst, **kwargs)
        pauser.event("after", label, None)

    files.write_bytes = write_bytes  # save_tensors and the shard writes
    save.write_bytes = write_bytes  # meta.json, optimizer json, latest
    save.begin_checkpoint = begin_checkpoint
    os.replace = replace


def _child(job: dict[str, Any]) -> None:
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    from test_train import tiny_config

    from launch.training.loop import train

    run_dir = Path(job["run_dir"])
    config = tiny_config(run_dir, *job["overrides"])
    install(Pauser(job["spec"], Path(job["signal"]), run_dir / "checkpoints"))
    resume_from = job["resume_from"]
    train(config, resume_from=None if resume_from is None else Path(resume_from))


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import launch.training.loop  # noqa: F401  (imported once, before the forks)

    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                _child(job)
            except BaseException:
                import traceback

                traceback.print_exc()
                status = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        status_file = Path(job["signal"] + ".status")
        status_file.with_name(status_file.name + ".part").write_text(str(code))
        os.replace(status_file.with_name(status_file.name + ".part"), status_file)


if __name__ == "__main__":
    main()
