"""How progress and metrics leave `fit()`: a small callback protocol plus three implementations.

`fit()` calls `callback.on_event(event, info)` with these events (info is a flat JSON-able dict):
  begin       total_steps, start_step, params, resumed_from
  train       step, loss, lr, grad_norm, tokens, tok_per_s, elapsed_s (+ what the loss reports,
              token means: GRPO's kl and clip_fraction; a mixture of experts' router_aux_loss,
              router_entropy, expert_usage_<e|max|min|cv>: mlxcore.models.moe)
  eval        step, val_loss, val_ppl
  checkpoint  step, path
  end         the FitResult fields
  wait        rows, waiting_for, why (a batch source waiting for data, e.g. distillation's rows)
A job run by `mlxcore.train.launch` adds `result` (the job's return value, once all of it is done) or
`error` (message, kind).
The orchestrator's implementation (Prefect artifacts) lives outside this package.
"""

from __future__ import annotations

import json
import os
import sys


class TrainingCallback:
    """Base class: override `on_event`, or the per-event `on_<event>` methods."""

    def on_event(self, event: str, info: dict) -> None:
        handler = getattr(self, f"on_{event}", None)
        if handler is not None:
            handler(info)


class CallbackList(TrainingCallback):
    def __init__(self, *callbacks: TrainingCallback | None):
        self.callbacks = [c for c in callbacks if c is not None]

    def on_event(self, event: str, info: dict) -> None:
        for c in self.callbacks:
            c.on_event(event, info)


class JsonLinesCallback(TrainingCallback):
    """Writes `{"event": ..., **info}` lines to a file descriptor (a pipe to the parent)."""

    def __init__(self, fd: int):
        self.stream = os.fdopen(fd, "w", buffering=1)

    def on_event(self, event: str, info: dict) -> None:
        try:
            self.stream.write(json.dumps({"event": event, **info}) + "\n")
        except BrokenPipeError:  # the parent went away; training (and checkpoints) go on
            pass


def replay(line: str, callback: TrainingCallback) -> dict | None:
    """Feed one line written by JsonLinesCallback to `callback`; returns the parsed event."""
    try:
        msg = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(msg, dict) or "event" not in msg:
        return None
    event = msg.pop("event")
    callback.on_event(event, msg)
    return {"event": event, **msg}


class ProgressBar(TrainingCallback):
    """A terminal progress bar (tqdm) with the latest loss and throughput."""

    def __init__(self, desc: str = "train", file=None):
        self.desc, self.file, self.bar, self.postfix = desc, file or sys.stderr, None, {}

    def on_begin(self, info: dict) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=info["total_steps"], initial=info["start_step"], desc=self.desc, file=self.file, dynamic_ncols=True)

    def on_train(self, info: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(info["step"] - self.bar.n)
        self.postfix.update(loss=f"{info['loss']:.3f}", tok_s=f"{info['tok_per_s']:.0f}")
        self.bar.set_postfix(self.postfix, refresh=True)

    def on_wait(self, info: dict) -> None:
        if self.bar is None:  # the cold start: before the bar exists
            print(f"{self.desc}: waiting for rows ({info['rows']}/{info['waiting_for']}, {info['why']})",
                  file=self.file, flush=True)
        else:
            self.postfix["rows"] = f"{info['rows']}/{info['waiting_for']}"
            self.bar.set_postfix(self.postfix, refresh=True)

    def on_eval(self, info: dict) -> None:
        self.postfix["val"] = f"{info['val_loss']:.3f}"
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=True)

    def on_end(self, info: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_error = on_end  # the bar ends before the error's line, which then stands last
