"""Preference stages: synthetic pairs, tokenized pairs, reference log-probs, training, held-out metrics.

Each is a cached, content-keyed stage like the others: the reference log-probs are keyed on the
reference model's and the data's digests only, so another beta, objective or learning rate
reuses them; the trainer runs in a child process (`mlxcore.train.launch`), retried from its last
checkpoint if it is killed.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect.artifacts import create_table_artifact

from mlxcore.config import PreferenceObjective, PreferenceSourceConfig, SyntheticPairsConfig, TrainConfig
from mlxcore.io import atomic_dir, read_manifest, write_json, write_manifest
from mlxcore.preference import data as pref_data
from mlxcore.preference import reference as pref_reference
from mlxcore.preference import synthetic as pref_synthetic
from mlxcore.preference.train import PreferenceJob, RewardJob, evaluate
from tasks.caching import Stage
from tasks.data import download
from tasks.progress import StageProgress, artifact_key, progress_bar
from tasks.train import crashed, run_training

PAIRS = Stage("pairs")
TOKENIZE = Stage("pretokenize-preference", inputs=("inputs", "tokenizer_dir"))
REFERENCE = Stage("reference", inputs=("model_dir", "data_dir"))
PREFERENCE = Stage("preference", inputs=("data_dir", "tokenizer_dir", "init_from", "reference_dir"), product="model")
REWARD = Stage("reward-model", inputs=("data_dir", "tokenizer_dir", "init_from"), product="model")
EVAL = Stage("preference-eval", inputs=("checkpoint", "data_dir", "reference_dir"))


def _output(out) -> dict:
    return {"path": str(out), "digest": read_manifest(out)["digest"]}


@PAIRS.task()
def synthetic_pairs(config: SyntheticPairsConfig, run_dir: str) -> dict:
    """Preference rows from the bench generators: the right answer chosen, a near miss rejected."""
    out = PAIRS.dir(locals())
    if not PAIRS.done(out):
        pref_synthetic.write_dataset(config, out)
    return _output(out)


def sources(source: PreferenceSourceConfig | None, synthetic: SyntheticPairsConfig, max_download_mb: float,
            run_dir: str) -> tuple:
    """(inputs, format options): download tasks for the configured specs, or the synthetic pairs."""
    if source is None:
        return synthetic_pairs(synthetic, run_dir)["path"], {}
    split = {s: [download(spec, "preference", max_download_mb, run_dir)["path"] for spec in getattr(source, s)]
             for s in ("train", "val")}
    return split, source.options()


@TOKENIZE.task()
def pretokenize(inputs, tokenizer_dir: str, source: dict, max_tokens: int | None, run_dir: str) -> dict:
    """Tokenize preference rows: prompts through the chat template, each response as its reply."""
    out = TOKENIZE.dir(locals())
    if not TOKENIZE.done(out):
        started = time.monotonic()
        pref_data.pretokenize(inputs, tokenizer_dir, out, source=source, max_tokens=max_tokens,
                              on_progress=StageProgress("pretokenize preference"))
        m = read_manifest(out)
        create_table_artifact(
            table=[{"split": s, **v} for s, v in m["splits"].items()],
            key=artifact_key(Path(run_dir).name, "pretokenize", "preference"),
            description=(f"pretokenize preference ({m['rows']}): {m['stats']['rows']} rows read, "
                         f"{m['stats']['truncated']} truncated, skipped {m['skipped']} "
                         f"{'(e.g. ' + '; '.join(m['skipped_examples']) + ')' if m['skipped_examples'] else ''}; "
                         f"formats {m['formats']}; {time.monotonic() - started:.1f} s"))
    m = read_manifest(out)
    return _output(out) | {"rows": m["rows"], "splits": m["splits"], "skipped": m["skipped"]}


@REFERENCE.task()
def reference(model_dir: str, data_dir: str, seq_len: int, batch_size: int, run_dir: str) -> dict:
    """The reference model's log-prob of every response, computed once (no reference in training)."""
    out = REFERENCE.dir(locals())
    if not REFERENCE.done(out):
        with progress_bar(1, "reference log-probs", "example") as bar:
            pref_reference.compute(model_dir, data_dir, out, seq_len=seq_len, batch_size=batch_size, on_progress=bar,
                                   progress_bar=False)
    return _output(out)


@PREFERENCE.task(retries=1, retry_condition_fn=crashed)
def train_preference(data_dir: str, tokenizer_dir: str, init_from: str, reference_dir: str | None,
                     objective: PreferenceObjective, train: TrainConfig, run_dir: str) -> dict:
    """Align `init_from` on preference data with `objective` (DPO, IPO, hinge, SimPO, ORPO, KTO)."""
    out = PREFERENCE.dir(locals())
    job = PreferenceJob(data_dir=data_dir, tokenizer_dir=tokenizer_dir, out_dir=str(out), init_from=init_from,
                        reference_dir=reference_dir, train=train, objective=objective)
    return run_training(f"preference {objective.name}", job, run_dir)


@REWARD.task(retries=1, retry_condition_fn=crashed)
def train_reward(data_dir: str, tokenizer_dir: str, init_from: str, train: TrainConfig, margin: float,
                 dense_weight: float, run_dir: str) -> dict:
    """A reward model (scalar `score` head, HF sequence-classification layout) on pairs or scored rows."""
    out = REWARD.dir(locals())
    job = RewardJob(data_dir=data_dir, tokenizer_dir=tokenizer_dir, out_dir=str(out), init_from=init_from,
                    train=train, margin=margin, dense_weight=dense_weight)
    return run_training("reward-model", job, run_dir)


@EVAL.task(task_run_name="preference-eval-{label}")
def evaluate_preference(label: str, checkpoint: str, data_dir: str, reference_dir: str | None,
                        objective: PreferenceObjective | None, seq_len: int, batch_size: int, run_dir: str) -> dict:
    """Held-out preference accuracy, rewards, margin and KL of `checkpoint` (or a reward model's accuracy)."""
    out = EVAL.dir(locals())
    if not EVAL.done(out):
        metrics = evaluate(checkpoint, data_dir, reference_dir=reference_dir, objective=objective, seq_len=seq_len,
                           batch_size=batch_size)
        with atomic_dir(out) as tmp:
            write_json(tmp / "metrics.json", metrics)
            write_manifest(tmp, "preference-eval", metrics)
    return {"label": label, "checkpoint": checkpoint, **read_manifest(out)["config"]}


def report(evals: list[dict], run_dir: str) -> None:
    """The held-out metrics of each model side by side (one table artifact)."""
    keys = ("examples", "accuracy", "margin", "reward_chosen", "reward_rejected", "kl", "loss", "abs_error")
    rows = [{"model": e["label"], **{k: (round(e[k], 4) if isinstance(e[k], float) else e[k]) for k in keys if k in e}}
            for e in evals]
    create_table_artifact(table=rows, key=artifact_key(Path(run_dir).name, "preference-eval"),
                          description="Held-out preference metrics: the starting model beside the trained one")
