"""GSM8K GRPO, one iteration per flow run: rollout -> update -> eval, continuing the last run."""

from __future__ import annotations

from prefect import flow

from mlxcore.config import BenchTarget, RLConfig, TokenizerConfig, with_overrides
from flows.export import ship
from tasks.bench import run_bench
from tasks.data import download, pretokenize, tokenizer
from tasks.rl import rl_commit, rl_eval, rl_rollout, rl_state, rl_update
from tasks.train import publish, sft


@flow(name="rl-gsm8k")
def rl_gsm8k(config: RLConfig, overrides: list[str] = []) -> dict:
    """`overrides`: KEY=VALUE settings on top of `config`, e.g. ["rollout.k=4", "update.lr=1e-6"]."""
    config = with_overrides(config, overrides)
    config.check_policy()
    run = str(config.run_dir)
    train = [download(spec, "sft", config.max_download_mb, run)["path"] for spec in config.train]
    test = [download(spec, "sft", config.max_download_mb, run)["path"] for spec in config.test]
    state = rl_state(run)
    if state["iteration"] >= config.iterations:
        return {"done": True, **state}
    policy = state["checkpoint"] or config.policy
    if state["checkpoint"] is None and config.warmup is not None:  # SFT on GSM8K's worked answers first
        tok = tokenizer(TokenizerConfig(path=config.policy), None, {"train": train, "val": test}, {}, {}, run)
        fmt = {"format": "gsm8k", "system_prompt": config.system_prompt}
        shards = pretokenize({"train": train, "val": test}, tok["path"], "sft", fmt, config.warmup.seq_len + 1, 0, run)
        policy = sft(shards["path"], tok["path"], config.policy, config.warmup, run)["checkpoint"]
    it = state["iteration"] + 1
    rolled = rl_rollout(policy, train, it, config.rollout, config.system_prompt, config.seed, run)
    updated = rl_update(policy, rolled["buffer"], it, config.update, config.seed, config.policy, run)
    held_out = rl_eval(updated["checkpoint"], test, config.eval_prompts, config.eval_max_tokens,
                       config.system_prompt, it, run)
    metrics = {**updated, "rollout_tok_per_s": rolled.get("tok_per_s"), "eval_accuracy": held_out["accuracy"]}
    if config.bench is not None:  # the new policy on the bench suites, beside the config's targets
        ours = BenchTarget(kind="checkpoint", path=updated["checkpoint"], name=f"iter-{it}")
        metrics["bench"] = run_bench([ours], config.bench, run, title=f"bench {config.name} iteration {it}")["overall"]
    committed = rl_commit(run, it, updated["checkpoint"], metrics)
    publish(updated["checkpoint"], run)
    if config.export is not None:  # each iteration's policy, shipped (cached per checkpoint)
        shipped = ship(config.export, updated["checkpoint"], run, f"iter-{it}")
        shipped.pop("targets")
        committed = committed | {"export": shipped}
    return committed
