"""RL on any prompt set, one iteration per flow run: rollout -> update -> eval -> commit, continuing
the last run (state in <out_dir>/<name>/state.json). GSM8K GRPO is `configs/rl-gsm8k.yaml`."""

from __future__ import annotations

from prefect import flow

from mlxcore.config import BenchTarget, RLConfig, TokenizerConfig, with_overrides
from mlxcore.data import records
from mlxcore.rl.prompts import warmup_source
from flows.export import ship
from tasks.bench import run_bench
from tasks.data import download, pretokenize, tokenizer
from tasks.rl import _files, rl_commit, rl_eval, rl_rollout, rl_state, rl_update, scorer_of
from tasks.train import model_card, publish, sft


def _first_row(files: list[str]) -> dict | None:
    for path in _files(files):
        for chunk, _ in records.read_chunks(path):
            for lineno, payload in records.chunk_items(chunk):
                return records.decode_row(str(path), lineno, payload)
    return None


@flow(name="rl")
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
    policy = state["checkpoint"] or start
    it = state["iteration"] + 1
    rolled = rl_rollout(policy, train, it, config)
    updated = rl_update(policy, rolled["buffer"], it, config, start)
    held_out = rl_eval(updated["checkpoint"], test, it, config)
    rollout_stats = ("mean_reward", "accuracy", "rewards", "response_tokens", "truncated", "judge_failures")
    metrics = {**updated, **{k: rolled.get(k) for k in rollout_stats}, "rollout_tok_per_s": rolled.get("tok_per_s"),
               "eval_mean_reward": held_out["mean_reward"], "eval_accuracy": held_out["accuracy"],
               "eval_rewards": held_out.get("rewards")}
    if config.bench is not None:  # the new policy on the bench suites, beside the config's targets
        ours = BenchTarget(kind="checkpoint", path=updated["checkpoint"], name=f"iter-{it}")
        metrics["bench"] = run_bench([ours], config.bench, run, title=f"bench {config.name} iteration {it}")["overall"]
    committed = rl_commit(run, it, updated["checkpoint"], metrics)
    model_card(updated["checkpoint"], {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, run,
               inputs=train, base=config.policy)
    publish(updated["checkpoint"], run)
    if config.export is not None:  # each iteration's policy, shipped (cached per checkpoint)
        shipped = ship(config.export, updated["checkpoint"], run, f"iter-{it}")
        shipped.pop("targets")
        committed = committed | {"export": shipped}
    return committed
