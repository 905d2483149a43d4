"""The pieces of one RL iteration that a flow strings together, each from and to directories.

    prompts = load_prompts(files, fmt, columns, system_prompt)   # rows -> RLPrompts (mlxcore/rl/prompts.py)
    batch = iteration_prompts(prompts, iteration, n, seed)        # this iteration's prompts
    run_rollout(policy_dir, batch, buffer, rollout_cfg, scorer)   # K samples each, rewarded (resumable)
    run_update(policy_dir, buffer, out_dir, update_cfg, ...)      # GRPO family or PPO -> a new model dir
    greedy_eval(model_dir, held_out, max_tokens, scorer)          # held-out mean reward and accuracy

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
from mlxcore.io import atomic_dir, is_complete, write_json, write_manifest
from mlxcore.rl.loop import mean_of, rollout
from mlxcore.rl.prompts import RLPrompt

STATE = "state.json"
OPTIMIZER_STATE = "optimizer.safetensors"


def iteration_prompts(questions: list[RLPrompt], iteration: int, n: int, seed: int) -> list[RLPrompt]:
    """Questions n*(iteration-1) .. n*iteration-1 of a seeded shuffle (a new one each pass)."""
    out, start = [], (iteration - 1) * n
    for pos in range(start, start + n):
        epoch, i = divmod(pos, len(questions))
        out.append(questions[int(np.random.default_rng([seed, epoch]).permutation(len(questions))[i])])
    return out


def run_rollout(policy_dir: str | Path, prompts: list[RLPrompt], buffer: str | Path, cfg, scorer, *, seed: int,
                checkpoint: str, on_progress: Callable[[int, int], None] | None = None) -> dict:
    from mlxcore.models.generate import load_chat

    model, tok = load_chat(policy_dir)
    return rollout(model, tok, prompts, buffer, k=cfg.k, max_tokens=cfg.max_tokens, scorer=scorer,
                   temperature=cfg.temperature, top_p=cfg.top_p, seed=seed, checkpoint=checkpoint,
                   prompts_per_batch=cfg.prompts_per_batch, on_progress=on_progress)


def run_update(policy_dir: str | Path, buffer: str | Path, out_dir: str | Path, cfg: RLUpdateConfig, *, seed: int,
               reference_dir: str | Path | None = None, previous: str | Path | None = None,
               reward_model: str | Path | None = None, max_tokens: int | None = None, callback=None) -> dict:
    """The iteration's update over `buffer` starting from `policy_dir`, through the one training
    loop (`train.fit`: schedule, clipping, checkpoints and exact resume in `<out_dir>-train/`);
    the new policy is a plain model dir at `out_dir/model`.

    `cfg.loss` picks the objective: the GRPO family (`objectives.PolicyLoss` over the buffer's
    groups; LoRA/DoRA adapters train for the iteration and are fused into it) or PPO
    (`ppo.run_ppo_update`: the critic carries over from `previous`'s; the first one is the
    reward model's decoder (else the policy's) with a zeroed head; the KL coefficient adapts from
    `previous`'s when `kl_target` is set).
    Full fine-tuning carries AdamW's moments from iteration to iteration: `previous` is the
    previous update's dir (its `optimizer.safetensors`), and this one writes its own. A fresh
    AdamW every iteration would restart with bias-corrected, sign-like first steps each time.
    `max_tokens` is the rollout's generation budget (dr_grpo's constant denominator)."""
    from mlxcore.rl.loop import read_buffer

    previous = Path(previous) if previous is not None and is_complete(previous) else None
    if cfg.loss == "ppo":
        from mlxcore.rl.ppo import run_ppo_update

        rows = [r for r in read_buffer(buffer) if r["reward"] is not None]  # a judge that gave no score
        kl_coef = _kl_coef(cfg, previous)
        carried_critic = previous is not None and (previous / "critic").is_dir()
        critic = previous / "critic" if carried_critic else reward_model
        metrics = run_ppo_update(
            policy_dir, critic, reference_dir, rows, out_dir, lr=cfg.lr, critic_lr=cfg.critic_lr, ppo_epochs=cfg.epochs,
            mini_batch_size=cfg.batch_size, clip_range=cfg.clip_eps or 0.2, cliprange_value=cfg.cliprange_value,
            vf_coef=cfg.vf_coef, gamma=cfg.gamma, lam=cfg.lam, kl_coef=kl_coef, grad_clip=cfg.grad_clip,
            weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio, seed=seed,
            optimizer_from=previous, critic_zero_head=not carried_critic, callback=callback)
        return metrics
    return _policy_update(policy_dir, buffer, Path(out_dir), cfg, seed=seed, reference_dir=reference_dir,
                          carried=previous / OPTIMIZER_STATE if previous is not None else None, max_tokens=max_tokens,
                          callback=callback)


def _kl_coef(cfg: RLUpdateConfig, previous: Path | None) -> float:
    """PPO's KL coefficient for this iteration: fixed, or adapted (Ziegler et al.) from the
    previous iteration's coefficient and the KL it measured to the reference."""
    if cfg.kl_target is None or previous is None:
        return cfg.kl_coef
    from mlxcore.io import read_manifest
    from mlxcore.rl.ppo import AdaptiveKL

    last = read_manifest(previous)["metrics"]
    if last.get("kl_coef") is None or last.get("kl") is None:
        return cfg.kl_coef
    controller = AdaptiveKL(last["kl_coef"], cfg.kl_target, cfg.kl_horizon)
    controller.update(last["kl"], last.get("samples") or 0)
    return controller.value


def _policy_update(policy_dir, buffer, out_dir: Path, cfg: RLUpdateConfig, *, seed: int, reference_dir, carried,
                   max_tokens, callback) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from mlxcore.models import adapters
    from mlxcore.models import checkpoint as ckpt
    from mlxcore.models.model import load
    from mlxcore.rl.loop import SampleBatches, add_reference_logprobs, read_buffer
    from mlxcore.rl.objectives import PolicyLoss, policy_items
    from mlxcore.train import optimizers
    from mlxcore.train.loop import fit

    items, metrics = policy_items(read_buffer(buffer), cfg.loss, scale=cfg.scale_rewards)
    model, config = load(policy_dir)
    pad = config.get("pad_token_id") or 0
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
        loss = PolicyLoss(cfg.loss, cfg.clip_eps, cfg.clip_eps_high, cfg.beta, pad, max_tokens=max_tokens,
                          overlong_filter=cfg.overlong_filter)
        result = fit(model, config, tcfg, SampleBatches(items, cfg.batch_size, seed), None, train_dir,
                     optimizer=optimizer, loss=loss, tokenizer_dir=policy_dir, callback=callback,
                     adapter_config=adapter_config)
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
    """One iteration's update, as `mlxcore.train.launch` runs it in its own process (`run_job`)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["rl-update"] = "rl-update"
    policy_dir: str
    buffer: str
    update_dir: str  # the new policy: <update_dir>/model
    update: RLUpdateConfig
    seed: int
    reference_dir: str | None = None
    previous: str | None = None  # the previous iteration's update dir (moments, critic, KL coefficient)
    reward_model: str | None = None
    max_tokens: int | None = None

    @property
    def out_dir(self) -> str:  # job.json and the loop's checkpoints (removed once the update is written)
        return self.update_dir + "-train"


def run_job(job: UpdateJob, callback=None) -> dict:
    metrics = run_update(job.policy_dir, job.buffer, job.update_dir, job.update, seed=job.seed,
                         reference_dir=job.reference_dir, previous=job.previous, reward_model=job.reward_model,
                         max_tokens=job.max_tokens, callback=callback)
    return {"checkpoint": str(Path(job.update_dir) / "model"), **metrics}


def greedy_eval(model_dir: str | Path, prompts: list[RLPrompt], max_tokens: int, scorer, batch_size: int = 32) -> dict:
    """The greedy answers to held-out `prompts`, rewarded by `scorer`: mean reward, accuracy (the
    accuracy term's mean; None without one), each term's mean, a few samples, and `per_prompt`: each
    prompt's id, reward and correctness (what champion / challenger promotion pairs up)."""
    from mlx_lm.generate import batch_generate

    from mlxcore.models.generate import load_chat
    from mlxcore.rl.loop import _last_user
    from mlxcore.rl.rewards import Sample

    model, tok = load_chat(model_dir)
    scored, shown, per_prompt = [], [], []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo: lo + batch_size]
        ids = [tok.apply_chat_template(p.messages, add_generation_prompt=True) for p in chunk]
        res = batch_generate(model, tok, ids, max_tokens=max_tokens, return_token_ids=True)
        samples = [Sample(id=f"{p.id}/greedy", where=p.where, prompt=_last_user(p.messages), messages=p.messages,
                          completion=text, reference=p.reference, completion_tokens=len(t),
                          truncated=len(t) >= max_tokens, max_tokens=max_tokens)
                   for p, text, t in zip(chunk, res.texts, res.token_ids)]
        for p, sample, sc in zip(chunk, samples, scorer.score(samples)):
            scored.append(sc)
            per_prompt.append({"id": p.id, "reward": sc["reward"], "correct": sc["correct"]})
            if len(shown) < 8:
                shown.append({"prompt": sample.prompt[:200], "answer": sample.reference.get("answer"),
                              "reward": sc["reward"], "correct": sc["correct"], "response": sample.completion[:300]})
    terms = sorted({t for sc in scored for t in sc["rewards"]})
    return {"mean_reward": mean_of(sc["reward"] for sc in scored), "accuracy": mean_of(sc["correct"] for sc in scored),
            "rewards": {t: mean_of(sc["rewards"].get(t) for sc in scored) for t in terms},
            "n": len(prompts), "samples": shown, "per_prompt": per_prompt}


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
