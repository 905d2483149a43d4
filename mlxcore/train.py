"""Training: one readable `fit()`, the `run()` that sets it up, and a subprocess entry point.

`fit()` is AdamW with linear warmup then cosine decay to a floor, gradient accumulation,
global-norm clipping and a compiled step. The loss is the mean cross-entropy over the tokens
whose mask is 1 (all targets when pretraining, assistant tokens in SFT), summed over the
micro-batches of a step before dividing, so every token weighs the same however the padding
falls. Every `save_every` steps it writes a checkpoint atomically and keeps the last
`keep_last`; started again on the same `out_dir` it resumes from the latest one: weights,
optimizer moments and step, data cursor and RNG, so the resumed run is the uninterrupted run.

    python -m mlxcore.train JOB.json     # runs `run(TrainJob)`; events go to $MLXFLOW_EVENTS_FD
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map
from pydantic import BaseModel, ConfigDict

from mlxcore import checkpoint as ckpt
from mlxcore.callbacks import JsonLinesCallback, ProgressBar, TrainingCallback
from mlxcore.config import ModelConfig, TrainConfig
from mlxcore.data.loader import open_batches
from mlxcore.io import clean_stale_tmp, is_complete, read_manifest, sha256_file
from mlxcore.model import from_config, hf_config, num_params


class TrainJob(BaseModel):
    """Everything one training stage needs; written as JSON for the training subprocess."""

    model_config = ConfigDict(extra="forbid")
    data_dir: str
    tokenizer_dir: str
    out_dir: str
    train: TrainConfig
    model: ModelConfig | None = None  # required unless init_from is set
    init_from: str | None = None  # a checkpoint dir: weights only, e.g. SFT from pretrain


def lr_schedule(cfg: TrainConfig):
    floor = cfg.lr * cfg.min_lr_ratio
    decay = optim.cosine_decay(cfg.lr, max(1, cfg.steps - cfg.warmup_steps), floor)
    if cfg.warmup_steps == 0:
        return decay
    # step s < warmup trains at lr * (s + 1) / warmup: the last warmup step reaches lr
    warmup = optim.linear_schedule(cfg.lr / cfg.warmup_steps, cfg.lr, max(cfg.warmup_steps - 1, 1))
    return optim.join_schedules([warmup, decay], [cfg.warmup_steps])


def masked_loss(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array):
    """(sum of token losses where mask == 1, number of such tokens)."""
    logits = model(inputs).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets, reduction="none")
    return (losses * mask).sum(), mask.sum()


def mean_loss(model: nn.Module, batches) -> float:
    """Token-weighted mean loss over `batches` (a list of (inputs, targets, mask))."""
    total, count = mx.array(0.0), mx.array(0.0)
    for x, y, m in batches:
        loss, n = masked_loss(model, mx.array(x), mx.array(y), mx.array(m))
        total, count = total + loss, count + n
        mx.eval(total, count)  # one batch's logits alive at a time
    return total.item() / max(count.item(), 1.0)


def make_step(model: nn.Module, optimizer: optim.Optimizer, grad_clip: float = 0.0, compile: bool = True):
    """A compiled optimizer step over one or more micro-batches, and the state it updates.

    `step(micro_batches) -> (loss_sum, n_tokens, grad_norm)`: gradients of the summed masked
    loss are added over the micro-batches, divided by the total token count, clipped to
    `grad_clip` (0: no clipping), then applied.
    """
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    state = [model.state, optimizer.state]

    def grads_fn(x, y, m):
        (loss, n), grads = loss_and_grad(model, x, y, m)
        return loss, n, grads

    def apply_fn(grads, n):
        grads = tree_map(lambda g: g / mx.maximum(n, 1), grads)
        grads, norm = optim.clip_grad_norm(grads, grad_clip if grad_clip > 0 else float("inf"))
        optimizer.update(model, grads)
        return norm

    def full_step(x, y, m):
        loss, n, grads = grads_fn(x, y, m)
        return loss, n, apply_fn(grads, n)

    if compile:  # nn.value_and_grad writes the traced params into the model: state is an output too
        grads_fn = mx.compile(grads_fn, inputs=state, outputs=state)
        apply_fn = mx.compile(apply_fn, inputs=state, outputs=state)
        full_step = mx.compile(full_step, inputs=state, outputs=state)

    def step(micro_batches):
        arrays = [tuple(map(mx.array, b)) for b in micro_batches]
        if len(arrays) == 1:
            return full_step(*arrays[0])
        loss, n, acc = mx.array(0.0), mx.array(0.0), None
        for x, y, m in arrays:
            l_, n_, g_ = grads_fn(x, y, m)
            loss, n = loss + l_, n + n_
            acc = g_ if acc is None else tree_map(mx.add, acc, g_)
        return loss, n, apply_fn(acc, n)

    return step, state


def _trainer_state(step, cursor, tokens, elapsed, initial_val, history, cfg) -> dict:
    return {
        "step": step,
        "cursor": cursor,
        "rng": mx.random.state[0].tolist(),
        "tokens": tokens,
        "elapsed_s": elapsed,
        "initial_val_loss": initial_val,
        "history": history,
        "train_config": cfg.model_dump(),
    }


def fit(
    model: nn.Module,
    config: dict,
    cfg: TrainConfig,
    train_batches,
    val_batches,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    callback: TrainingCallback | None = None,
) -> dict:
    out = Path(out_dir)
    final_dir, ckpt_root = out / "model", out / "checkpoints"
    cb = callback or TrainingCallback()
    if is_complete(final_dir):  # finished earlier: nothing to redo
        state = json.loads((final_dir / ckpt.TRAINER_STATE).read_text())
        return _result(final_dir, state, num_params(model), resumed_from=str(final_dir))
    clean_stale_tmp(ckpt_root)
    clean_stale_tmp(out)

    optimizer = optim.AdamW(lr_schedule(cfg), betas=[cfg.beta1, cfg.beta2], weight_decay=cfg.weight_decay)
    optimizer.init(model.trainable_parameters())
    step, cursor, tokens, elapsed, history, initial_val = 0, {"epoch": 0, "index": 0}, 0, 0.0, [], None
    resumed = ckpt.latest(ckpt_root)
    if resumed is not None:
        s = ckpt.restore(resumed, model, optimizer)
        step, cursor, tokens, elapsed = s["step"], s["cursor"], s["tokens"], s["elapsed_s"]
        history, initial_val = s["history"], s["initial_val_loss"]
        hi, lo = s["rng"]  # mx.random.key(seed) is the seed's two 32-bit halves
        mx.random.seed((hi << 32) | lo)
    else:
        mx.random.seed(cfg.seed)
    eval_set = val_batches.take(cfg.eval_batches) if val_batches is not None else []
    cb.on_event("begin", {"total_steps": cfg.steps, "start_step": step, "params": num_params(model),
                          "resumed_from": str(resumed) if resumed else None})

    def run_eval(at: int) -> float | None:
        if not eval_set:
            return None
        val = mean_loss(model, eval_set)
        info = {"step": at, "val_loss": val, "val_ppl": math.exp(min(val, 50))}
        history.append({"event": "eval", **info})
        cb.on_event("eval", info)
        return val

    if step == 0:
        initial_val = run_eval(0)

    step_fn, state = make_step(model, optimizer, cfg.grad_clip, cfg.compile)

    def save(at: int) -> Path:
        st = _trainer_state(at, cursor, tokens, elapsed, initial_val, history, cfg)
        path = ckpt.save(ckpt.step_dir(ckpt_root, at), model, config, st, optimizer, tokenizer_dir)
        ckpt.prune(ckpt_root, cfg.keep_last)
        cb.on_event("checkpoint", {"step": at, "path": str(path)})
        return path

    window_t, window_tokens, train_loss = time.perf_counter(), 0, float("nan")
    while step < cfg.steps:
        t0 = time.perf_counter()
        micro = []
        for _ in range(cfg.grad_accum):
            batch, cursor = train_batches.next(cursor)
            micro.append(batch)
        loss, n, norm = step_fn(micro)
        mx.eval(state, loss, n, norm)
        step_tokens = sum(x.size for x, _, _ in micro)
        step += 1
        tokens += step_tokens
        window_tokens += step_tokens
        elapsed += time.perf_counter() - t0
        train_loss = loss.item() / max(n.item(), 1.0)
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            info = {"step": step, "loss": train_loss, "lr": optimizer.learning_rate.item(),
                    "grad_norm": norm.item(), "tokens": tokens, "elapsed_s": elapsed,
                    "tok_per_s": window_tokens / max(now - window_t, 1e-9)}
            history.append({"event": "train", **info})
            cb.on_event("train", info)
            window_t, window_tokens = now, 0
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            run_eval(step)
            window_t = time.perf_counter()  # throughput counts training time only
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save(step)
            window_t = time.perf_counter()

    val = run_eval(step)
    if math.isnan(train_loss):  # resumed from the last step's checkpoint: nothing left to train
        train_loss = next((h["loss"] for h in reversed(history) if h["event"] == "train"), None)
    ckpt.finalize(save(step), final_dir, {"final_val_loss": val, "final_train_loss": train_loss})
    state = json.loads((final_dir / ckpt.TRAINER_STATE).read_text())
    result = _result(final_dir, state, num_params(model), resumed_from=str(resumed) if resumed else None)
    cb.on_event("end", result)
    return result


def _result(final_dir: Path, state: dict, params: int, resumed_from: str | None) -> dict:
    return {
        "checkpoint": str(final_dir),
        "step": state["step"],
        "params": params,
        "train_loss": state.get("final_train_loss"),
        "val_loss": state.get("final_val_loss"),
        "initial_val_loss": state.get("initial_val_loss"),
        "tokens": state["tokens"],
        "elapsed_s": state["elapsed_s"],
        "tok_per_s": state["tokens"] / max(state["elapsed_s"], 1e-9),
        "resumed_from": resumed_from,
    }


def _check_same_tokenizer(init_from: Path, tokenizer_dir: Path) -> None:
    a, b = init_from / "tokenizer.json", tokenizer_dir / "tokenizer.json"
    if a.is_file() and b.is_file() and sha256_file(a) != sha256_file(b):
        raise ValueError(f"init_from {init_from}: its tokenizer differs from {tokenizer_dir}")


def run(job: TrainJob, callback: TrainingCallback | None = None) -> dict:
    """Build the model (fresh or `init_from`) and the batch streams, then `fit()`."""
    tok_dir, cfg = Path(job.tokenizer_dir), job.train
    tok = read_manifest(tok_dir, "tokenizer")
    data = read_manifest(job.data_dir, "tokens")
    if data["vocab_size"] != tok["vocab_size"]:
        raise ValueError(f"{job.data_dir} was tokenized with {data['vocab_size']} tokens, the tokenizer has {tok['vocab_size']}")
    if job.init_from:
        src = Path(job.init_from)
        read_manifest(src, "checkpoint")
        _check_same_tokenizer(src, tok_dir)
        config = json.loads((src / "config.json").read_text())
        model = from_config(config, seed=cfg.seed)
        ckpt.load_weights_only(src, model)
    elif job.model is not None:
        config = hf_config(job.model, tok["vocab_size"], tok["special_ids"])
        model = from_config(config, seed=cfg.seed)
    else:
        raise ValueError("a training job needs `model` or `init_from`")
    pad = tok["special_ids"]["pad"] or 0
    train = open_batches(job.data_dir, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed, pad_id=pad)
    val = open_batches(job.data_dir, "val", cfg.batch_size, cfg.seq_len, shuffle=False, pad_id=pad)
    return fit(model, config, cfg, train, val, job.out_dir, tokenizer_dir=tok_dir, callback=callback)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mlxcore.train JOB.json", file=sys.stderr)
        return 2
    job = TrainJob.model_validate_json(Path(argv[0]).read_text())
    fd = os.environ.get("MLXFLOW_EVENTS_FD")
    callback = JsonLinesCallback(int(fd)) if fd else ProgressBar(Path(job.out_dir).name)
    try:
        run(job, callback)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"mlxcore.train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
