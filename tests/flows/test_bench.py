"""The `bench` and `eval` flows on their own, the way users start them: `mlxflow serve` +
`prefect deployment run bench/<name>` from another shell, and `mlxflow run eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mlxcore.config import BENCH_SUITES
from tests.conftest import hf_model_dir, run_deployment

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_serve_then_deployment_run_bench_puts_checkpoint_endpoint_and_random_side_by_side(tmp_path, mlx_lm_server):
    url, model = mlx_lm_server  # the same model dir is benched as a checkpoint too
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "bench-pair.yaml").write_text(yaml.safe_dump({
        "name": "pair", "out_dir": str(tmp_path / "runs"), "examples": 5, "max_tokens": 12,
        "targets": [{"kind": "checkpoint", "path": str(model), "name": "ours"},
                    {"kind": "openai", "url": url, "model": "default_model", "name": "served", "workers": 2},
                    {"kind": "random"}]}))
    done = run_deployment("bench/pair", [], config_dir=configs)
    assert done.returncode == 0 and "Completed" in done.stdout, done.stdout + done.stderr

    run = tmp_path / "runs" / "pair"
    [report_dir] = [p for p in run.iterdir() if p.name.startswith("bench-report-")]
    report = json.loads((report_dir / "report.json").read_text())
    assert report["targets"] == ["ours", "served", "random"]
    assert set(report["suites"]) == set(BENCH_SUITES) and all(len(v) == 3 for v in report["suites"].values())
    for label in ("ours", "served", "random"):
        assert report["overall"][label]["n"] == 5 * len(BENCH_SUITES)
    # the same weights answer the same through mlx-lm in batches and through the server, one by one
    answers = {}
    for d in run.iterdir():
        if d.name.startswith("bench-") and not d.name.startswith("bench-report-"):
            label = json.loads((d / "manifest.json").read_text())["config"]["label"]
            answers[label] = [json.loads(line) for line in open(d / "answers.jsonl")]
    ours, served = answers["ours"], answers["served"]
    assert [r["id"] for r in ours] == [r["id"] for r in served]
    # (mlx-lm's batch decode keeps the first token's leading space; the server's stream drops it)
    assert [r["reply"].strip() for r in ours] == [r["reply"].strip() for r in served]
    assert len({r["reply"] for r in ours}) == 1 and [r["correct"] for r in ours] == [r["correct"] for r in served]
    assert report["overall"]["ours"]["tok_per_s"] > 0 and report["overall"]["served"]["tok_per_s"] > 0
    assert (report_dir / "report.md").read_text().startswith("### bench pair")


def test_eval_flow_alone_tokenizes_with_the_checkpoints_tokenizer_and_reports_loss(tmp_path, small_data):
    from flows.cli import main
    from mlxcore.data import pretokenize
    from mlxcore.bench.perplexity import loss_ppl

    model = hf_model_dir(tmp_path / "model", small_data["tok"])
    val = small_data["raw"] / "sft" / "val.jsonl"
    code = main(["run", "eval", "--set", f"checkpoint={model}", "--set", f"data=[{val}]", "--set", f"out_dir={tmp_path}",
                 "--set", "batch_size=8", "--set", "seq_len=96"])
    assert code == 0
    [metrics] = [json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "eval").iterdir()
                 if d.name.startswith("eval-")]
    # the same number as tokenizing the file by hand and calling the library
    pretokenize.pretokenize({"train": [], "val": [val]}, model, "sft", tmp_path / "by-hand", max_tokens=97)
    direct = loss_ppl(model, tmp_path / "by-hand", "val", 8, 96)
    assert metrics["tokens"] == direct["tokens"] > 0
    assert metrics["loss"] == pytest.approx(direct["loss"], rel=1e-5)
    assert abs(metrics["loss"] - metrics["uniform_loss"]) < 0.5  # an untrained model: about ln(V)


def test_eval_of_a_missing_checkpoint_says_how_to_make_one(tmp_path, capsys):
    from flows.cli import main

    code = main(["run", "eval", "--set", f"checkpoint={tmp_path / 'nothing'}", "--set", f"out_dir={tmp_path}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "is not a local model dir" in err and "mlxflow run pipeline" in err
    assert not (tmp_path / "eval").exists() or not any(Path(tmp_path / "eval").iterdir())


def test_deploy_to_a_work_pool_and_a_worker_runs_the_bench(tmp_path, small_data):
    """Other machines: `mlxflow deploy --pool`, a `prefect worker start --pool` there, then a run."""
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from tests.conftest import REPO, stop_group

    model = hf_model_dir(tmp_path / "model", small_data["tok"])
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "bench-pooled.yaml").write_text(yaml.safe_dump({
        "name": "pooled", "out_dir": str(tmp_path / "runs"), "suites": ["copy", "sort"], "examples": 3,
        "max_tokens": 8, "targets": [{"kind": "checkpoint", "path": str(model), "name": "ours"}, {"kind": "random"}]}))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}

    def cli(*args, **kw):
        return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300, **kw)

    assert cli("prefect", "work-pool", "create", "cpu-pool", "--type", "process").returncode == 0
    deployed = cli("flows.cli", "deploy", "--pool", "cpu-pool", str(configs))
    assert deployed.returncode == 0 and "deployments on work pool 'cpu-pool'" in deployed.stdout, deployed.stderr
    missing = cli("flows.cli", "deploy", "--pool", "no-such-pool", str(configs))
    assert missing.returncode == 1 and "prefect work-pool create no-such-pool" in missing.stderr
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu-pool"], cwd=tmp_path,
                              env=env, stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        done = cli("prefect", "deployment", "run", "bench/pooled", "--watch", "--watch-timeout", "240")
    finally:
        stop_group(worker)
    worker_log = (tmp_path / "worker.log").read_text()[-3000:]
    assert done.returncode == 0 and "Completed" in done.stdout, done.stdout + done.stderr + worker_log
    [report] = (tmp_path / "runs" / "pooled").glob("bench-report-*/report.json")
    assert json.loads(report.read_text())["targets"] == ["ours", "random"]


def test_bench_of_a_missing_checkpoint_fails_naming_it_and_writes_nothing(tmp_path, capsys):
    from flows.cli import main

    code = main(["run", "bench", "--set", f"out_dir={tmp_path}", "--set",
                 f"targets=[{{kind: checkpoint, path: {tmp_path / 'gone'}, name: gone}}, {{kind: random}}]"])
    assert code == 1
    err = capsys.readouterr().err
    assert "bench target 'gone'" in err and "not a local model dir" in err
    assert not list((tmp_path / "bench").glob("bench-report-*"))
