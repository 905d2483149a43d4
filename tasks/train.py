"""Training stages: each runs a training job in a child process (`mlxcore.train.launch`) and relays its progress."""

from __future__ import annotations

from pathlib import Path

from mlxcore.train.callbacks import CallbackList, ProgressBar
from mlxcore.config import ModelConfig, TrainConfig
from mlxcore import lineage
from mlxcore.io import link
from mlxcore.models import card
from mlxcore.train.launch import TrainingCrashed, run_in_subprocess
from mlxcore.train.loop import TrainJob, finished
from tasks.caching import Stage
from tasks.progress import PrefectProgress
from tasks.runlog import stage_callback

PRETRAIN = Stage("pretrain", inputs=("data_dir", "tokenizer_dir"), product="model")
SFT = Stage("sft", inputs=("data_dir", "tokenizer_dir", "init_from"), product="model")


def crashed(task, task_run, state) -> bool:
    """Retry only a trainer killed by a signal: the retry resumes from its last checkpoint."""
    try:
        state.result()
    except TrainingCrashed:
        return True
    except Exception:
        return False
    return False


def run_training(stage: str, job, run_dir: str) -> dict:
    if (done := finished(job.out_dir)) is not None:  # complete on disk, whatever Prefect remembers
        return done
    callback = CallbackList(ProgressBar(stage), PrefectProgress(stage, Path(run_dir).name), stage_callback(stage, run_dir))
    return run_in_subprocess(job, callback)


@PRETRAIN.task(retries=1, retry_condition_fn=crashed)
def pretrain(data_dir: str, tokenizer_dir: str, model: ModelConfig, train: TrainConfig, run_dir: str) -> dict:
    """Train a fresh model on packed pretraining sequences."""
    out = PRETRAIN.dir(locals())
    job = TrainJob(data_dir=data_dir, tokenizer_dir=tokenizer_dir, out_dir=str(out), model=model, train=train)
    return run_training("pretrain", job, run_dir)


@SFT.task(retries=1, retry_condition_fn=crashed)
def sft(data_dir: str, tokenizer_dir: str, init_from: str, train: TrainConfig, run_dir: str) -> dict:
    """Fine-tune the weights of `init_from` on assistant tokens of chat conversations."""
    out = SFT.dir(locals())
    job = TrainJob(data_dir=data_dir, tokenizer_dir=tokenizer_dir, out_dir=str(out), init_from=init_from, train=train)
    return run_training("sft", job, run_dir)


def model_card(checkpoint: str, results: dict, run_dir: str, inputs=None, base: str | None = None) -> str:
    """The final model's README.md (a Hugging Face model card), rewritten with the run's results (eval,
    bench): its lineage (from its manifest, plus `inputs`' and `base`'s), training config and terms."""
    extra = lineage.merge(lineage.of_inputs(inputs) if inputs else None, lineage.of_model(base) if base else None)
    if base:
        extra["base_model"] = lineage.model_name(base)
    return str(card.write_card(checkpoint, results=results, title=Path(run_dir).name, lineage_extra=extra))


def publish(checkpoint: str, run_dir: str) -> str:
    """`<run>/model`: a link to the run's latest model (`mlx_lm.generate --model runs/demo/model`)."""
    return str(link(checkpoint, Path(run_dir) / "model"))
