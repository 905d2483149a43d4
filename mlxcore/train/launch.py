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

Ranks on other hosts (`train.distributed.hosts`) start through ssh or a command prefix
(`ip netns exec {ssh}`), which passes no file descriptors but stdin / stdout / stderr, so there:
rank 0's events come on its stdout (the child moves its own prints to stderr: the stream holds
events only), and stdin is a lifeline — closing it (the launcher stopping the job, or the launcher
or its ssh connection dying) makes the rank's `_lifeline` watcher SIGTERM it. A rank's exit
status 128+N (its script's report of signal N) counts as killed by signal N.
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

EVENTS_FD = "MLXFLOW_EVENTS_FD"  # a pipe's fd number, or "stdout" (a rank started through ssh / a prefix)
LIFELINE = "MLXFLOW_LIFELINE"  # "stdin": stop when stdin closes
STOP_GRACE_S = 10.0  # a remote rank told to stop (stdin closed) gets this long before its local end is killed


# Packages a trainer never uses but would import because they are installed: transformers imports
# PyTorch when it finds it (mlx-lm's tokenizer loads transformers), mlx-lm's tuner imports W&B.
# A None entry in sys.modules makes `import torch` raise ImportError and transformers' availability
# check answer no, so a child starts in 1.4 s instead of 3.4 s of CPU (measured with both installed,
# as the [test,bench,tracking] extras install them). Trackers run in the parent (mlxcore.tracking).
NOT_IN_THE_TRAINER = ("torch", "wandb")


class TrainingFailed(RuntimeError):
    """The trainer exited with an error (bad data, bad config...). Retrying will not help."""


class TrainingCrashed(RuntimeError):
    """The trainer was killed by a signal (OOM killer, preemption). A retry resumes it."""


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop(p: subprocess.Popen) -> None:
    """Local rank: SIGTERM. Remote rank: close its lifeline (stdin); `_wait` SIGTERMs our end (ssh, the
    prefix) if it has not ended within STOP_GRACE_S."""
    if p.stdin is None:
        p.terminate()
        return
    try:
        p.stdin.close()
    except OSError:
        pass


def _wait(p: subprocess.Popen) -> int:
    if p.stdin is not None:  # remote: it stops itself once its stdin closed; else end our side of it
        try:
            return p.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            p.terminate()
    return p.wait()


def _watch(procs: list[subprocess.Popen], codes: list[int | None], stopped: set[int] | None = None) -> None:
    """Wait for every rank; when one fails, stop the others (they would block in an all-reduce).

    `stopped` gets the ranks it stopped (so their SIGTERM is not mistaken for a crash)."""
    stopped = set() if stopped is None else stopped
    while any(c is None for c in codes):
        for i, p in enumerate(procs):
            if codes[i] is None:
                codes[i] = p.poll()
        if any(c not in (None, 0) for c in codes):
            for i, p in enumerate(procs):
                if p.poll() is None:
                    stopped.add(i)
                    _stop(p)
            for i, p in enumerate(procs):
                codes[i] = _wait(p)
            return
        time.sleep(0.05)


def _signal_of(code: int, remote: bool) -> int:
    """A remote rank's script reports signal N as exit status 128+N: read it as -N, like a local child's."""
    return -(code - 128) if remote and 128 < code < 128 + 65 else code


# kind -> (module, job class, run function); imported by name in the child only, so launch
# imports none of them (they import nothing of launch either).
JOBS = {
    "train": ("mlxcore.train.loop", "TrainJob", "run"),
    "distill-student": ("mlxcore.distill.student", "StudentJob", "run"),
    "rl-update": ("mlxcore.rl.iteration", "UpdateJob", "run_job"),
    "preference": ("mlxcore.preference.train", "PreferenceJob", "run"),
    "reward-model": ("mlxcore.preference.train", "RewardJob", "run_reward"),
    "vlm": ("mlxcore.vlm.train", "VLMJob", "run"),
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
    train_cfg = getattr(job, "train", None)
    world = train_cfg.world_size if train_cfg is not None else 1
    if train_cfg is not None:
        commands = distributed.plan(job_path, world, train_cfg.distributed, out)
    else:
        commands = [distributed.RankCommand(0, [sys.executable, "-m", "mlxcore.train.launch", str(job_path)])]
    remote = commands[0].remote  # rank 0's events on its stdout, stdin the lifeline (see the module doc)
    read_fd, write_fd = (None, None) if remote else os.pipe()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    procs = []
    try:
        for cmd in commands:
            env = {**os.environ, **cmd.env, "PYTHONUNBUFFERED": "1"}
            if cmd.rank == 0 and not remote:
                env[EVENTS_FD] = str(write_fd)
            if cmd.remote:
                env[LIFELINE] = "stdin"  # for a prefix that keeps our environment (ip netns exec, sh)
            procs.append(subprocess.Popen(
                cmd.argv,
                env=env,
                pass_fds=(write_fd,) if cmd.rank == 0 and not remote else (),
                stdin=subprocess.PIPE if cmd.remote else None,
                stdout=subprocess.PIPE if cmd.remote and cmd.rank == 0 else (subprocess.DEVNULL if cmd.remote else None),
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=_die_with_parent,
            ))
    except BaseException:
        for p in procs:
            _stop(p)
            _wait(p)
        raise
    finally:
        if write_fd is not None:
            os.close(write_fd)

    def pump_stderr(proc, prefix: str) -> None:
        for line in proc.stderr:
            tail.append(prefix + line)
            sys.stderr.write(prefix + line)

    pumps = [threading.Thread(target=pump_stderr, args=(p, f"[rank {c.rank} {c.host}] " if remote else
                                                        f"[rank {r}] " if world > 1 else ""), daemon=True)
             for r, (p, c) in enumerate(zip(procs, commands))]
    codes: list[int | None] = [None] * len(procs)
    stopped: set[int] = set()
    watcher = threading.Thread(target=_watch, args=(procs, codes, stopped), daemon=True)
    for t in [*pumps, watcher]:
        t.start()
    result = error = None
    try:
        with (procs[0].stdout if remote else os.fdopen(read_fd)) as events:  # ends when rank 0 exits (or is stopped)
            for line in events:
                msg = replay(line, callback)
                if msg and msg["event"] == "result":  # the job's return value, sent once it is all done
                    result = {k: v for k, v in msg.items() if k != "event"}
                elif msg and msg["event"] == "error":
                    error = msg.get("message") or msg.get("kind")
        watcher.join()
    except BaseException:
        for p in procs:
            _stop(p)
        for p in procs:
            _wait(p)
        raise
    for p in procs:  # remote ranks: their lifeline watchers may outlive them until stdin closes
        if p.stdin is not None:
            _stop(p)
    for t in pumps:
        t.join(timeout=5)
    codes = [_signal_of(c, cmd.remote) for c, cmd in zip(codes, commands)]
    # a signal that ended a rank nobody here stopped: a crash (OOM killer, preemption), which a re-run resumes
    signals = [-c for i, c in enumerate(codes) if c < 0 and (i not in stopped or c != -signal.SIGTERM)]
    if signals:
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
    if os.environ.get(LIFELINE) == "stdin":  # before the job's (slow) imports: a stop may come any time
        _lifeline()
    module_name, job_cls, run_name = JOBS[kind]
    for name in NOT_IN_THE_TRAINER:  # before the job's imports (see NOT_IN_THE_TRAINER)
        sys.modules.setdefault(name, None)
    module = importlib.import_module(module_name)
    job = getattr(module, job_cls).model_validate_json(text)
    fd = os.environ.get(EVENTS_FD)
    if fd == "stdout":  # started through ssh / a prefix / mpirun: stdout carries rank 0's events, nothing else
        events = os.dup(1)
        os.dup2(2, 1)
        callback = JsonLinesCallback(events) if distributed.env_rank() == 0 else TrainingCallback()
        if distributed.env_rank() != 0:
            os.close(events)
    elif fd:
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


_LIFELINE_CODE = """
import os, signal, sys
parent = int(sys.argv[1])
while os.read(0, 65536):
    pass
if os.getppid() == parent:  # still ours (not a reused pid): stop it
    os.kill(parent, signal.SIGTERM)
"""


def _lifeline() -> None:
    """Stop this process (SIGTERM) when stdin closes: its launcher stopped the job, died, or lost the ssh link.

    A separate small process waits on stdin, so the stop comes even while this one is busy in C (an
    all-reduce waiting on a dead peer); our own stdin becomes /dev/null.
    """
    import atexit

    watcher = subprocess.Popen([sys.executable, "-c", _LIFELINE_CODE, str(os.getpid())], stdin=0,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    atexit.register(watcher.kill)


if __name__ == "__main__":
    sys.exit(main())
