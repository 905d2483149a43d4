"""RL on any prompt set, one iteration per flow run: rollout -> update -> eval -> commit, continuing
the last run (state in <out_dir>/<name>/state.json). GSM8K GRPO is `configs/rl-gsm8k.yaml`."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from mlxcore.config import BenchTarget, RLConfig, TokenizerConfig, with_overrides
from mlxcore.data import records
from mlxcore.rl.prompts import warmup_source
from flows.export import ship
from tasks.bench import run_bench
from tasks.data import download, pretokenize, tokenizer
from tasks.report import reported
from tasks.rl import _files, rl_commit, rl_eval, rl_rollout, rl_state, rl_update, scorer_of
from tasks.promotion import bench_outcomes, metric_of, promote
from tasks.train import model_card, publish, sft
from mlxcore.tracking import promotion


def _first_row(files: list[str]) -> dict | None:
    for path in _files(files):
        for chunk, _ in records.read_chunks(path):
            for lineno, payload in records.chunk_items(chunk):
                return records.decode_row(str(path), lineno, payload)
    return None


@flow(name="rl")
@reported
def rl(config: RLConfig, overrides: list[str] = []) -> dict:
    """`overrides`: KEY=VALUE settings on top of `config`, e.g. ["rollout.k=4", "update.loss=dapo"]."""
    config = with_overrides(config, overrides)
    config.check_policy()
    scorer_of(config).close()  # unknown reward names, a broken rewards file: fail before any work
    run = str(config.run_dir)
    train = [download(spec, "sft", config.max_download_mb, run)["path"] for spec in config.train]
    test = [download(spec, "sft", config.max_download_mb, run)["path"] for spec in config.test]
    state = rl_state(run)
    if state["iteration"] >= config.iterations:
        return {"done": True, **state}
    start = config.policy  # the first policy, and the reference of the KL terms
    if config.warmup is not None:  # SFT on the reference answers first (cached: later iterations hit)
        tok = tokenizer(TokenizerConfig(path=config.policy), None, {"train": train, "val": test}, {}, {}, run)
        fmt = warmup_source(config.data.format, config.data.columns, _first_row(train)) | {
            "system_prompt": config.system_prompt}
        shards = pretokenize({"train": train, "val": test}, tok["path"], "sft", fmt, config.warmup.seq_len + 1, 0, run)
        start = sft(shards["path"], tok["path"], config.policy, config.warmup, run)["checkpoint"]
    policy, previous, promo = state["checkpoint"] or start, None, config.promotion
    it = state["iteration"] + 1
    if promo.enabled:  # the policy given (before any warmup) is the first champion, "iteration 0"
        metric = metric_of(promo, config.bench is not None)
        if promotion.Promotion(run).decided(0) is None:
            promote(run, 0, config.policy, _outcomes(config, metric, config.policy, 0, test), promo, config.name)
        policy, previous = _start_from(run, promo.start_from, policy, start)
    rolled = rl_rollout(policy, train, it, config)
    updated = rl_update(policy, rolled["buffer"], it, config, start, previous)
    held_out = rl_eval(updated["checkpoint"], test, it, config)
    rollout_stats = ("mean_reward", "accuracy", "rewards", "response_tokens", "truncated", "judge_failures")
    metrics = {**updated, **{k: rolled.get(k) for k in rollout_stats}, "rollout_tok_per_s": rolled.get("tok_per_s"),
               "eval_mean_reward": held_out["mean_reward"], "eval_accuracy": held_out["accuracy"],
               "eval_rewards": held_out.get("rewards")}
    bench = None
    if config.bench is not None:  # the new policy on the bench suites, beside the config's targets
        ours = BenchTarget(kind="checkpoint", path=updated["checkpoint"], name=f"iter-{it}")
        bench = run_bench([ours], config.bench, run, title=f"bench {config.name} iteration {it}")
        metrics["bench"] = bench["overall"]
    if promo.enabled:  # <run>/model moves only to a policy better than the champion's
        outcomes = (bench_outcomes(bench, f"iter-{it}") if metric == "bench"
                    else promotion.eval_outcomes(held_out.get("per_prompt") or []))
        decision = promote(run, it, updated["checkpoint"], outcomes, promo, config.name, {"started_from": policy})
        metrics |= {"promoted": decision["promoted"], "promotion": decision["reason"],
                    "champion": decision["champion_key"]}
    committed = rl_commit(run, it, updated["checkpoint"], metrics)
    model_card(updated["checkpoint"], {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, run,
               inputs=train, base=config.policy)
    if not promo.enabled:
        publish(updated["checkpoint"], run)
    if config.export is not None:  # each iteration's policy, shipped (cached per checkpoint)
        shipped = ship(config.export, updated["checkpoint"], run, f"iter-{it}")
        shipped.pop("targets")
        committed = committed | {"export": shipped}
    return committed


def _outcomes(config: RLConfig, metric: str, checkpoint: str, iteration: int, test: list[str]) -> dict:
    """Per-question outcomes of `checkpoint` (the starting policy: iteration 0) for the promotion gate."""
    if metric == "bench":
        ours = BenchTarget(kind="checkpoint", path=checkpoint, name=f"iter-{iteration}")
        bench = run_bench([ours], config.bench, str(config.run_dir), title=f"bench {config.name} iteration {iteration}")
        return bench_outcomes(bench, f"iter-{iteration}")
    return promotion.eval_outcomes(rl_eval(checkpoint, test, iteration, config).get("per_prompt") or [])


def _start_from(run: str, rule: str, latest: str, start: str) -> tuple[str, str | None]:
    """The policy the next iteration starts from, and the update dir whose optimizer state carries over
    (None: the previous iteration's, the default). `auto`: the latest policy, unless its iteration was
    significantly worse than the champion or a suite regressed past the tolerance: then the champion
    (iteration 0, the policy given: the starting policy after the warmup, `start`)."""
    book = promotion.Promotion(run)
    last = book.history[-1] if book.history else None
    champion = book.champion
    if champion is None or rule == "latest" or (rule == "auto" and not (last and last.get("worse"))):
        return latest, None
    if champion["key"] == 0:  # back to the start: fresh optimizer moments
        return start, str(Path(run) / "no-previous-update")
    return champion["checkpoint"], str(Path(champion["checkpoint"]).parent)
