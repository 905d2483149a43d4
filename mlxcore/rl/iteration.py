"""The pieces of one RL iteration that a flow strings together, each from and to directories.

    questions = load_questions(files, system_prompt)             # GSM8K rows -> RLPrompts
    batch = iteration_prompts(questions, iteration, n, seed)      # this iteration's questions
    run_rollout(policy_dir, batch, buffer, rollout_cfg, ...)      # K samples each (resumable)
    run_update(policy_dir, buffer, out_dir, update_cfg, ...)      # GRPO -> a new model dir
    greedy_accuracy(model_dir, held_out, max_tokens)              # exact-answer accuracy

The state between iterations (the iteration number, the latest checkpoint, the reward history)
lives in `<run>/state.json`, written atomically once an iteration is complete (`RLState`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from mlxcore.config import RLUpdateConfig
from mlxcore.data import records
from mlxcore.io import atomic_dir, write_json, write_manifest
from mlxcore.rl.loop import RLPrompt, rollout
from mlxcore.rl.rewards import extract_answer, gsm8k_truth

STATE = "state.json"
OPTIMIZER_STATE = "optimizer.safetensors"


def load_questions(files: list[str | Path], system_prompt: str | None = None) -> list[RLPrompt]:
    """GSM8K-style rows ({"question", "answer": "... #### n"}) of JSONL / JSON / parquet files."""
    out = []
    for path in map(Path, files):
        for chunk, _ in records.read_chunks(path):
            for lineno, payload in records.chunk_items(chunk):
                row = records.decode_row(str(path), lineno, payload)
                where = f"{path}:{lineno}"
                if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
                    raise records.DataError(f"{where}: a GSM8K row needs string fields 'question' and 'answer'")
                try:
                    truth = gsm8k_truth(row["answer"])
                except ValueError as e:
                    raise records.DataError(f"{where}: {e}") from None
                messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
                messages.append({"role": "user", "content": row["question"]})
                out.append(RLPrompt(id=f"{path.stem}-{lineno}", messages=messages, truth=truth))
    if not out:
        raise records.DataError(f"no questions in {', '.join(map(str, files))}")
    return out


def iteration_prompts(questions: list[RLPrompt], iteration: int, n: int, seed: int) -> list[RLPrompt]:
    """Questions n*(iteration-1) .. n*iteration-1 of a seeded shuffle (a new one each pass)."""
    out, start = [], (iteration - 1) * n
    for pos in range(start, start + n):
        epoch, i = divmod(pos, len(questions))
        out.append(questions[int(np.random.default_rng([seed, epoch]).permutation(len(questions))[i])])
    return out


def run_rollout(policy_dir: str | Path, prompts: list[RLPrompt], buffer: str | Path, cfg, *, seed: int,
                checkpoint: str, on_progress: Callable[[int, int], None] | None = None) -> dict:
    from mlxcore.models.generate import load_chat

    model, tok = load_chat(policy_dir)
    return rollout(model, tok, prompts, buffer, k=cfg.k, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                   top_p=cfg.top_p, seed=seed, checkpoint=checkpoint, format_weight=cfg.format_weight,
                   prompts_per_batch=cfg.prompts_per_batch, on_progress=on_progress)


def run_update(policy_dir: str | Path, buffer: str | Path, out_dir: str | Path, cfg, *, seed: int,
               reference_dir: str | Path | None = None, optimizer_from: str | Path | None = None,
               callback=None) -> dict:
    """GRPO over `buffer` starting from `policy_dir`, through the one training loop (`train.fit`
    with `GRPOLoss` and the buffer's samples as batches: schedule, clipping, checkpoints and exact
    resume in `<out_dir>-train/`); the new policy is a plain model dir at `out_dir/model`
    (LoRA/DoRA adapters train for the iteration and are fused into it).

    Full fine-tuning carries AdamW's moments from iteration to iteration: `optimizer_from` is the
    previous update's dir (its `optimizer.safetensors`), and this one writes its own. A fresh
    AdamW every iteration would restart with bias-corrected, sign-like first steps each time."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from mlxcore.models import adapters
    from mlxcore.train import optimizers
    from mlxcore.models import checkpoint as ckpt
    from mlxcore.models.model import load
    from mlxcore.rl.grpo import GRPOLoss
    from mlxcore.rl.loop import SampleBatches, add_reference_logprobs, grpo_items
    from mlxcore.train.loop import fit

    out_dir = Path(out_dir)
    items, metrics = grpo_items(buffer, cfg.scale_rewards)
    model, config = load(policy_dir)
    pad = config.get("pad_token_id") or 0
    carried = Path(optimizer_from) / OPTIMIZER_STATE if optimizer_from is not None else None
    carried = carried if carried is not None and carried.exists() else None
    steps = cfg.epochs * -(-len(items) // cfg.batch_size)
    train_dir = out_dir.with_name(out_dir.name + "-train")
    moments = None
    if steps:
        if cfg.beta > 0:
            if reference_dir is None:
                raise ValueError("beta > 0 needs reference_dir (the frozen reference policy)")
            add_reference_logprobs(items, load(reference_dir)[0], pad)  # then the reference is freed
        tcfg = cfg.train_config(steps, seed)
        mx.random.seed(seed)  # adapter initialisation
        adapter_config = adapters.prepare(model, tcfg)
        optimizer = optimizers.build(tcfg)
        if cfg.fine_tune_type == "full" and carried is not None:  # the moments, not the step or lr
            saved = {k: v for k, v in mx.load(str(carried)).items() if k not in ("step", "learning_rate")}
            optimizer.init(model.trainable_parameters())
            optimizer.state = tree_unflatten(list(saved.items())) | {k: optimizer.state[k] for k in ("step", "learning_rate")}
        result = fit(model, config, tcfg, SampleBatches(items, cfg.batch_size, seed), None, train_dir,
                     optimizer=optimizer, loss=GRPOLoss(cfg.clip_eps, cfg.beta, pad), tokenizer_dir=policy_dir,
                     callback=callback, adapter_config=adapter_config)
        final = Path(result["checkpoint"])
        ckpt.restore(final, model)  # the trained weights, also when fit() found the update done earlier
        history = [h for h in json.loads((final / ckpt.TRAINER_STATE).read_text())["history"] if h["event"] == "train"]
        metrics |= {"steps": result["step"]} | {k: float(np.mean([h[k] for h in history]))
                                               for k in ("loss", "kl", "clip_fraction", "grad_norm")}
        if cfg.fine_tune_type == "full":
            moments = final / OPTIMIZER_STATE
        model = adapters.fuse_model(model) if cfg.fine_tune_type != "full" else model
    with atomic_dir(out_dir, replace=True) as tmp:
        ckpt.save_model_dir(tmp / "model", model, config, tokenizer_dir=policy_dir)
        write_json(tmp / "metrics.json", metrics)
        source = moments or carried  # nothing trained: hand the moments on unchanged
        if source is not None:
            shutil.copy2(source, tmp / OPTIMIZER_STATE)
        write_manifest(tmp, "rl-update", {"policy": str(policy_dir), "update": cfg.model_dump()}, metrics=metrics)
    shutil.rmtree(train_dir, ignore_errors=True)  # its checkpoints only served a resume
    return metrics


class UpdateJob(BaseModel):
    """One iteration's GRPO update, as `mlxcore.train.launch` runs it in its own process (`run_job`)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["rl-update"] = "rl-update"
    policy_dir: str
    buffer: str
    update_dir: str  # the new policy: <update_dir>/model
    update: RLUpdateConfig
    seed: int
    reference_dir: str | None = None
    optimizer_from: str | None = None

    @property
    def out_dir(self) -> str:  # job.json and the loop's checkpoints (removed once the update is written)
        return self.update_dir + "-train"


def run_job(job: UpdateJob, callback=None) -> dict:
    metrics = run_update(job.policy_dir, job.buffer, job.update_dir, job.update, seed=job.seed,
                         reference_dir=job.reference_dir, optimizer_from=job.optimizer_from, callback=callback)
    return {"checkpoint": str(Path(job.update_dir) / "model"), **metrics}


def greedy_accuracy(model_dir: str | Path, prompts: list[RLPrompt], max_tokens: int, batch_size: int = 32) -> dict:
    """Share of `prompts` whose greedy answer's final number equals the truth."""
    from mlx_lm.generate import batch_generate

    from mlxcore.models.generate import load_chat

    model, tok = load_chat(model_dir)
    right, shown = 0, []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo: lo + batch_size]
        ids = [tok.apply_chat_template(p.messages, add_generation_prompt=True) for p in chunk]
        texts = batch_generate(model, tok, ids, max_tokens=max_tokens).texts
        for p, text in zip(chunk, texts):
            ok = extract_answer(text) == p.truth
            right += ok
            if len(shown) < 8:
                shown.append({"question": p.messages[-1]["content"][:200], "truth": p.truth,
                              "answer": extract_answer(text), "correct": ok, "response": text[:300]})
    return {"accuracy": right / max(len(prompts), 1), "n": len(prompts), "samples": shown}


class RLState:
    """`<run>/state.json`: iteration, checkpoint, history (one dict per completed iteration)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / STATE
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.iteration: int = data.get("iteration", 0)
        self.checkpoint: str | None = data.get("checkpoint")
        self.history: list[dict] = data.get("history", [])

    def commit(self, iteration: int, checkpoint: str, metrics: dict) -> None:
        self.iteration, self.checkpoint = iteration, checkpoint
        self.history = [h for h in self.history if h["iteration"] < iteration] + [{"iteration": iteration, **metrics}]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"iteration": iteration, "checkpoint": checkpoint, "history": self.history})
