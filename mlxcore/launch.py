"""Run a training job in a child process and stream its events back.

Training runs in its own process so that a timeout or cancellation really stops it (a thread
cannot be interrupted), its memory goes back to the OS when it ends, and a crash of the
trainer never takes the caller with it. The child writes JSON-lines events to a pipe (see
`callbacks.JsonLinesCallback`); they are replayed here into the caller's callback. The child
gets SIGTERM if this process dies, so no orphan keeps training.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from mlxcore.callbacks import TrainingCallback, replay


class TrainingFailed(RuntimeError):
    """The trainer exited with an error (bad data, bad config...). Retrying will not help."""


class TrainingCrashed(RuntimeError):
    """The trainer was killed by a signal (OOM killer, preemption). A retry resumes it."""


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_in_subprocess(job, callback: TrainingCallback | None = None, module: str = "mlxcore.train") -> dict:
    """Run `python -m <module> <out_dir>/job.json`; returns the job's result (its `end` event)."""
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job_path = out / "job.json"
    job_path.write_text(job.model_dump_json(indent=2))
    callback = callback or TrainingCallback()
    read_fd, write_fd = os.pipe()
    env = {**os.environ, "MLXFLOW_EVENTS_FD": str(write_fd), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", module, str(job_path)],
        env=env,
        pass_fds=(write_fd,),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_die_with_parent,
    )
    os.close(write_fd)
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def pump_stderr() -> None:
        for line in proc.stderr:
            tail.append(line)
            sys.stderr.write(line)

    pump = threading.Thread(target=pump_stderr, daemon=True)
    pump.start()
    result = None
    try:
        with os.fdopen(read_fd) as events:
            for line in events:
                msg = replay(line, callback)
                if msg and msg["event"] == "end":
                    result = {k: v for k, v in msg.items() if k != "event"}
        code = proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    pump.join(timeout=5)
    if code < 0:
        raise TrainingCrashed(f"training process killed by signal {-code}; re-running resumes from {out}/checkpoints")
    if code != 0 or result is None:
        raise TrainingFailed(f"training failed (exit {code}):\n{''.join(tail).rstrip()}")
    return result
