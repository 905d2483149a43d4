"""The training half of distillation: SFT on a rows file that another process is still writing.

`GrowingRows` turns the rows store (`mlxcore/data/rows.py`) into the batch source `train.fit()` takes. Rows
are used in file order, which never changes (the store only appends), so a row's position is
its identity:

  held out  The first `val_rows` rows are the held-out set, never trained on; `val()` gives
            their batches (the eval set is fixed from the first evaluation on).
  cold start Training starts once `val_rows + cold_start_rows` rows exist.
  fresh     Each batch first takes rows never trained on yet, in file order, then fills up
  + replay  with replayed rows: passes over the rows already trained on, each pass a new
            permutation of (seed, pass). Every row is trained on as soon as possible and old
            rows keep coming back at an even rate.
  pace      While generation runs, step s waits until the train rows number at least
            s * batch_size / epochs, so the student never makes more than `epochs` passes over
            what it has. When generation is done it trains its remaining steps at once.

The cursor saved in checkpoints is {"batch", "fresh", "pass", "pos", "size"}: with the file's
fixed order it is all a resumed run needs. `fit()`'s step count is planned by the caller (see
`planned_steps`), so the learning-rate schedule is right from the start.

How the trainer learns about the generator: the generator's state file (`state.json` beside the
rows: running / done / failed, stamped with a run token both sides share) and the rows dir's
manifest (written when generation finished). A failed generator stops the trainer at once; a
generator that falls silent for `stall_timeout_s` does too. Either way every checkpoint stays,
and running both again resumes both.

    python -m mlxcore.distill.student JOB.json   # events go to $MLXFLOW_EVENTS_FD

This module is part of mlxcore: it must not import prefect.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Literal

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from mlxcore.train.callbacks import TrainingCallback
from mlxcore.config import ModelConfig, StreamConfig, TrainConfig
from mlxcore.data.loader import collate_sft
from mlxcore.data.pretokenize import chat_segments
from mlxcore.io import is_complete, read_manifest, write_json
from mlxcore.data.rows import read_new

ROWS_FILE, STATE_FILE = "rows.jsonl", "state.json"


class GenerationFailed(RuntimeError):
    """The generator stopped without reaching its target (or went silent): training stops too."""


def planned_steps(target_rows: int, stream: StreamConfig, train: TrainConfig) -> int:
    """Optimizer steps for `epochs` passes over the target's train rows, at most train.steps."""
    rows = max(target_rows - stream.val_rows, 1)
    return max(1, min(train.steps, math.ceil(stream.epochs * rows / (train.batch_size * train.grad_accum))))


# ------------------------------------------------------------------------ generator state


def mark_generation(rows_dir: str | Path, token: str, state: str, **info) -> None:
    """Record the generator's state ("running", "done", "failed") for the trainer to read."""
    write_json(Path(rows_dir) / STATE_FILE, {"token": token, "state": state, "time": time.time(), **info})


def generation_state(rows_dir: str | Path, token: str) -> tuple[str, str | None]:
    """("done" | "failed" | "running", error): done once the rows dir is complete; "failed" only
    when the generator of this run (same token) said so."""
    rows_dir = Path(rows_dir)
    if is_complete(rows_dir):
        return "done", None
    try:
        state = json.loads((rows_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return "running", None
    if state.get("token") == token and state.get("state") in ("done", "failed"):
        return state["state"], state.get("error")
    return "running", None


# ----------------------------------------------------------------------------- row encoding


class RowEncoder:
    """Chat rows -> (token ids, assistant-token mask), through the tokenizer's chat template."""

    def __init__(self, tokenizer_dir: str | Path):
        from mlxcore.data import tokenizer as tokenizers

        self.hf = tokenizers.load(tokenizer_dir)
        self.backend = self.hf.backend_tokenizer

    def __call__(self, rows: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
        segs = [chat_segments(self.hf, row["conversations"]) for row in rows]
        flat = self.backend.encode_batch([text for s in segs for text, _ in s], add_special_tokens=False)
        out, pos = [], 0
        for s in segs:
            ids, mask = [], []
            for (_, train), enc in zip(s, flat[pos: pos + len(s)]):
                ids += enc.ids
                mask += [int(train)] * len(enc.ids)
            pos += len(s)
            out.append((np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)))
        return out


# ----------------------------------------------------------------------------- the batches


class GrowingRows:
    """`fit()`'s train batch source over a growing rows file (see the module docstring)."""

    def __init__(self, rows_path: str | Path, encode: Callable[[list[dict]], list], *, batch_size: int,
                 seq_len: int, stream: StreamConfig, state: Callable[[], tuple[str, str | None]],
                 seed: int = 0, pad_id: int = 0, pad_multiple: int = 32, on_wait: Callable[[dict], None] | None = None):
        self.path, self.encode, self.batch_size, self.seq_len = Path(rows_path), encode, batch_size, seq_len
        self.stream, self.state, self.seed, self.pad_id, self.pad_multiple = stream, state, seed, pad_id, pad_multiple
        self.on_wait = on_wait
        self.docs: list[tuple[np.ndarray, np.ndarray]] = []
        self.offset, self.last_row_at, self.waited_s, self.done = 0, time.monotonic(), 0.0, False
        self._last_wait_report = 0.0

    # -- reading the file
    def refresh(self) -> int:
        """Encode the rows appended since the last call; how many there were."""
        if not self.path.exists():
            return 0
        rows, self.offset = read_new(self.path, self.offset)
        if rows:
            self.docs += self.encode(rows)
            self.last_row_at = time.monotonic()
        return len(rows)

    @property
    def num_train(self) -> int:
        return max(0, len(self.docs) - self.stream.val_rows)

    def _wait(self, train_rows: int, why: str) -> None:
        """Block until `train_rows` train rows (and the held-out rows) exist, or generation ended."""
        started = time.monotonic()
        while True:
            self.refresh()
            if self.num_train >= train_rows:
                break
            state, error = self.state()
            if state == "done":
                self.refresh()  # the last rows landed before the manifest
                self.done = True
                break
            if state == "failed":
                raise GenerationFailed(f"generation failed ({error}); training stopped with {self.num_train} "
                                       "train rows; its checkpoints are kept and a re-run resumes")
            silent = time.monotonic() - self.last_row_at
            if silent > self.stream.stall_timeout_s:
                raise GenerationFailed(f"{self.path}: no new row for {silent:.0f} s (stall_timeout_s) while "
                                       f"waiting for {train_rows} train rows ({why})")
            if self.on_wait is not None and time.monotonic() - self._last_wait_report >= 5.0:
                self._last_wait_report = time.monotonic()
                self.on_wait({"rows": len(self.docs), "waiting_for": train_rows + self.stream.val_rows, "why": why})
            time.sleep(self.stream.poll_s)
        self.waited_s += time.monotonic() - started
        if self.num_train == 0 or len(self.docs) < self.stream.val_rows + 1:
            raise GenerationFailed(f"{self.path}: generation ended with {len(self.docs)} rows; training needs more "
                                   f"than val_rows={self.stream.val_rows}")

    def cold_start(self) -> None:
        if not self.done:
            self._wait(self.stream.cold_start_rows, "cold start")

    def val(self) -> "HeldOut":
        return HeldOut(self)

    # -- fit()'s interface
    def next(self, cursor: dict | None = None):
        c = {"batch": 0, "fresh": 0, "pass": -1, "pos": 0, "size": 0, **(cursor or {})}
        if "epoch" in c:  # fit()'s default cursor for shard datasets
            c = {"batch": 0, "fresh": 0, "pass": -1, "pos": 0, "size": 0}
        batch_no, B = c["batch"] + 1, self.batch_size
        if not self.done:
            need = self.stream.cold_start_rows if c["batch"] == 0 else math.ceil(batch_no * B / self.stream.epochs)
            self._wait(max(need, 1), f"pace: batch {batch_no}")
        elif self.num_train < c["fresh"]:
            self.refresh()
        fresh_end = min(c["fresh"] + B, self.num_train)
        items = list(range(c["fresh"], fresh_end))
        seen = c["fresh"]  # rows trained on before this batch: what replay draws from
        while len(items) < B and seen > 0:
            if c["pos"] >= c["size"]:  # next pass, over every row seen so far
                c["pass"], c["pos"], c["size"] = c["pass"] + 1, 0, seen
            perm = np.random.default_rng([self.seed, c["pass"]]).permutation(c["size"])
            take = perm[c["pos"]: c["pos"] + B - len(items)]
            items += take.tolist()
            c["pos"] += len(take)
        c["fresh"], c["batch"] = fresh_end, batch_no
        v = self.stream.val_rows
        batch = collate_sft([self.docs[v + i] for i in items], self.seq_len, self.pad_multiple, self.pad_id)
        return batch, c

    def stats(self) -> dict:
        return {"rows": len(self.docs), "train_rows": self.num_train, "waited_s": self.waited_s}


class HeldOut:
    """The first `val_rows` rows as evaluation batches (waits for the cold start)."""

    def __init__(self, rows: GrowingRows):
        self.rows = rows

    def take(self, n: int) -> list:
        self.rows.cold_start()
        r = self.rows
        docs = r.docs[: r.stream.val_rows]
        bs = min(r.batch_size, len(docs))
        return [collate_sft(docs[i: i + bs], r.seq_len, r.pad_multiple, r.pad_id)
                for i in range(0, len(docs) - bs + 1, bs)][:n]


# ------------------------------------------------------------------------ the training job


class StudentJob(BaseModel):
    """What the student's training process needs; written as JSON for it."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["distill-student"] = "distill-student"  # mlxcore.train.launch runs it with `run`
    rows_dir: str
    token: str  # the run token the generator stamps its state with
    tokenizer_dir: str
    out_dir: str
    train: TrainConfig
    stream: StreamConfig = StreamConfig()
    model: ModelConfig | None = None
    init_from: str | None = None
    lineage: dict | None = None  # where the rows come from (the teacher: mlxcore.lineage.teacher_source)

    @model_validator(mode="after")
    def _one_process(self) -> "StudentJob":
        if self.train.world_size != 1:
            raise ValueError("distillation trains on one process (train.world_size: 1)")
        return self


def run(job: StudentJob, callback: TrainingCallback | None = None) -> dict:
    """Build the student (fresh or from init_from) and `fit()` it on the growing rows."""
    from mlxcore.train.loop import build_model, fit, job_lineage

    tok = read_manifest(job.tokenizer_dir, "tokenizer")
    model, config, adapter_config = build_model(job, tok["vocab_size"], tok["special_ids"])
    cb = callback or TrainingCallback()
    rows = GrowingRows(Path(job.rows_dir) / ROWS_FILE, RowEncoder(job.tokenizer_dir), batch_size=job.train.batch_size,
                       seq_len=job.train.seq_len, stream=job.stream, state=lambda: generation_state(job.rows_dir, job.token),
                       seed=job.train.seed, pad_id=tok["special_ids"]["pad"] or 0, pad_multiple=job.train.pad_multiple,
                       on_wait=lambda info: cb.on_event("wait", info))
    return fit(model, config, job.train, rows, rows.val(), job.out_dir, tokenizer_dir=job.tokenizer_dir,
               callback=cb, adapter_config=adapter_config, lineage=job_lineage(None, job.init_from, job.lineage))


EXPECTED_ERRORS = (GenerationFailed,)  # mlxcore.train.launch reports these in one line, like bad data
