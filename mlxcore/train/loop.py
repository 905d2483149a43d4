"""Training: one readable `fit()` (the only training loop) and the `run()` that sets up pretrain / SFT.

`fit()` trains a model's trainable parameters (all of them, or adapters: `adapters.py`) with the
configured optimizer (`optimizers.py`: warmup then cosine decay to a floor), gradient
accumulation, global-norm clipping and one compiled step (`step.py`); data parallel across
`mx.distributed` ranks when launched that way (`distributed.py`). The loss (`losses.py`: dense,
chunked or sparse) is the mean cross-entropy over the tokens
whose mask is 1 (all targets when pretraining, assistant tokens in SFT), summed over the
micro-batches of a step before dividing, so every token weighs the same however the padding
falls. Every `save_every` steps it writes a checkpoint atomically and keeps the last
`keep_last`; started again on the same `out_dir` it resumes from the latest one: weights,
optimizer moments and step, data cursor and RNG, so the resumed run is the uninterrupted run.

    python -m mlxcore.train.launch JOB.json    # runs `run(TrainJob)`; events go to $MLXFLOW_EVENTS_FD
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Literal

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from pydantic import BaseModel, ConfigDict

from mlxcore import lineage as lineages
from mlxcore.models import adapters
from mlxcore.train import distributed, losses, optimizers
from mlxcore.models import checkpoint as ckpt, remat
from mlxcore.train.callbacks import TrainingCallback
from mlxcore.config import ModelConfig, TrainConfig
from mlxcore.data.loader import open_batches
from mlxcore.data.packing import open_packed
from mlxcore.kernels.patch import use_segments
from mlxcore.train.losses import Loss
from mlxcore.io import clean_stale_tmp, dir_digest, is_complete, read_manifest, sha256_file
from mlxcore.models.model import from_config, hf_config, num_params
from mlxcore.models.model import load as load_model
from mlxcore.train.step import make_step, mean_loss


class TrainJob(BaseModel):
    """Everything one training stage needs; written as JSON for the training subprocess."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["train"] = "train"  # mlxcore.train.launch runs it with `run`
    data_dir: str
    tokenizer_dir: str
    out_dir: str
    train: TrainConfig
    model: ModelConfig | None = None  # required unless init_from is set
    init_from: str | None = None  # our checkpoint or any local HF / mlx-lm model dir: the starting weights


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
    optimizer: optim.Optimizer | None = None,
    loss: Loss | None = None,
    tokenizer_dir: str | Path | None = None,
    callback: TrainingCallback | None = None,
    adapter_config: dict | None = None,
    group=None,
    lineage: dict | None = None,
) -> dict:
    """Train `model` (its trainable parameters) for `cfg.steps` optimizer steps; resume if possible.

    The objective is `loss` (default: the token cross-entropy `cfg` asks for; GRPO, DPO... are
    other `Loss`es: `prepare(batch)` on the host, then `(loss_sum, n[, sums to report])`), the
    update is `optimizer` (default: `optimizers.build(cfg)`, warmup + cosine; a given one may
    carry state, which is kept), and the batches come from `train_batches.next(cursor)`. Every
    objective gets the same schedule, clipping, accumulation, checkpoints and exact resume.
    With a data-parallel `group` every rank runs this with its own slice of each batch; only
    rank 0 reports and writes checkpoints. `lineage` (`job_lineage`: the data's sources and licenses,
    the base model) goes into the final model's manifest and model card.
    """
    out = Path(out_dir)
    final_dir, ckpt_root = out / "model", out / "checkpoints"
    rank, world = (group.rank(), group.size()) if group is not None else (0, 1)
    main_rank = rank == 0
    cb = (callback or TrainingCallback()) if main_rank else TrainingCallback()
    trainable = adapters.num_trainable(model)
    if main_rank:
        clean_stale_tmp(out, recursive=True)
    if (done := finished(out)) is not None:  # finished earlier: nothing to redo, but say so
        cb.on_event("end", done)
        return done

    optimizer = optimizer if optimizer is not None else optimizers.build(cfg)
    optimizer.init(model.trainable_parameters())  # keeps any state it was given (moments carried over)
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
    remat.checkpoint_layers(model, cfg.grad_checkpoint)
    loss = loss if loss is not None else losses.from_config(cfg)
    eval_set = val_batches.take(cfg.eval_batches) if val_batches is not None else []
    cb.on_event("begin", {"total_steps": cfg.steps, "start_step": step, "params": num_params(model),
                          "trainable_params": trainable, "world_size": world,
                          "resumed_from": str(resumed) if resumed else None})

    def run_eval(at: int) -> float | None:
        if not eval_set:
            return None
        val = mean_loss(model, eval_set, loss, group)
        info = {"step": at, "val_loss": val, "val_ppl": math.exp(min(val, 50))}
        history.append({"event": "eval", **info})
        cb.on_event("eval", info)
        return val

    if step == 0:
        initial_val = run_eval(0)

    step_fn, state = make_step(model, optimizer, cfg.grad_clip, cfg.compile, loss, group, cfg.profile_timing,
                               router_aux_loss_coef=config.get("router_aux_loss_coef", 0.0),  # MoE (config.json)
                               fused=cfg.fused_optimizer)

    def save(at: int) -> Path:
        path = ckpt.step_dir(ckpt_root, at)
        if main_rank:
            st = _trainer_state(at, cursor, tokens, elapsed, initial_val, history, cfg)
            ckpt.save(path, model, config, st, optimizer, tokenizer_dir, adapter_config)
            ckpt.prune(ckpt_root, cfg.keep_last)
            cb.on_event("checkpoint", {"step": at, "path": str(path)})
        return path

    window_t, window_tokens, train_loss = time.perf_counter(), 0, float("nan")
    phases: dict[str, float] = {}
    reported: dict[str, float] = {}  # the loss's own sums over the log window, and their token count
    while step < cfg.steps:
        t0 = time.perf_counter()
        micro = []
        for _ in range(cfg.grad_accum):
            batch, cursor = train_batches.next(cursor)
            micro.append(batch)
        t_data = time.perf_counter() - t0
        loss_sum, n, norm = step_fn(micro)
        mx.eval(state, loss_sum, n, norm, step_fn.aux)
        if step_fn.aux:
            for k, v in {**step_fn.aux, "_n": n}.items():
                reported[k] = reported.get(k, 0.0) + v.item()
        step_tokens = sum(map(loss.tokens, micro)) * world  # padded positions, all ranks
        step += 1
        tokens += step_tokens
        window_tokens += step_tokens
        elapsed += time.perf_counter() - t0
        train_loss = loss_sum.item() / max(n.item(), 1.0)
        if cfg.profile_timing:
            for k, v in {"data": 1e3 * t_data, **step_fn.timings}.items():
                phases[k] = phases.get(k, 0.0) + v
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            info = {"step": step, "loss": train_loss, "lr": optimizers.current_lr(optimizer),
                    "grad_norm": norm.item(), "tokens": tokens, "elapsed_s": elapsed,
                    "tok_per_s": window_tokens / max(now - window_t, 1e-9)}
            if hasattr(train_batches, "stats"):  # e.g. rows so far when training on a growing file
                info.update(train_batches.stats())
            if reported:  # token means of what the loss reports (GRPO: kl, clip_fraction)
                count = max(reported.pop("_n"), 1.0)
                info.update({k: v / count for k, v in reported.items()})
                reported = {}
            if phases:
                steps_in_window = step - next((h["step"] for h in reversed(history) if h["event"] == "train"), step - cfg.log_every)
                info.update({f"ms_{k}": v / max(steps_in_window, 1) for k, v in phases.items()})
                phases = {}
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
    last = save(step)
    if not main_rank:
        state = _trainer_state(step, cursor, tokens, elapsed, initial_val, history, cfg)
        return _result(final_dir, state | {"final_val_loss": val, "final_train_loss": train_loss},
                       num_params(model), trainable, resumed_from=str(resumed) if resumed else None)
    ckpt.finalize(last, final_dir, {"final_val_loss": val, "final_train_loss": train_loss,
                                    "params": num_params(model), "trainable_params": trainable}, lineage=lineage)
    state = json.loads((final_dir / ckpt.TRAINER_STATE).read_text())
    result = _result(final_dir, state, num_params(model), trainable, resumed_from=str(resumed) if resumed else None)
    cb.on_event("end", result)
    return result


def finished(out_dir: str | Path) -> dict | None:
    """The result of a training stage whose final `model/` is complete (read from disk), else None.

    A stage's completion is its output dir, not the orchestrator's memory: a finished dir
    returns its result to any caller (another Prefect home, a worker, a run killed just after
    the model was finalized)."""
    final_dir = Path(out_dir) / "model"
    if not is_complete(final_dir):
        return None
    state = json.loads((final_dir / ckpt.TRAINER_STATE).read_text())
    return _result(final_dir, state, state.get("params"), state.get("trainable_params"), resumed_from=str(final_dir))


def _result(final_dir: Path, state: dict, params: int | None, trainable: int | None, resumed_from: str | None) -> dict:
    return {
        "checkpoint": str(final_dir),
        "step": state["step"],
        "params": params,
        "trainable_params": trainable,
        "train_loss": state.get("final_train_loss"),
        "val_loss": state.get("final_val_loss"),
        "initial_val_loss": state.get("initial_val_loss"),
        "tokens": state["tokens"],
        "elapsed_s": state["elapsed_s"],
        "tok_per_s": state["tokens"] / max(state["elapsed_s"], 1e-9),
        "resumed_from": resumed_from,
        **({"mixture": state["cursor"]["sources"]} if "sources" in (state.get("cursor") or {}) else {}),
    }


def job_lineage(data_dir: str | Path | None, init_from: str | Path | None, extra: dict | None = None) -> dict:
    """What a training job's model comes from: its data's lineage, its starting model's, `extra`'s."""
    lin = lineages.merge(lineages.of_dir(data_dir) if data_dir else None,
                         lineages.of_model(init_from) if init_from else None, extra)
    if init_from:
        lin["base_model"] = lineages.model_name(init_from)
    return lin


def _check_same_tokenizer(init_from: Path, tokenizer_dir: Path) -> None:
    a, b = init_from / "tokenizer.json", tokenizer_dir / "tokenizer.json"
    if a.is_file() and b.is_file() and sha256_file(a) != sha256_file(b):
        raise ValueError(f"init_from {init_from}: its tokenizer differs from {tokenizer_dir}")


def build_model(job: TrainJob, vocab_size: int, special_ids: dict) -> tuple[nn.Module, dict, dict | None]:
    """(model ready to train, its config.json, adapter config or None) for a job.

    `init_from` may be one of our checkpoints or any local Hugging Face / mlx-lm model dir
    (llama, qwen2, qwen3, ...); lora/dora then train adapters on it and record it as the base.
    """
    cfg = job.train
    if job.init_from:
        src = Path(job.init_from)
        if adapters.is_adapter_dir(src):
            raise ValueError(f"init_from {src} is an adapter checkpoint; fuse it first (mlxflow fuse)")
        _check_same_tokenizer(src, Path(job.tokenizer_dir))
        model, config = load_model(src)
        if config.get("vocab_size", vocab_size) < vocab_size:
            raise ValueError(f"init_from {src}: its vocab_size {config['vocab_size']} is smaller than the "
                             f"tokenizer's {vocab_size} tokens")
    elif job.model is not None:
        if cfg.fine_tune_type != "full":
            raise ValueError(f"fine_tune_type {cfg.fine_tune_type} trains adapters on a base model: set init_from")
        config = hf_config(job.model, vocab_size, special_ids)
        model = from_config(config, seed=cfg.seed)
    else:
        raise ValueError("a training job needs `model` or `init_from`")
    mx.random.seed(cfg.seed)  # adapter initialisation
    adapter_config = adapters.prepare(model, cfg)
    if adapter_config is not None:
        adapter_config |= {"base_model": str(Path(job.init_from).resolve()), "base_digest": dir_digest(job.init_from)}
    return model, config, adapter_config


def _can_pack(model: nn.Module, data: dict) -> bool:
    """`pack: auto`: whether this model and data can be packed (else one padded row per sequence);
    says which on stderr, the job's log."""
    why = "a weighted mixture" if "mixture" in data else ""
    if not why and data.get("task") != "sft":
        why = f"{data.get('task')} data is already packed"
    if not why:
        try:
            use_segments(model)
        except ValueError as e:
            why = str(e)
    print(f"pack: auto -> {'rows (' + why + ')' if why else 'packs'}", file=sys.stderr, flush=True)
    return not why


def run(job: TrainJob, callback: TrainingCallback | None = None) -> dict:
    """Join the data-parallel group (if any), build the model and the batch streams, then `fit()`."""
    tok_dir, cfg = Path(job.tokenizer_dir), job.train
    tok = read_manifest(tok_dir, "tokenizer")
    data = read_manifest(job.data_dir, "tokens")
    if data["vocab_size"] != tok["vocab_size"]:
        raise ValueError(f"{job.data_dir} was tokenized with {data['vocab_size']} tokens, the tokenizer has {tok['vocab_size']}")
    if cfg.pack is True and "mixture" in data:  # packing draws from one dataset: it would ignore the weights
        raise ValueError(f"{job.data_dir} is a weighted mixture: pack is not available on a mixture yet; set pack: false")
    group = distributed.init(cfg.world_size)
    rank = group.rank() if group is not None else 0
    model, config, adapter_config = build_model(job, tok["vocab_size"], tok["special_ids"])
    if cfg.pack == "auto":
        cfg = cfg.model_copy(update={"pack": _can_pack(model, data)})
    pad = tok["special_ids"]["pad"] or 0
    buckets = dict(bucket=cfg.bucket, bucket_window=cfg.bucket_window, pad_multiple=cfg.pad_multiple)
    if cfg.pack:  # SFT rows packed into seq_len sequences (mlxcore.data.packing)
        train = open_packed(job.data_dir, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed, pad_id=pad,
                            rank=rank, world=cfg.world_size)
    else:
        train = open_batches(job.data_dir, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed, pad_id=pad,
                             rank=rank, world=cfg.world_size, **buckets)
    if hasattr(train, "check_budget"):  # a mixture: fail before the first step if a source's epochs run out
        train.check_budget(cfg.steps * cfg.grad_accum)
    # held-out batches are global batches (the same data whatever the world size); ranks share them out
    val = open_batches(job.data_dir, "val", cfg.batch_size * cfg.world_size, cfg.seq_len, shuffle=False, pad_id=pad,
                       pad_multiple=cfg.pad_multiple, shrink=True)
    return fit(model, config, cfg, train, val, job.out_dir, tokenizer_dir=tok_dir, callback=callback,
               adapter_config=adapter_config, group=group, lineage=job_lineage(job.data_dir, job.init_from))
