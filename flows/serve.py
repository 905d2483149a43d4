"""Deployments of the flows, served by one process: `mlxflow serve` (or `python -m flows.serve`).

  pipeline/demo       the embedded defaults (what `mlxflow run pipeline` runs)
  pipeline/<stem>     one per configs/<stem>.yaml that is a pipeline config
  distill/default     the embedded defaults: Ollama's qwen3:0.6b on 127.0.0.1:11434
  distill/<name>      one per configs/distill-<name>.yaml
  rl-gsm8k/<name>     one per configs/rl-<name>.yaml: one GRPO iteration per run, on its
                      `schedule_minutes` interval, never two at once (later ones wait)

Every deployment takes `overrides` too (KEY=VALUE settings on top of its config):

  prefect deployment run distill/default -p 'overrides=["target_rows=500"]'
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from mlxcore.config import ConfigError, DistillConfig, PipelineConfig, RLConfig, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _params(path: Path, cls) -> dict:
    return {"config": load_config(path, cls=cls).model_dump(mode="json")}


def deployments(config_dir: str | Path = CONFIGS) -> list:
    """Every deployment, configs in `config_dir` validated first (a bad one names its file and line)."""
    from flows.distill import distill
    from flows.pipeline import pipeline
    from flows.rl_gsm8k import rl_gsm8k

    out = [pipeline.to_deployment(name="demo", description="The whole pipeline on its embedded defaults."),
           distill.to_deployment(name="default", description="Distill from Ollama's qwen3:0.6b on 127.0.0.1:11434.")]
    for path in sorted(Path(config_dir).glob("*.yaml")):
        if path.stem.startswith("rl-"):
            out.append(_rl_deployment(rl_gsm8k, path))
        elif path.stem.startswith("distill-"):
            out.append(distill.to_deployment(name=path.stem.removeprefix("distill-"), parameters=_params(path, DistillConfig),
                                             description=f"configs/{path.name}"))
        elif "base_model" not in (yaml.safe_load(path.read_text()) or {}) and path.stem != "demo":  # finetune configs need a model
            out.append(pipeline.to_deployment(name=path.stem, parameters=_params(path, PipelineConfig),
                                              description=f"configs/{path.name}"))
    return out


def _rl_deployment(flow, path: Path):
    """One GRPO iteration per run; a run that comes due while another runs waits for it (ENQUEUE)."""
    from datetime import timedelta

    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    config = load_config(path, cls=RLConfig)
    minutes = config.schedule_minutes
    return flow.to_deployment(
        name=path.stem.removeprefix("rl-"), parameters={"config": config.model_dump(mode="json")},
        interval=timedelta(minutes=minutes) if minutes else None, description=f"configs/{path.name}",
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE))


def serve(config_dir: str | Path = CONFIGS, limit: int | None = None) -> None:
    """Register the deployments with the Prefect API and run their flow runs until interrupted."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(config_dir), limit=limit)


def main(argv: list[str] | None = None) -> int:
    try:
        serve(*(argv if argv is not None else sys.argv[1:])[:1])
    except ConfigError as e:
        print(f"mlxflow serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
