"""Experiment trackers as training callbacks (`report_to: [mlflow, wandb, trackio, tensorboard]`).

One `TrackingSession` per flow run: one run in each tracker, the resolved config as its params,
each training stage's metrics by step under `<stage>/<metric>` (`pretrain/loss`, `sft/val_loss`),
and the run's files (loss curves, bench report, model card, report card) as artifacts at the end.

Delivery never holds training up: every tracker has a worker thread fed by a queue, so a callback
only enqueues. The worker sends what has queued up in one batch, retries a failed call
`tracking.retries` times (waiting `tracking.backoff_s`, doubled each time), then drops it and counts
what was lost. `TrackingSession.finish()` waits a bounded time for the queues to drain and returns,
per tracker, the counts of what was delivered and lost (the report card shows them).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from mlxcore.train.callbacks import TrainingCallback

log = logging.getLogger("mlxflow.tracking")

# Numbers of a `train` / `eval` event that are not metrics
NOT_METRICS = ("step",)


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A config dump as {dotted key: string}; lists and None are leaves (JSON), strings stay as they are."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out or ({prefix[:-1]: "{}"} if prefix else {})
    return {prefix[:-1]: value if isinstance(value, str) else json.dumps(value)}


def event_metrics(info: dict) -> dict[str, float]:
    """The finite numbers of a train / eval event (loss, lr, grad_norm, tok_per_s, val_loss, what the loss reports)."""
    return {k: float(v) for k, v in info.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


@dataclass
class Delivery:
    """What a tracker delivered and lost, by kind ("metric points", "params", "artifacts", "run")."""

    delivered: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    failures: int = 0  # failed calls, retries included
    errors: list[str] = field(default_factory=list)  # the first few messages

    def add(self, book: dict, kind: str, n: int) -> None:
        book[kind] = book.get(kind, 0) + n

    def summary(self, name: str) -> str:
        if not any(self.lost.values()):
            return f"{name}: all delivered ({', '.join(f'{n} {k}' for k, n in self.delivered.items()) or 'nothing to send'})"
        lost = ", ".join(f"{n} {k}" for k, n in self.lost.items() if n)
        return f"{name}: {lost} not delivered ({self.failures} failed calls; first error: {self.errors[0] if self.errors else '?'})"

    def as_dict(self) -> dict:
        return {"delivered": dict(self.delivered), "lost": dict(self.lost), "failures": self.failures,
                "errors": list(self.errors)}


class Tracker:
    """One tracker's run. Subclasses implement `_start`, `_metrics`, `_artifact`, `_finish` (they may raise:
    the worker retries and counts). Public methods only enqueue; the worker thread calls the backend."""

    name = "tracker"

    def __init__(self, settings, run_dir: str | Path, run_name: str, experiment: str, params: dict[str, str],
                 tags: dict[str, str] | None = None):
        self.settings, self.run_dir, self.run_name, self.experiment = settings, Path(run_dir), run_name, experiment
        self.params, self.tags = params, tags or {}
        self.delivery = Delivery()
        self.started = False
        self._queue: queue.Queue = queue.Queue()
        self._pending: collections.deque = collections.deque()  # taken from the queue, not yet handled
        self._worker = threading.Thread(target=self._work, name=f"tracker-{self.name}", daemon=True)
        self._worker.start()
        self._queue.put(("start", None))

    # -- the callers' side: never blocks, never raises
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            self._queue.put(("metrics", (metrics, int(step), time.time())))

    def log_artifact(self, path: str | Path, folder: str = "") -> None:
        self._queue.put(("artifact", (str(path), folder)))

    def finish(self, status: str = "FINISHED", timeout_s: float = 30.0) -> Delivery:
        """Deliver what is queued (at most `timeout_s`), end the run; what is still queued is lost."""
        self._queue.put(("finish", status))
        self._worker.join(timeout_s)
        if self._worker.is_alive():  # a backend hung past the deadline: count what never went out
            self._stop = True
            self._count_queued()
        return self.delivery

    # -- the worker's side
    _stop = False

    def _count_queued(self) -> None:
        while self._pending:
            self._lose(*self._pending.popleft())
        while True:
            try:
                kind, payload = self._queue.get_nowait()
            except queue.Empty:
                return
            self._lose(kind, payload)

    def _lose(self, kind: str, payload) -> None:
        d = self.delivery
        if kind == "metrics":
            d.add(d.lost, "metric points", len(payload[0]))
        elif kind == "artifact":
            d.add(d.lost, "artifacts", 1)
        elif kind == "start":
            d.add(d.lost, "params", len(self.params))

    def _call(self, what: str, fn: Callable[[], Any]) -> bool:
        """`fn()` with bounded retries and a doubling backoff; False once every try failed (logged)."""
        tries = 1 + int(getattr(self.settings, "retries", 2))
        wait = float(getattr(self.settings, "backoff_s", 0.5))
        for attempt in range(tries):
            if self._stop:
                return False
            try:
                fn()
                return True
            except Exception as exc:  # an outage, a refused value: training goes on
                self.delivery.failures += 1
                msg = f"{type(exc).__name__}: {str(exc)[:300]}"
                if len(self.delivery.errors) < 5:
                    self.delivery.errors.append(msg)
                if attempt + 1 < tries:
                    log.info("%s: %s failed (try %d of %d, next in %.1f s): %s", self.name, what, attempt + 1,
                             tries, wait * 2 ** attempt, msg)
                    time.sleep(wait * 2 ** attempt)
                else:
                    log.warning("%s: %s failed %d times, dropped: %s", self.name, what, tries, msg)
        return False

    def _next(self):
        """The next item in the order it was logged: the ones a metrics batch set aside come first."""
        return self._pending.popleft() if self._pending else self._queue.get()

    def _work(self) -> None:
        d = self.delivery
        while True:
            kind, payload = self._next()
            if self._stop:
                self._lose(kind, payload)
                continue
            if kind == "start":
                self.started = self._call("start", self._start)
                d.add(d.delivered if self.started else d.lost, "params", len(self.params))
            elif kind == "metrics":
                # everything that queued up meanwhile goes in one call; the artifacts and the finish
                # among it are set aside and taken next, in order, before anything logged later
                batch = [payload]
                while True:
                    try:
                        k, p = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if k == "metrics":
                        batch.append(p)
                    else:
                        self._pending.append((k, p))
                points = [(key, value, step, ts) for metrics, step, ts in batch for key, value in metrics.items()]
                ok = self.started and self._call(f"log {len(points)} metric points", lambda: self._metrics(points))
                d.add(d.delivered if ok else d.lost, "metric points", len(points))
            elif kind == "artifact":
                ok = self.started and self._call(f"artifact {payload[0]}", lambda: self._artifact(*payload))
                d.add(d.delivered if ok else d.lost, "artifacts", 1)
            elif kind == "finish":
                if self.started:
                    self._call("finish", lambda: self._finish(payload))
                self._count_queued()  # nothing is logged after the finish; were it, it is counted lost
                return

    # -- backends
    def _start(self) -> None:
        raise NotImplementedError

    def _metrics(self, points: list[tuple[str, float, int, float]]) -> None:
        raise NotImplementedError

    def _artifact(self, path: str, folder: str) -> None:
        raise NotImplementedError

    def _finish(self, status: str) -> None:
        pass


def _tracker_class(name: str):
    if name == "mlflow":
        from mlxcore.tracking.mlflow_tracker import MLflowTracker
        return MLflowTracker
    if name == "wandb":
        from mlxcore.tracking.wandb_tracker import WandbTracker
        return WandbTracker
    if name == "trackio":
        from mlxcore.tracking.trackio_tracker import TrackioTracker
        return TrackioTracker
    if name == "tensorboard":
        from mlxcore.tracking.tensorboard_tracker import TensorBoardTracker
        return TensorBoardTracker
    raise ValueError(f"report_to: unknown tracker {name!r} (one of mlflow, wandb, trackio, tensorboard)")


class StageCallback(TrainingCallback):
    """A training stage's events as `<stage>/<metric>` points for every tracker of a session."""

    def __init__(self, session: "TrackingSession", stage: str):
        self.session, self.stage = session, stage.replace(" ", "-")  # "preference dpo" -> preference-dpo/loss

    def _send(self, info: dict, prefix: str = "") -> None:
        metrics = {f"{self.stage}/{prefix}{k}": v for k, v in event_metrics(info).items()}
        for t in self.session.trackers:
            t.log_metrics(metrics, info.get("step", 0))

    def on_train(self, info: dict) -> None:
        self._send(info)

    def on_eval(self, info: dict) -> None:
        self._send(info)

    def on_end(self, info: dict) -> None:  # the FitResult's numbers: final_train_loss, final_val_loss, ...
        self._send(info, "final_")


class TrackingSession:
    """The trackers of one flow run (`report_to`), each with one run for the whole flow."""

    def __init__(self, report_to: list[str], settings, run_dir: str | Path, name: str, config: dict,
                 tags: dict[str, str] | None = None):
        self.run_dir = Path(run_dir)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.run_name = settings.run_name or f"{name}-{stamp}"
        self.experiment = settings.experiment or name
        self.params = flatten(config)
        self.trackers: list[Tracker] = []
        self.refused: dict[str, str] = {}  # tracker -> why it could not start (its library is not installed)
        for t in dict.fromkeys(report_to):
            try:
                cls = _tracker_class(t)
                self.trackers.append(cls(settings, self.run_dir, self.run_name, self.experiment, self.params, tags))
            except ImportError as exc:
                self.refused[t] = f"not installed ({exc}); pip install 'mlxflow[tracking]'"
                log.warning("report_to %s: %s", t, self.refused[t])
            except Exception as exc:  # a malformed URI, say: reported, training goes on
                self.refused[t] = f"could not start: {type(exc).__name__}: {exc}"
                log.warning("report_to %s: %s", t, self.refused[t])

    def callback(self, stage: str) -> TrainingCallback:
        return StageCallback(self, stage)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, folder: str = "") -> None:
        if Path(path).exists():
            for t in self.trackers:
                t.log_artifact(path, folder)

    def finish(self, status: str = "FINISHED", timeout_s: float = 60.0) -> dict:
        """{tracker: {"delivered", "lost", "failures", "errors", "summary"}}; also the ones that could not start."""
        out = {}
        deadline = time.monotonic() + timeout_s
        for t in self.trackers:
            d = t.finish(status, max(deadline - time.monotonic(), 1.0))
            out[t.name] = d.as_dict() | {"summary": d.summary(t.name), "run": getattr(t, "run_ref", None)}
        for t, why in self.refused.items():
            out[t] = {"delivered": {}, "lost": {}, "failures": 0, "errors": [why], "summary": f"{t}: {why}", "run": None}
        return out
