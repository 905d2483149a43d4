"""RL stages: one iteration is rl-rollout -> rl-update -> rl-eval -> rl-commit.

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

from mlxcore.config import RLConfig
from mlxcore.data.download import data_files
from mlxcore.io import is_complete, read_manifest, write_json
from mlxcore.train.callbacks import CallbackList, ProgressBar
from mlxcore.train.launch import run_in_subprocess
from mlxcore.rl.iteration import RLState, UpdateJob, greedy_eval, iteration_prompts, run_rollout
from mlxcore.rl.prompts import load_prompts
from mlxcore.rl.rewards import Scorer
from mlxcore.bench.plots import line_chart, markdown_image
from tasks.caching import sweep
from tasks.progress import PrefectProgress, artifact_key, progress_bar
from tasks.runlog import HOOKS, stage_callback
from tasks.secrets import prefect_secret
from tasks.train import crashed


def _files(dirs: list[str]) -> list[Path]:
    return [f for d in dirs for f in data_files(d)]


def iter_dir(run_dir: str, iteration: int) -> Path:
    return Path(run_dir) / f"iter-{iteration:04d}"


@task(name="rl-state", **HOOKS)
def rl_state(run_dir: str) -> dict:
    sweep(run_dir)  # temp files of an iteration that was killed
    s = RLState(run_dir)
    return {"iteration": s.iteration, "checkpoint": s.checkpoint, "history": s.history}


def prompts_of(config: RLConfig, files: list[str]):
    return load_prompts(_files(files), config.data.format, config.data.columns, config.system_prompt)


def scorer_of(config: RLConfig) -> Scorer:
    """The config's reward terms (user file, judge and reward model included), checked now."""
    return Scorer.from_config(config, resolve_secret=prefect_secret)


@task(name="rl-rollout", **HOOKS)
def rl_rollout(policy: str, train: list[str], iteration: int, config: RLConfig) -> dict:
    """K samples of this iteration's prompts with the current policy, rewarded (resumes a partial buffer)."""
    cfg, run_dir = config.rollout, str(config.run_dir)
    prompts = iteration_prompts(prompts_of(config, train), iteration, cfg.prompts, config.seed)
    buffer = iter_dir(run_dir, iteration) / "buffer.jsonl"
    with scorer_of(config) as scorer, progress_bar(
            cfg.prompts * cfg.k, f"rollout {iteration}: {cfg.prompts} prompts x {cfg.k}", "sample") as bar:
        stats = run_rollout(policy, prompts, buffer, cfg, scorer, seed=config.seed * 100_003 + iteration,
                            checkpoint=policy, on_progress=bar)
    return {"buffer": str(buffer), **stats}


@task(name="rl-update", retries=1, retry_condition_fn=crashed, **HOOKS)  # a killed update resumes
def rl_update(policy: str, buffer: str, iteration: int, config: RLConfig, reference: str,
              previous: str | None = None) -> dict:
    """The iteration's update (GRPO family or PPO); the new policy is `iter-<i>/update/model`.
    `reference`: the starting policy (after the warmup), what the KL terms hold the policy to.
    `previous`: the update dir whose optimizer moments (critic, KL coefficient) carry over (default:
    the previous iteration's; promotion's roll-back to the champion passes the champion's)."""
    run_dir = str(config.run_dir)
    out = iter_dir(run_dir, iteration) / "update"
    if not is_complete(out):  # AdamW's moments (PPO: the critic, the KL coefficient) carry over
        job = UpdateJob(policy_dir=policy, buffer=buffer, update_dir=str(out), update=config.update,
                        seed=config.seed + iteration, reference_dir=reference, reward_model=config.reward_model,
                        previous=previous or str(iter_dir(run_dir, iteration - 1) / "update"),
                        max_tokens=config.rollout.max_tokens)
        stage = f"rl-update {iteration}"
        run_in_subprocess(job, CallbackList(ProgressBar(stage), PrefectProgress(stage, Path(run_dir).name),
                                            stage_callback(stage, run_dir)))
    return {"checkpoint": str(out / "model"), **read_manifest(out, "rl-update")["metrics"]}


@task(name="rl-eval", **HOOKS)
def rl_eval(checkpoint: str, test: list[str], iteration: int, config: RLConfig) -> dict:
    """The new policy's greedy answers to the first `eval_prompts` held-out prompts, rewarded."""
    out = iter_dir(str(config.run_dir), iteration) / "eval.json"
    if not out.exists():
        n = config.eval_prompts
        prompts = prompts_of(config, test)[:n] if n else []
        if prompts:
            with scorer_of(config) as scorer:
                result = greedy_eval(checkpoint, prompts, config.eval_max_tokens, scorer)
        else:
            result = {"mean_reward": None, "accuracy": None, "n": 0}
        out.parent.mkdir(parents=True, exist_ok=True)  # iteration 0 (the starting policy) has no rollout dir
        write_json(out, result)
    return json.loads(out.read_text())


@task(name="rl-commit", **HOOKS)
def rl_commit(run_dir: str, iteration: int, checkpoint: str, metrics: dict) -> dict:
    """Move the run's state on to this iteration; reward history as artifacts."""
    state = RLState(run_dir)
    state.commit(iteration, checkpoint, metrics)
    name = Path(run_dir).name
    cols = ("iteration", "mean_reward", "accuracy", "eval_mean_reward", "eval_accuracy", "kl", "clip_fraction",
            "response_tokens", "truncated", "grad_norm", "zero_variance_groups", "judge_failures")
    table = [{c: (round(h[c], 4) if isinstance(h.get(c), float) else h.get(c)) for c in cols} for h in state.history]
    create_table_artifact(table=table, key=artifact_key(name, "reward-history"),
                          description="RL iterations: rollout reward and accuracy, held-out greedy reward and accuracy")
    create_markdown_artifact(key=artifact_key(name, "reward-chart"), markdown=_chart(state.history))
    return {"iteration": iteration, "checkpoint": checkpoint, "metrics": metrics, "history": state.history}


def _chart(history: list[dict]) -> str:
    """Mean rollout reward and held-out greedy accuracy by iteration, as a PNG the UI renders."""
    series = {"rollout mean reward": [(h["iteration"], h["mean_reward"]) for h in history if h.get("mean_reward") is not None],
              "held-out mean reward": [(h["iteration"], h["eval_mean_reward"]) for h in history
                                       if h.get("eval_mean_reward") is not None],
              "held-out accuracy": [(h["iteration"], h["eval_accuracy"]) for h in history
                                    if h.get("eval_accuracy") is not None]}
    png = line_chart({k: v for k, v in series.items() if v}, title="RL iterations", xlabel="iteration",
                     ylabel="reward / accuracy")
    last = history[-1]
    acc = last.get("eval_accuracy")
    return (f"### reward history\n\n{markdown_image(png, 'reward history')}\n\n"
            f"iteration {last['iteration']}: mean reward {last.get('mean_reward') or 0:.3f}, held-out mean reward "
            f"{last.get('eval_mean_reward') or 0:.3f}" + ("" if acc is None else f", held-out accuracy {acc:.1%}") + "\n")
