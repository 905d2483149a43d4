"""Preference training: data -> pretokenize pairs -> reference log-probs -> train -> eval -> bench.

`align()` is the stage sequence the `preference` flow runs and the `pipeline` and `distill` flows
end with (their `preference:` section); `reward_model` trains a scalar-head reward model.
"""

from __future__ import annotations

from prefect import flow

from mlxcore.config import (BenchTarget, ConfigError, PreferenceRunConfig, PreferenceStage, RewardModelRunConfig,
                            TokenizerConfig, with_overrides)
from mlxcore.models.layout import is_model_dir
from mlxcore.preference.losses import USES_REFERENCE
from flows.export import ship
from tasks.bench import run_bench
from tasks.data import tokenizer
from tasks.report import reported
from tasks.preference import (evaluate_preference, pretokenize, reference, report, sources, train_preference,
                              train_reward)
from tasks.train import model_card, publish


def align(stage: PreferenceStage, init_from: str, tokenizer_dir: str, run: str, max_download_mb: float = 2048,
          inputs=None) -> dict:
    """Preference-train `init_from` as `stage` says; `inputs` (e.g. distill's pairs) replace stage.data."""
    if inputs is None:
        inputs, fmt = sources(stage.data, stage.synthetic, max_download_mb, run)
    else:  # pairs another stage wrote (distill's): held out by row number
        fmt = {"val_fraction": stage.pairs_val_fraction}
    data = pretokenize(inputs, tokenizer_dir, fmt, stage.max_tokens(), run)
    objective, cfg = stage.objective, stage.train
    # computed once (another beta / lr / objective reuses it); read in training by the objectives that
    # use a reference, and by the held-out metrics of every objective (the gain over the start)
    ref = reference(init_from, data["path"], cfg.seq_len, stage.eval_batch_size, run)["path"]
    trained = train_preference(data["path"], tokenizer_dir, init_from, ref if objective.name in USES_REFERENCE else None,
                               objective, cfg, run)
    evals = [evaluate_preference(label, ckpt, data["path"], ref, objective, cfg.seq_len, stage.eval_batch_size, run)
             for label, ckpt in (("start", init_from), (objective.name, trained["checkpoint"]))]
    report(evals, run)
    return {"checkpoint": trained["checkpoint"], "train": trained, "data": data, "reference": ref,
            "eval": {"start": evals[0], "trained": evals[1]}}


def _start(config, overrides: list[str]):
    """(config with the overrides, run dir, tokenizer stage) of a flow that starts from `init_from`."""
    config = with_overrides(config, overrides)
    if not is_model_dir(config.init_from):
        raise ConfigError(f"init_from: {config.init_from!r} is not a local model dir (no config.json); set "
                          "init_from=/path/to/model (e.g. runs/demo/model after `mlxflow run pipeline`)")
    run = str(config.run_dir)
    return config, run, tokenizer(TokenizerConfig(path=config.init_from), None, None, {}, {}, run)


@flow(name="preference")
@reported
def preference(config: PreferenceRunConfig, overrides: list[str] = []) -> dict:
    """`overrides`: KEY=VALUE settings on top of `config`, e.g. ["objective.name=ipo", "objective.beta=0.5"]."""
    config, run, tok = _start(config, overrides)
    aligned = align(config, config.init_from, tok["path"], run, config.max_download_mb)
    model = publish(aligned["checkpoint"], run)
    shipped, exports = None, []
    if config.export is not None:
        shipped = ship(config.export, aligned["checkpoint"], run, config.objective.name)
        exports = shipped.pop("targets")
    bench = None
    if config.bench is not None:  # the trained model beside the one it started from
        own = [BenchTarget(kind="checkpoint", path=config.init_from, name="start"),
               BenchTarget(kind="checkpoint", path=aligned["checkpoint"], name=config.objective.name), *exports]
        bench = run_bench(own, config.bench, run, title=f"bench {config.name}: {config.objective.name} vs start")
    model_card(aligned["checkpoint"], {"eval": aligned["eval"], "bench": bench}, run)
    return aligned | {"model": model, "bench": bench, "export": shipped}


@flow(name="reward-model")
def reward_model(config: RewardModelRunConfig, overrides: list[str] = []) -> dict:
    """`overrides`: KEY=VALUE settings on top of `config`, e.g. ["train.steps=400", "margin=0.5"]."""
    config, run, tok = _start(config, overrides)
    inputs, fmt = sources(config.data, config.synthetic, config.max_download_mb, run)
    data = pretokenize(inputs, tok["path"], fmt, config.max_tokens(), run)
    if data["rows"] == "kto":
        raise ConfigError("a reward model trains on pairs or scored rows; the data holds KTO rows")
    trained = train_reward(data["path"], tok["path"], config.init_from, config.train, config.margin,
                           config.dense_weight, run)
    held_out = evaluate_preference("reward-model", trained["checkpoint"], data["path"], None, None,
                                   config.train.seq_len, config.eval_batch_size, run)
    report([held_out], run)
    model_card(trained["checkpoint"], {"eval": {"reward-model": held_out}}, run)
    return {"checkpoint": trained["checkpoint"], "train": trained, "data": data, "eval": held_out,
            "model": publish(trained["checkpoint"], run)}
