"""Preference and reward-model training jobs: data, reference log-probs and a loss handed to `fit`.

    python -m mlxcore.train.launch JOB.json    # kind "preference" or "reward-model"

Both start from a model dir (usually an SFT'd model) and train through the one loop, so full,
LoRA, DoRA and QLoRA fine-tuning, every optimizer, gradient accumulation, checkpoints and exact
resume work as for SFT. `evaluate()` scores a model on held-out examples (preference accuracy,
margins, the loss) for the report and the before / after comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
from pydantic import BaseModel, ConfigDict

from mlxcore.config import PreferenceObjective, TrainConfig
from mlxcore.io import read_manifest
from mlxcore.kernels.patch import use_fast_kernels
from mlxcore.models import checkpoint
from mlxcore.preference import reference, reward
from mlxcore.preference.batches import PreferenceBatches
from mlxcore.preference.losses import PreferenceLoss, RewardLoss, sequence_logprobs
from mlxcore.train import distributed
from mlxcore.train.callbacks import TrainingCallback
from mlxcore.train.loop import TrainJob, build_model, fit, job_lineage


class _Job(BaseModel):
    """What both jobs train from: tokenized preference data, a tokenizer, a start model, a schedule."""

    model_config = ConfigDict(extra="forbid")
    data_dir: str
    tokenizer_dir: str
    out_dir: str
    init_from: str
    train: TrainConfig


class PreferenceJob(_Job):
    """A policy trained on preference data (DPO, IPO, hinge, SimPO, ORPO, KTO)."""

    kind: Literal["preference"] = "preference"  # mlxcore.train.launch runs it with `run`
    reference_dir: str | None = None
    objective: PreferenceObjective = PreferenceObjective()


class RewardJob(_Job):
    """A reward model (scalar head) trained on pairs or scored rows."""

    kind: Literal["reward-model"] = "reward-model"  # mlxcore.train.launch runs it with `run_reward`
    margin: float = 0.0
    dense_weight: float = 0.0


def make_loss(objective: PreferenceObjective) -> PreferenceLoss:
    return PreferenceLoss(objective.name, objective.beta, objective.label_smoothing, objective.gamma,
                          objective.desirable_weight, objective.undesirable_weight, objective.sft_weight)


def _check_rows(data: dict, job_kind: str, objective: str | None = None) -> None:
    rows = data["rows"]
    if job_kind == "reward-model" and rows == "kto":
        raise ValueError("a reward model trains on pairs or scored rows, not KTO rows")
    if objective == "kto" and rows != "kto":
        raise ValueError(f"objective kto trains on unpaired rows (prompt/completion/label); the data holds {rows}")
    if objective is not None and objective != "kto" and rows != "pairs":
        raise ValueError(f"objective {objective} trains on pairs (prompt/chosen/rejected); the data holds {rows} rows")


def _batches(job, pad: int, rank: int, refs: dict | None):
    cfg = job.train
    train = PreferenceBatches(job.data_dir, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=rank,
                              world=cfg.world_size, pad_id=pad, pad_multiple=cfg.pad_multiple,
                              reference=refs and refs["train"])
    val = PreferenceBatches(job.data_dir, "val", cfg.batch_size * cfg.world_size, cfg.seq_len, shuffle=False,
                            pad_id=pad, pad_multiple=cfg.pad_multiple, reference=refs and refs["val"], shrink=True)
    return train, val


def run(job: PreferenceJob, callback: TrainingCallback | None = None) -> dict:
    data = read_manifest(job.data_dir, "preference")
    _check_rows(data, "preference", job.objective.name)
    loss = make_loss(job.objective)
    refs = None
    if loss.uses_reference:
        if not job.reference_dir:
            raise ValueError(f"objective {job.objective.name} needs reference log-probs (reference_dir)")
        refs = {s: reference.load(job.reference_dir, s, job.data_dir) for s in ("train", "val")}
    tok = read_manifest(job.tokenizer_dir, "tokenizer")
    group = distributed.init(job.train.world_size)
    rank = group.rank() if group is not None else 0
    base = TrainJob(data_dir=job.data_dir, tokenizer_dir=job.tokenizer_dir, out_dir=job.out_dir,
                    init_from=job.init_from, train=job.train)
    model, config, adapter_config = build_model(base, tok["vocab_size"], tok["special_ids"])
    train, val = _batches(job, data["pad_id"], rank, refs)
    return fit(model, config, job.train, train, val, job.out_dir, loss=loss, tokenizer_dir=job.tokenizer_dir,
               callback=callback, adapter_config=adapter_config, group=group,
               lineage=job_lineage(job.data_dir, job.init_from))


def run_reward(job: RewardJob, callback: TrainingCallback | None = None) -> dict:
    data = read_manifest(job.data_dir, "preference")
    _check_rows(data, "reward-model")
    if job.train.fine_tune_type != "full":
        raise ValueError("a reward model trains full weights (fine_tune_type: full); its head is new")
    group = distributed.init(job.train.world_size)
    rank = group.rank() if group is not None else 0
    model, config = reward.from_base(job.init_from, data["pad_id"], seed=job.train.seed)
    train, val = _batches(job, data["pad_id"], rank, None)
    return fit(model, config, job.train, train, val, job.out_dir,
               loss=RewardLoss(data["rows"], job.margin, job.dense_weight),
               tokenizer_dir=job.tokenizer_dir, callback=callback, group=group,
               lineage=job_lineage(job.data_dir, job.init_from))


def evaluate(model_dir: str | Path, data_dir: str | Path, *, reference_dir: str | Path | None = None,
             objective: PreferenceObjective | None = None, split: str = "val", seq_len: int = 512,
             batch_size: int = 16) -> dict:
    """Held-out metrics, means per example over `split`.

    A policy: `loss` (its objective's), `logp_accuracy` (pairs: the chosen reply has the higher
    per-token mean log-prob) and, given the reference's log-probs, the implicit-reward metrics
    every objective is compared on: `accuracy` (pairs: the chosen reply gained more log-prob
    than the rejected one since the reference, so exactly 0.5 for the reference itself; KTO: the
    gain's sign matches the label), `margin`, `reward_chosen`, `reward_rejected` (beta x log-ratio)
    and `kl`. A reward model: pair `accuracy` and `margin` (or `abs_error` on scored rows)."""
    data = read_manifest(data_dir, "preference")
    rows = data["rows"]
    if reward.is_reward_dir(model_dir):
        model, _ = reward.load(model_dir)
        loss, refs = RewardLoss(rows), None
    else:
        model, _ = checkpoint.load(model_dir)
        objective = objective or PreferenceObjective(name="kto" if rows == "kto" else "dpo")
        loss = make_loss(objective)
        refs = reference.load(reference_dir, split, data_dir) if reference_dir else None
    model.eval()
    use_fast_kernels(model)
    batches = PreferenceBatches(data_dir, split, 1, seq_len, shuffle=False, pad_id=data["pad_id"], reference=refs)
    sums: dict[str, float] = {}
    n_examples = 0.0

    def add(key: str, value) -> None:
        sums[key] = sums.get(key, 0.0) + float(value)

    has_loss = refs is not None or not getattr(loss, "uses_reference", False)
    for batch in batches.in_order(batch_size):
        n_examples += len(batch["target"])
        if has_loss:
            loss_sum, _, aux = loss(model, *map(mx.array, loss.prepare(batch)))
            mx.eval(loss_sum, aux)
            add("loss", loss_sum.item())
            if isinstance(loss, RewardLoss):
                for k, v in aux.items():
                    add(k, v.item())
                continue
        logp, n = sequence_logprobs(model, *(mx.array(batch[k]) for k in ("inputs", "targets", "mask")))
        logp, n = np.array(logp, dtype=np.float64), np.maximum(np.array(n, dtype=np.float64), 1.0)
        if rows == "pairs":
            add("logp_accuracy", _ties(logp[0::2] / n[0::2], logp[1::2] / n[1::2]).sum())
        if refs is None:
            continue
        ref, beta = batch["ref"].astype(np.float64), loss.beta
        gain = beta * (logp - ref)
        d = (ref - logp) / n
        kl = np.exp(np.minimum(d, 30.0)) - d - 1.0
        if rows == "pairs":
            gc, gr = gain[0::2], gain[1::2]
            add("accuracy", _ties(gc, gr).sum())
            add("margin", (gc - gr).sum())
            add("reward_chosen", gc.sum())
            add("reward_rejected", gr.sum())
            add("kl", kl.reshape(-1, 2).mean(axis=1).sum())
        else:
            signed = np.where(batch["target"] > 0.5, gain, -gain)
            add("accuracy", _ties(signed, 0.0).sum())
            add("margin", signed.sum())
            add("kl", kl.sum())
    return {"examples": int(n_examples), **{k: v / max(n_examples, 1.0) for k, v in sums.items()}}


def _ties(a, b) -> np.ndarray:
    return (a > b) + 0.5 * (a == b)
