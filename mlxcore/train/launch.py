"""Run a training job in a child process and stream its events back: the one entry point of
every kind of training (`python -m mlxcore.train.launch JOB.json`).

A job is a pydantic model with a `kind` (`JOBS` says which module runs it: pretrain / SFT
`TrainJob`, the distill student's `StudentJob`, the RL update's `UpdateJob`, preference and
reward-model `PreferenceJob` / `RewardJob`), written as
`<out_dir>/job.json`; every kind trains through `train.fit()`.

Training runs in its own process so that a timeout or cancellation really stops it (a thread
cannot be interrupted), its memory goes back to the OS when it ends, and a crash of the
trainer never takes the caller with it. The child writes JSON-lines events to a pipe (see
`callbacks.JsonLinesCallback`); they are replayed here into the caller's callback. The child
gets SIGTERM if this process dies, so no orphan keeps training. A data-parallel job
(`train.world_size > 1`) starts one child per rank (see `distributed.py`); rank 0 sends the
events, and when any rank dies the others are stopped instead of waiting in an all-reduce.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlxcore.train import distributed
from mlxcore.train.callbacks import JsonLinesCallback, ProgressBar, TrainingCallback, replay
from mlxcore.io import WriteError

EVENTS_FD = "MLXFLOW_EVENTS_FD"


class TrainingFailed(RuntimeError):
    """The trainer exited with an error (bad data, bad config...). Retrying will not help."""


class TrainingCrashed(RuntimeError):
    """The trainer was killed by a signal (OOM killer, preemption). A retry resumes it."""


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _watch(procs: list[subprocess.Popen], codes: list[int | None]) -> None:
    """Wait for every rank; when one fails, stop the others (they would block in an all-reduce)."""
    while any(c is None for c in codes):
        for i, p in enumerate(procs):
            if codes[i] is None:
                codes[i] = p.poll()
        if any(c not in (None, 0) for c in codes):
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for i, p in enumerate(procs):
                codes[i] = p.wait()
            return
        time.sleep(0.05)


# kind -> (module, job class, run function); imported by name in the child only, so launch
# imports none of them (they import nothing of launch either).
JOBS = {
    "train": ("mlxcore.train.loop", "TrainJob", "run"),
    "distill-student": ("mlxcore.distill.student", "StudentJob", "run"),
    "rl-update": ("mlxcore.rl.iteration", "UpdateJob", "run_job"),
    "preference": ("mlxcore.preference.train", "PreferenceJob", "run"),
    "reward-model": ("mlxcore.preference.train", "RewardJob", "run_reward"),
}


def run_in_subprocess(job, callback: TrainingCallback | None = None) -> dict:
    """Run `python -m mlxcore.train.launch <out_dir>/job.json`, one process per data-parallel rank.

    Returns the job's result (its `result` event, sent by rank 0 once the job's run returned).
    """
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job_path = out / "job.json"
    job_path.write_text(job.model_dump_json(indent=2))
    callback = callback or TrainingCallback()
    world = getattr(job, "train", None).world_size if getattr(job, "train", None) is not None else 1
    rank_envs = distributed.local_ring(world, out) if world > 1 else [{}]
    read_fd, write_fd = os.pipe()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    procs = []
    for rank, extra in enumerate(rank_envs):
        env = {**os.environ, **extra, "PYTHONUNBUFFERED": "1"}
        if rank == 0:
            env[EVENTS_FD] = str(write_fd)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mlxcore.train.launch", str(job_path)],
            env=env,
            pass_fds=(write_fd,) if rank == 0 else (),
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent,
        ))
    os.close(write_fd)

    def pump_stderr(proc, prefix: str) -> None:
        for line in proc.stderr:
            tail.append(prefix + line)
            sys.stderr.write(prefix + line)

    pumps = [threading.Thread(target=pump_stderr, args=(p, f"[rank {r}] " if world > 1 else ""), daemon=True)
             for r, p in enumerate(procs)]
    codes: list[int | None] = [None] * len(procs)
    watcher = threading.Thread(target=_watch, args=(procs, codes), daemon=True)
    for t in [*pumps, watcher]:
        t.start()
    result = error = None
    try:
        with os.fdopen(read_fd) as events:  # ends when rank 0 exits (or is stopped by the watcher)
            for line in events:
                msg = replay(line, callback)
                if msg and msg["event"] == "result":  # the job's return value, sent once it is all done
                    result = {k: v for k, v in msg.items() if k != "event"}
                elif msg and msg["event"] == "error":
                    error = msg.get("message") or msg.get("kind")
        watcher.join()
    except BaseException:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    for t in pumps:
        t.join(timeout=5)
    signals = [-c for c in codes if c < 0]
    if codes[0] < 0 or any(sig != signal.SIGTERM for sig in signals):  # SIGTERM alone: stopped by _watch
        sig = next((s_ for s_ in signals if s_ != signal.SIGTERM), signal.SIGTERM)
        raise TrainingCrashed(f"training process killed by signal {sig}; re-running resumes from {out}/checkpoints")
    exits = ", ".join(map(str, codes))
    if error:  # the trainer said what went wrong, in one line (its stderr went to ours above)
        raise TrainingFailed(error)
    if any(codes):
        raise TrainingFailed(f"training failed (exit {exits}): {''.join(tail).rstrip() or 'the trainer printed nothing'}")
    if result is None:
        raise TrainingFailed(f"training exited (exit {exits}) without reporting a result; {out} is incomplete, "
                             "run it again to resume")
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m mlxcore.train.launch JOB.json`: run the job; every way out is reported.

    Success sends `result` (the run's return value; `fit()` has sent `end` before it). An expected failure (bad data or config, a write
    that failed: disk full, permissions) sends `error` with a one-line message, prints it and
    exits 1; anything else sends `error` too, then raises (exit 1 with its traceback).
    """
    import importlib
    import json

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mlxcore.train.launch JOB.json", file=sys.stderr)
        return 2
    text = Path(argv[0]).read_text()
    kind = json.loads(text).get("kind", "train")
    if kind not in JOBS:
        print(f"mlxcore.train.launch: error: {argv[0]}: unknown job kind {kind!r} (known: {', '.join(JOBS)})", file=sys.stderr)
        return 2
    module_name, job_cls, run_name = JOBS[kind]
    module = importlib.import_module(module_name)
    job = getattr(module, job_cls).model_validate_json(text)
    fd = os.environ.get(EVENTS_FD)
    if fd:
        callback = JsonLinesCallback(int(fd))
    else:  # started by hand or by mlx.launch: rank 0 draws the progress bar
        callback = ProgressBar(Path(job.out_dir).name) if distributed.env_rank() == 0 else TrainingCallback()
    try:
        result = getattr(module, run_name)(job, callback)
        callback.on_event("result", result if isinstance(result, dict) else {})
    except (WriteError, ValueError, FileNotFoundError, KeyError, *getattr(module, "EXPECTED_ERRORS", ())) as e:
        callback.on_event("error", {"message": str(e), "kind": type(e).__name__})
        print(f"mlxcore.train.launch: error: {e}", file=sys.stderr)
        return 1
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            callback.on_event("error", {"message": f"{type(e).__name__}: {e}".rstrip(": "), "kind": type(e).__name__})
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
