"""Deployments of the flows, served by one process: `mlxflow serve` (or `python -m flows.serve`).

  pipeline/demo       the embedded defaults (what `mlxflow run pipeline` runs)
  pipeline/<stem>     one per configs/<stem>.yaml that is a pipeline config
  distill/default     the embedded defaults: Ollama's qwen3:0.6b on 127.0.0.1:11434
  distill/<name>      one per configs/distill-<name>.yaml
  rl/<name>           one per configs/rl-<name>.yaml: one RL iteration per run, on its
                      `schedule_minutes` interval, never two at once (later ones wait)
  bench/demo          the demo pipeline's model (runs/demo/model) vs the uniform-random baseline
  bench/<name>        one per configs/bench-<name>.yaml (checkpoints, Ollama, OpenAI endpoints)
  eval/demo           held-out loss / perplexity of runs/demo/model on the demo's SFT val split
  eval/<name>         one per configs/eval-<name>.yaml
  preference/<name>   one per configs/preference-<name>.yaml (DPO, IPO, ORPO, KTO ... on a model dir)
  reward-model/<name> one per configs/reward-<name>.yaml
  export/demo         runs/demo/model as GGUF q8_0 + Modelfile, gated on llama.cpp parity
  export/<name>       one per configs/export-<name>.yaml
  vlm/<name>          one per configs/vlm-<name>.yaml (vision-language: data, preprocess, train, vlm-eval, bench)

Every deployment takes `overrides` too (KEY=VALUE settings on top of its config):

  prefect deployment run distill/default -p 'overrides=["target_rows=500"]'

On more machines, the same deployments go to a work pool instead (`mlxflow deploy --pool NAME`):
their entrypoints are module paths (`flows.pipeline.pipeline`), so any worker with mlxflow
installed runs them (`prefect worker start --pool NAME`), no image or code storage needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from mlxcore.config import (BenchRunConfig, ConfigError, DistillConfig, EvalConfig, ExportRunConfig, PipelineConfig,
                            PreferenceRunConfig, RewardModelRunConfig, RLConfig, VLMRunConfig, load_config)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _params(path: Path, cls) -> dict:
    return {"config": load_config(path, cls=cls).model_dump(mode="json")}


def deployments(config_dir: str | Path = CONFIGS, **common) -> list:
    """Every deployment, configs in `config_dir` validated first (a bad one names its file and line).

    `common`: more `Flow.to_deployment` arguments for all of them (work pool, entrypoint type).
    """
    from flows.bench import bench, eval_flow
    from flows.compare import compare
    from flows.distill import distill
    from flows.export import export
    from flows.pipeline import pipeline
    from flows.preference import preference, reward_model
    from flows.rl import rl
    from flows.vlm import vlm

    out = [pipeline.to_deployment(name="demo", description="The whole pipeline on its embedded defaults.", **common),
           distill.to_deployment(name="default", description="Distill from Ollama's qwen3:0.6b on 127.0.0.1:11434.",
                                 **common),
           bench.to_deployment(name="demo", description="runs/demo/model vs the uniform-random baseline.", **common),
           eval_flow.to_deployment(name="demo", description="runs/demo/model on the demo's held-out SFT split.",
                                   **common),
           export.to_deployment(name="demo", description="runs/demo/model as GGUF q8_0 + Modelfile, parity-gated.",
                                parameters={"config": ExportRunConfig(model="runs/demo/model").model_dump(mode="json")},
                                **common),
           compare.to_deployment(name="runs", description="Runs side by side: give `runs` (run dirs or records).",
                                 **common)]
    by_prefix = {"distill-": (distill, DistillConfig), "bench-": (bench, BenchRunConfig), "eval-": (eval_flow, EvalConfig),
                 "preference-": (preference, PreferenceRunConfig), "reward-": (reward_model, RewardModelRunConfig),
                 "export-": (export, ExportRunConfig), "vlm-": (vlm, VLMRunConfig)}
    for path in sorted(Path(config_dir).glob("*.yaml")):
        prefix = next((p for p in by_prefix if path.stem.startswith(p)), None)
        if path.stem.startswith("rl-"):
            out.append(_rl_deployment(rl, path, **common))
        elif prefix:
            flow, cls = by_prefix[prefix]
            out.append(flow.to_deployment(name=path.stem.removeprefix(prefix), parameters=_params(path, cls),
                                          description=f"configs/{path.name}", **common))
        elif "base_model" not in (yaml.safe_load(path.read_text()) or {}) and path.stem != "demo":  # finetune configs need a model
            out.append(pipeline.to_deployment(name=path.stem, parameters=_params(path, PipelineConfig),
                                              description=f"configs/{path.name}", **common))
    return out


def _rl_deployment(flow, path: Path, **common):
    """One RL iteration per run; a run that comes due while another runs waits for it (ENQUEUE)."""
    from datetime import timedelta

    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    config = load_config(path, cls=RLConfig)
    minutes = config.schedule_minutes
    return flow.to_deployment(
        name=path.stem.removeprefix("rl-"), parameters={"config": config.model_dump(mode="json")},
        interval=timedelta(minutes=minutes) if minutes else None, description=f"configs/{path.name}",
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE), **common)


def serve(config_dir: str | Path = CONFIGS, limit: int | None = None) -> None:
    """Register the deployments with the Prefect API and run their flow runs until interrupted."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(config_dir), limit=limit)


def deploy(pool: str, config_dir: str | Path = CONFIGS) -> list:
    """Register the same deployments on work pool `pool`; its workers run them (returns their ids)."""
    from prefect import deploy as prefect_deploy
    from prefect.deployments.runner import EntrypointType

    return prefect_deploy(*deployments(config_dir, entrypoint_type=EntrypointType.MODULE_PATH),
                          work_pool_name=pool, build=False, push=False, print_next_steps_message=False,
                          ignore_warnings=True)


def main(argv: list[str] | None = None) -> int:
    try:
        serve(*(argv if argv is not None else sys.argv[1:])[:1])
    except ConfigError as e:
        print(f"mlxflow serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
