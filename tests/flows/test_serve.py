"""What `mlxflow serve` / `mlxflow deploy` register from the repo's configs (no server needed)."""

from __future__ import annotations

import pytest

from mlxcore.config import ConfigError
from tests.conftest import REPO


def test_serve_registers_every_flow_the_readme_lists():
    from flows.serve import deployments

    deps = {f"{d.flow_name}/{d.name}": d for d in deployments(REPO / "configs")}
    assert {"pipeline/demo", "pipeline/smoke", "distill/default", "distill/qwen3", "rl/gsm8k", "bench/demo",
            "bench/qwen3", "eval/demo", "preference/sort", "preference/minimind", "reward-model/sort",
            "compare/runs", "vlm/demo"} <= set(deps)
    rl = deps["rl/gsm8k"]
    assert rl.schedules and rl.concurrency_limit == 1  # one GRPO iteration at a time, on an interval
    assert [t["kind"] for t in deps["bench/qwen3"].parameters["config"]["targets"]] == ["checkpoint", "ollama", "random"]


def test_deploy_uses_module_entrypoints_a_worker_can_import():
    from prefect.deployments.runner import EntrypointType

    from flows.serve import deployments

    deps = deployments(REPO / "configs", entrypoint_type=EntrypointType.MODULE_PATH)
    assert {d.entrypoint for d in deps} >= {"flows.pipeline.pipeline", "flows.bench.bench", "flows.bench.eval_flow",
                                            "flows.distill.distill", "flows.rl.rl"}


def test_a_bad_bench_config_names_its_file_and_key(tmp_path):
    from flows.serve import deployments

    (tmp_path / "bench-bad.yaml").write_text("name: x\ntargets:\n  - {kind: openai, model: m}\n")
    with pytest.raises(ConfigError, match=r"bench-bad.yaml:3: targets.0: .*openai target needs url"):
        deployments(tmp_path)
