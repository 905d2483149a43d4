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
from pathlib import Path
from typing import Callable

import numpy as np

from mlxcore.data import records
from mlxcore.io import atomic_dir, write_json, write_manifest
from mlxcore.rl.loop import RLPrompt, UpdateConfig, rollout, update
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
    from mlxcore.generate import load_chat

    model, tok = load_chat(policy_dir)
    return rollout(model, tok, prompts, buffer, k=cfg.k, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                   top_p=cfg.top_p, seed=seed, checkpoint=checkpoint, format_weight=cfg.format_weight,
                   prompts_per_batch=cfg.prompts_per_batch, on_progress=on_progress)


def run_update(policy_dir: str | Path, buffer: str | Path, out_dir: str | Path, cfg, *, seed: int,
               reference_dir: str | Path | None = None, optimizer_from: str | Path | None = None) -> dict:
    """GRPO over `buffer` starting from `policy_dir`; the new policy is a plain model dir at
    `out_dir/model` (LoRA/DoRA adapters train for the iteration and are fused into it).

    Full fine-tuning carries AdamW's moments from iteration to iteration: `optimizer_from` is the
    previous update's dir (its `optimizer.safetensors`), and this one writes its own. A fresh
    AdamW every iteration would restart with bias-corrected, sign-like first steps each time."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlxcore import adapters
    from mlxcore.checkpoint import save_model_dir
    from mlxcore.config import TrainConfig
    from mlxcore.model import load

    mx.random.seed(seed)
    model, config = load(policy_dir)
    adapters.prepare(model, TrainConfig(fine_tune_type=cfg.fine_tune_type, lora=cfg.lora, warmup_steps=0))
    ref = load(reference_dir)[0] if cfg.beta > 0 else None
    optimizer = optim.AdamW(learning_rate=cfg.lr, weight_decay=cfg.weight_decay)
    carried = Path(optimizer_from) / OPTIMIZER_STATE if optimizer_from is not None else None
    if cfg.fine_tune_type == "full" and carried is not None and carried.exists():
        from mlx.utils import tree_unflatten

        optimizer.init(model.trainable_parameters())
        saved = {k: v for k, v in mx.load(str(carried)).items() if k != "learning_rate"}
        optimizer.state = tree_unflatten(list(saved.items())) | {"learning_rate": optimizer.learning_rate}
    pad = config.get("pad_token_id") or 0
    metrics = update(model, optimizer, buffer, UpdateConfig(cfg.clip_eps, cfg.beta, cfg.scale_rewards, cfg.batch_size,
                                                            cfg.epochs, cfg.grad_clip), pad=pad, ref_model=ref, seed=seed)
    if cfg.fine_tune_type != "full":
        model = adapters.fuse_model(model)
    with atomic_dir(out_dir, replace=True) as tmp:
        save_model_dir(tmp / "model", model, config, tokenizer_dir=policy_dir)
        write_json(tmp / "metrics.json", metrics)
        if cfg.fine_tune_type == "full" and metrics["steps"]:
            from mlx.utils import tree_flatten

            mx.save_safetensors(str(tmp / OPTIMIZER_STATE), dict(tree_flatten(optimizer.state)))
        elif carried is not None and carried.exists():  # nothing trained: hand the moments on unchanged
            import shutil

            shutil.copy2(carried, tmp / OPTIMIZER_STATE)
        write_manifest(tmp, "rl-update", {"policy": str(policy_dir), "update": cfg.model_dump()}, metrics=metrics)
    return metrics


def greedy_accuracy(model_dir: str | Path, prompts: list[RLPrompt], max_tokens: int, batch_size: int = 32) -> dict:
    """Share of `prompts` whose greedy answer's final number equals the truth."""
    from mlx_lm.generate import batch_generate

    from mlxcore.generate import load_chat

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
