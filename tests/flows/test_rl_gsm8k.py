"""The rl-gsm8k flow: GRPO iterations that learn, state that carries over, and a control run.

The task is synthetic single-step arithmetic in GSM8K's format ("What is 3 + 4?" -> "3 + 4 = 7
#### 7"); the policy is a fresh tiny model that the flow's SFT warmup teaches the format and
some of the sums, so RL has both right and wrong samples to learn from.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, DeploymentFilter, DeploymentFilterName
from prefect.settings import PREFECT_API_URL, temporary_settings

from bench.distill_throughput import free_port

from mlxcore.config import ModelConfig, RLConfig, TokenizerConfig
from mlxcore.rl.iteration import load_questions, run_rollout

from tests.conftest import REPO, stop_group

pytestmark = pytest.mark.usefixtures("prefect_server")


def _write(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n")


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
    """Train / test files and a fresh policy dir (random weights, a BPE trained on the sums)."""
    from mlxcore.models.checkpoint import save_model_dir
    from mlxcore.data import tokenizer
    from mlxcore.models.model import from_config, hf_config

    root = tmp_path_factory.mktemp("arith")
    _write(root / "train.jsonl", 4000, 0)
    _write(root / "test.jsonl", 200, 1)
    tok = tokenizer.load_or_train(TokenizerConfig(vocab_size=300), [
        {"kind": "sft", "inputs": {"train": [root / "train.jsonl"], "val": []}, "source": {"format": "gsm8k"}}], root / "tok")
    model = ModelConfig(preset="custom", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256)
    save_model_dir(root / "policy", from_config(hf_config(model, tok["vocab_size"], tok["special_ids"])),
                   hf_config(model, tok["vocab_size"], tok["special_ids"]), tokenizer_dir=root / "tok")
    return root


def rl_config(arithmetic, out, **over) -> RLConfig:
    cfg = {"name": "arith", "out_dir": str(out), "policy": str(arithmetic / "policy"),
           "train": [str(arithmetic / "train.jsonl")], "test": [str(arithmetic / "test.jsonl")], "system_prompt": None,
           "warmup": {"steps": 60, "batch_size": 32, "seq_len": 64, "lr": 3e-3, "warmup_steps": 5, "eval_every": 0,
                      "save_every": 0, "log_every": 20},
           "rollout": {"prompts": 128, "k": 8, "max_tokens": 16},
           "update": {"lr": 5e-5, "epochs": 4, "batch_size": 32},
           "iterations": 5, "eval_prompts": 64, "eval_max_tokens": 16}
    for key, value in over.items():
        cfg[key] = {**(cfg.get(key) or {}), **value} if isinstance(value, dict) else value
    return RLConfig.model_validate(cfg)


def held_out_reward(arithmetic, model_dir, tmp_path) -> float:
    """Mean reward of 4 samples (temperature 1) on 64 held-out questions, with a fixed seed."""
    questions = load_questions([arithmetic / "test.jsonl"])[:64]
    buf = tmp_path / f"held-{abs(hash(str(model_dir)))}.jsonl"
    return run_rollout(model_dir, questions, buf, rl_config(arithmetic, tmp_path).rollout.model_copy(update={"k": 4}),
                       seed=1234, checkpoint=str(model_dir))["mean_reward"]


def _iterate(config, n):
    from flows.rl_gsm8k import rl_gsm8k

    results = []
    for _ in range(n):
        state = rl_gsm8k(config, return_state=True)
        assert state.is_completed(), state.message
        results.append(state.result())
    return results


def test_five_grpo_iterations_raise_held_out_reward_by_20_points(arithmetic, tmp_path):
    config = rl_config(arithmetic, tmp_path)
    results = _iterate(config, 5)
    history = results[-1]["history"]
    assert [h["iteration"] for h in history] == [1, 2, 3, 4, 5]
    # each iteration started from the previous one's policy
    policies = [json.loads((tmp_path / "arith" / f"iter-{i:04d}" / "update" / "manifest.json").read_text())["config"]["policy"]
                for i in range(1, 6)]
    assert all(policies[i] == history[i - 1]["checkpoint"] for i in range(1, 5))
    start, end = held_out_reward(arithmetic, policies[0], tmp_path), held_out_reward(arithmetic, history[-1]["checkpoint"], tmp_path)
    print(f"held-out mean reward: warm policy {start:.3f} -> after 5 GRPO iterations {end:.3f}")
    assert end - start >= 0.20
    assert all(h["steps"] > 0 and h["zero_variance_groups"] < 128 for h in history)
    # a 6th run does nothing: the configured 5 iterations are done
    assert _iterate(config, 1)[0]["done"] is True
    with get_client(sync_client=True) as client:  # the reward history as a table and a chart in the UI
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
            "arith-reward-history", "arith-reward-chart"])))
    latest = {a.key: a for a in sorted(arts, key=lambda a: a.created)}
    table = latest["arith-reward-history"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [row["iteration"] for row in table] == [1, 2, 3, 4, 5]
    assert "reward history" in latest["arith-reward-chart"].data and "data:image/png;base64," in latest["arith-reward-chart"].data


def test_the_same_iterations_without_the_update_do_not_raise_it(arithmetic, tmp_path):
    config = rl_config(arithmetic, tmp_path, update={"epochs": 0})
    history = _iterate(config, 5)[-1]["history"]
    first = json.loads((tmp_path / "arith" / "iter-0001" / "update" / "manifest.json").read_text())["config"]["policy"]
    start, end = held_out_reward(arithmetic, first, tmp_path), held_out_reward(arithmetic, history[-1]["checkpoint"], tmp_path)
    print(f"held-out mean reward without updates: {start:.3f} -> {end:.3f}")
    assert all(h["steps"] == 0 for h in history) and end - start < 0.05


def _small(arithmetic, out, **over) -> RLConfig:
    base = {"warmup": None, "rollout": {"prompts": 8, "k": 4, "max_tokens": 8, "prompts_per_batch": 2},
            "update": {"lr": 1e-4, "epochs": 1, "batch_size": 16}, "eval_prompts": 8, "eval_max_tokens": 8}
    return rl_config(arithmetic, out, **{**base, **over})


@pytest.fixture
def prefect_server_with_services(tmp_path):
    """`prefect server start` as a user runs it (scheduler included; the test harness has none)."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    yield url
    stop_group(proc, signal.SIGTERM)


def test_scheduled_iterations_never_overlap_and_continue_each_other(arithmetic, tmp_path, prefect_server_with_services):
    """`mlxflow serve` + a schedule every 6 s: iterations come due while one runs; they wait."""



    url = prefect_server_with_services
    configs = tmp_path / "configs"
    configs.mkdir()
    cfg = _small(arithmetic, tmp_path, name="sched", schedule_minutes=0.1, iterations=2)
    (configs / "rl-sched.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_API_URL": url, "PYTHONPATH": str(REPO)}
    serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(configs)], cwd=REPO, env=env,
                             stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    runs, done, waited = [], [], set()
    try:
        deadline = time.time() + 400
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            while time.time() < deadline:
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["sched"])))
                waited |= {r.id for r in runs if r.state and r.state.name == "AwaitingConcurrencySlot"}
                running = [r for r in runs if r.state and r.state.is_running()]
                assert len(running) <= 1, [(r.name, r.state.name) for r in runs]  # never two at once
                done = [r for r in runs if r.state and r.state.is_completed() and r.start_time]
                if len(done) >= 3:
                    break
                time.sleep(0.5)
    finally:
        stop_group(serve)
    assert len(done) >= 3, ([(r.name, r.state.name) for r in runs], (tmp_path / "serve.log").read_text()[-3000:])
    spans = sorted((r.start_time, r.end_time) for r in done)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans  # never concurrent
    assert waited  # a run came due while another ran, and waited for its slot
    state = json.loads((tmp_path / "sched" / "state.json").read_text())
    assert state["iteration"] == 2 and [h["iteration"] for h in state["history"]] == [1, 2]  # the 3rd: done
    second = json.loads((tmp_path / "sched" / "iter-0002" / "update" / "manifest.json").read_text())
    assert second["config"]["policy"] == state["history"][0]["checkpoint"]  # the 2nd started from the 1st


def test_sigkill_mid_rollout_then_rerun_resumes_without_duplicates(arithmetic, tmp_path):



    cfg = _small(arithmetic, tmp_path, name="kill", rollout={"prompts": 32, "k": 4, "max_tokens": 8, "prompts_per_batch": 1},
                 bench={"suites": ["copy", "sort"], "examples": 4, "max_tokens": 8})
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "flows.cli", "run", "rl-gsm8k", "--config", str(tmp_path / "rl.yaml")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    buffer = tmp_path / "kill" / "iter-0001" / "buffer.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if buffer.exists() and buffer.read_bytes().count(b"\n") >= 12:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = buffer.read_bytes()
    before = before[: before.rfind(b"\n") + 1]
    assert 12 <= before.count(b"\n") < 32 * 4, "the rollout finished before it could be killed"
    assert not (tmp_path / "kill" / "state.json").exists()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "iteration 1 of" in again.stdout
    after = buffer.read_bytes()
    ids = [json.loads(line)["meta"]["id"] for line in after.splitlines()]
    assert after.startswith(before) and len(ids) == len(set(ids)) == 32 * 4  # resumed, nothing twice
    state = json.loads((tmp_path / "kill" / "state.json").read_text())
    assert state["iteration"] == 1
    # the iteration ends with the new policy on the bench, beside the random baseline; runs/<name>/model is it
    assert set(state["history"][0]["bench"]) == {"iter-1", "random"}
    assert state["history"][0]["bench"]["iter-1"]["n"] == 8
    assert (tmp_path / "kill" / "model").resolve() == Path(state["checkpoint"]).resolve()
