"""RL stages: one GRPO iteration is rl-rollout -> rl-update -> rl-eval -> rl-commit.

Everything of iteration i lives in `<run>/iter-<i>/`: `buffer.jsonl` (resumable: a re-run keeps
the samples written and generates the rest), `update/` (the new policy, written atomically),
`eval.json`. `rl-commit` then moves `<run>/state.json` on to iteration i; until it has, a re-run
repeats iteration i, reusing whatever of it is finished. None of these use Prefect's result
cache: each resumes from its own files.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mlxcore.config import RLUpdateConfig, RolloutConfig
from mlxcore.data.download import data_files
from mlxcore.io import is_complete, read_manifest, write_json
from mlxcore.train.callbacks import CallbackList, ProgressBar
from mlxcore.train.launch import run_in_subprocess
from mlxcore.rl.iteration import RLState, UpdateJob, greedy_accuracy, iteration_prompts, load_questions, run_rollout
from mlxcore.bench.plots import line_chart, markdown_image
from tasks.caching import sweep
from tasks.progress import PrefectProgress, artifact_key, progress_bar
from tasks.train import crashed


def _files(dirs: list[str]) -> list[Path]:
    return [f for d in dirs for f in data_files(d)]


def iter_dir(run_dir: str, iteration: int) -> Path:
    return Path(run_dir) / f"iter-{iteration:04d}"


@task(name="rl-state")
def rl_state(run_dir: str) -> dict:
    sweep(run_dir)  # temp files of an iteration that was killed
    s = RLState(run_dir)
    return {"iteration": s.iteration, "checkpoint": s.checkpoint, "history": s.history}


@task(name="rl-rollout")
def rl_rollout(policy: str, train: list[str], iteration: int, cfg: RolloutConfig, system_prompt: str | None,
               seed: int, run_dir: str) -> dict:
    """K samples of this iteration's questions with the current policy (resumes a partial buffer)."""
    prompts = iteration_prompts(load_questions(_files(train), system_prompt), iteration, cfg.prompts, seed)
    buffer = iter_dir(run_dir, iteration) / "buffer.jsonl"
    with progress_bar(cfg.prompts * cfg.k, f"rollout {iteration}: {cfg.prompts} questions x {cfg.k}", "sample") as bar:
        stats = run_rollout(policy, prompts, buffer, cfg, seed=seed * 100_003 + iteration, checkpoint=policy,
                            on_progress=bar)
    return {"buffer": str(buffer), **stats}


@task(name="rl-update", retries=1, retry_condition_fn=crashed)  # a killed update resumes
def rl_update(policy: str, buffer: str, iteration: int, cfg: RLUpdateConfig, seed: int, reference: str,
              run_dir: str) -> dict:
    """GRPO over the iteration's buffer; the new policy is `iter-<i>/update/model`."""
    out = iter_dir(run_dir, iteration) / "update"
    if not is_complete(out):  # AdamW's moments carry over from the previous iteration's update
        job = UpdateJob(policy_dir=policy, buffer=buffer, update_dir=str(out), update=cfg, seed=seed + iteration,
                        reference_dir=reference, optimizer_from=str(iter_dir(run_dir, iteration - 1) / "update"))
        stage = f"rl-update {iteration}"
        run_in_subprocess(job, CallbackList(ProgressBar(stage), PrefectProgress(stage, Path(run_dir).name)))
    return {"checkpoint": str(out / "model"), **read_manifest(out, "rl-update")["metrics"]}


@task(name="rl-eval")
def rl_eval(checkpoint: str, test: list[str], n: int, max_tokens: int, system_prompt: str | None, iteration: int,
            run_dir: str) -> dict:
    """Greedy accuracy on the first `n` held-out questions."""
    out = iter_dir(run_dir, iteration) / "eval.json"
    if not out.exists():
        questions = load_questions(_files(test), system_prompt)[:n] if n else []
        write_json(out, greedy_accuracy(checkpoint, questions, max_tokens) if questions else {"accuracy": None, "n": 0})
    return json.loads(out.read_text())


@task(name="rl-commit")
def rl_commit(run_dir: str, iteration: int, checkpoint: str, metrics: dict) -> dict:
    """Move the run's state on to this iteration; reward history as artifacts."""
    state = RLState(run_dir)
    state.commit(iteration, checkpoint, metrics)
    name = Path(run_dir).name
    cols = ("iteration", "mean_reward", "accuracy", "eval_accuracy", "kl", "clip_fraction", "response_tokens",
            "grad_norm", "zero_variance_groups")
    table = [{c: (round(h[c], 4) if isinstance(h.get(c), float) else h.get(c)) for c in cols} for h in state.history]
    create_table_artifact(table=table, key=artifact_key(name, "reward-history"),
                          description="GRPO iterations: rollout reward and accuracy, held-out greedy accuracy")
    create_markdown_artifact(key=artifact_key(name, "reward-chart"), markdown=_chart(state.history))
    return {"iteration": iteration, "checkpoint": checkpoint, "metrics": metrics, "history": state.history}


def _chart(history: list[dict]) -> str:
    """Mean rollout reward and held-out greedy accuracy by iteration, as a PNG the UI renders."""
    series = {"rollout mean reward": [(h["iteration"], h["mean_reward"]) for h in history if h.get("mean_reward") is not None],
              "held-out accuracy": [(h["iteration"], h["eval_accuracy"]) for h in history
                                    if h.get("eval_accuracy") is not None]}
    png = line_chart(series, title="GRPO iterations", xlabel="iteration", ylabel="reward / accuracy")
    last = history[-1]
    return (f"### reward history\n\n{markdown_image(png, 'reward history')}\n\n"
            f"iteration {last['iteration']}: mean reward {last.get('mean_reward') or 0:.3f}, "
            f"held-out accuracy {last.get('eval_accuracy') or 0:.1%}\n")
