"""The rl flow: GRPO-family and PPO iterations that learn, state that carries over, and a control run.

The task is synthetic single-step arithmetic in GSM8K's format ("What is 3 + 4?" -> "3 + 4 = 7
#### 7"); the policy is a fresh tiny model that the flow's SFT warmup teaches the format and
some of the sums, so RL has both right and wrong samples to learn from.
"""

import json
import re
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

from mlxcore.config import ModelConfig, RewardSpec, RLConfig, TokenizerConfig
from mlxcore.rl.iteration import run_rollout
from mlxcore.rl.prompts import load_questions
from mlxcore.rl.rewards import Scorer
from mlxcore.serving import die_with_parent

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


WARMUP = {"steps": 60, "batch_size": 32, "seq_len": 64, "lr": 3e-3, "warmup_steps": 5, "eval_every": 0,
          "save_every": 0, "log_every": 20}


@pytest.fixture(scope="module")
def warm(arithmetic) -> str:
    """The policy after the flow's SFT warmup (the same settings), trained once for the tests that start there."""
    from mlxcore.config import TrainConfig
    from mlxcore.data.pretokenize import pretokenize
    from mlxcore.train.loop import TrainJob, run

    root = arithmetic
    pretokenize({"train": [root / "train.jsonl"], "val": [root / "test.jsonl"]}, root / "tok", "sft", root / "warm-sd",
                source={"format": "gsm8k"}, max_tokens=65, progress_bar=False)
    run(TrainJob(data_dir=str(root / "warm-sd"), tokenizer_dir=str(root / "tok"), out_dir=str(root / "warm"),
                 init_from=str(root / "policy"), train=TrainConfig(**WARMUP)))
    return str(root / "warm" / "model")


def rl_config(arithmetic, out, **over) -> RLConfig:
    cfg = {"name": "arith", "out_dir": str(out), "policy": str(arithmetic / "policy"),
           "train": [str(arithmetic / "train.jsonl")], "test": [str(arithmetic / "test.jsonl")], "system_prompt": None,
           "warmup": WARMUP,
           "rollout": {"prompts": 128, "k": 8, "max_tokens": 16},
           "update": {"lr": 5e-5, "epochs": 4, "batch_size": 32},
           "iterations": 5, "eval_prompts": 16, "eval_max_tokens": 16}  # the flow's own report; tests score held_out_terms
    for key, value in over.items():
        cfg[key] = {**(cfg.get(key) or {}), **value} if isinstance(value, dict) else value
    return RLConfig.model_validate(cfg)


_HELD_OUT: dict[tuple, dict] = {}


def held_out_terms(arithmetic, model_dir, tmp_path, rewards=("numeric_match",), rewards_file=None,
                   reward_model=None, questions=64) -> dict:
    """4 samples (temperature 1) of the first `questions` held-out questions with a fixed seed,
    rewarded: the rollout's stats (`mean_reward`, each term's mean in `rewards`) and the samples
    (`buffer`). A model dir is never rewritten, so the same measurement is taken once a session
    (the warm policy's is every test's start)."""
    key = (str(model_dir), tuple(rewards), str(rewards_file), str(reward_model), questions)
    if key not in _HELD_OUT:
        _HELD_OUT[key] = _held_out_terms(arithmetic, model_dir, tmp_path, rewards, rewards_file, reward_model, questions)
    return _HELD_OUT[key]


def _held_out_terms(arithmetic, model_dir, tmp_path, rewards, rewards_file, reward_model, questions) -> dict:
    questions = load_questions([arithmetic / "test.jsonl"])[:questions]
    buf = tmp_path / f"held-{abs(hash((str(model_dir), rewards, str(reward_model))))}.jsonl"
    with Scorer([RewardSpec(name=r) for r in rewards], rewards_file=rewards_file, reward_model=reward_model) as scorer:
        return run_rollout(model_dir, questions, buf, rl_config(arithmetic, tmp_path).rollout.model_copy(update={"k": 4}),
                           scorer, seed=1234, checkpoint=str(model_dir)) | {"buffer": buf}


def held_out_reward(arithmetic, model_dir, tmp_path, rewards=("numeric_match",), rewards_file=None) -> float:
    """Mean reward of 4 samples (temperature 1) on 64 held-out questions, with a fixed seed."""
    return held_out_terms(arithmetic, model_dir, tmp_path, rewards, rewards_file)["mean_reward"]


def _weights(model_dir) -> bytes:
    """The tensors of a model dir (names, dtypes and bytes), for bit-for-bit comparisons."""
    import mlx.core as mx
    import numpy as np

    loaded = mx.load(str(Path(model_dir) / "model.safetensors"))
    return b"".join(k.encode() + str(v.dtype).encode() + np.array(v.astype(mx.float32)).tobytes()
                    for k, v in sorted(loaded.items()))


def _iterate(config, n):
    from flows.rl import rl

    results = []
    for _ in range(n):
        state = rl(config, return_state=True)
        assert state.is_completed(), state.message
        results.append(state.result())
    return results


def test_five_grpo_iterations_raise_held_out_reward_by_20_points(arithmetic, warm, tmp_path):
    config = rl_config(arithmetic, tmp_path, policy=warm, warmup=None)
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


EVEN_BELOW_50 = """# Reward for answering with an even number below 50 (the last number in the reply).
import re


def even_below_50(prompt, completion):
    numbers = re.findall(r"-?\\d+", completion)
    return 1.0 if numbers and int(numbers[-1]) % 2 == 0 and 0 <= int(numbers[-1]) < 50 else 0.0
"""


def _prompt_rows(src: Path, out: Path) -> Path:
    """The same questions as `prompt` rows, the user's own format (the reference answer unused)."""
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    out.write_text("".join(json.dumps({"prompt": r["question"], "answer": int(r["answer"].split("#### ")[-1])}) + "\n"
                           for r in rows))
    return out


def _user_reward_config(arithmetic, warm, out: Path, **over) -> RLConfig:
    """`prompt` rows of the sums and a reward file the test writes (even numbers below 50); the
    GSM8K correctness reward tracked beside it at weight 0."""
    rewards = out / "my_rewards.py"
    out.mkdir(parents=True, exist_ok=True)
    rewards.write_text(EVEN_BELOW_50)
    train, test = _prompt_rows(arithmetic / "train.jsonl", out / "train.jsonl"), _prompt_rows(
        arithmetic / "test.jsonl", out / "test.jsonl")
    return rl_config(arithmetic, out, name="even", policy=warm, warmup=None, train=[str(train)], test=[str(test)],
                     rewards_file=str(rewards), rewards=[{"name": "even_below_50"}, {"name": "numeric_match", "weight": 0.0}],
                     **over)


def test_a_user_reward_file_teaches_even_answers(arithmetic, warm, tmp_path):
    """A reward the test writes in its own file (answer with an even number below 50), on `prompt`
    rows: held-out mean reward rises >= 30 points in 5 iterations (the control: the next test)."""
    config = _user_reward_config(arithmetic, warm, tmp_path)
    trained = _iterate(config, 5)[-1]
    measure = dict(rewards=("even_below_50",), rewards_file=config.rewards_file)
    start = held_out_reward(arithmetic, warm, tmp_path, **measure)
    end = held_out_reward(arithmetic, trained["checkpoint"], tmp_path, **measure)
    print(f"held-out even-below-50 reward: {start:.3f} -> {end:.3f}")
    assert end - start >= 0.30
    last = trained["history"][-1]
    assert set(last["rewards"]) == {"even_below_50", "numeric_match"} and last["eval_mean_reward"] is not None


def test_the_same_iterations_without_the_update_stay_flat(arithmetic, warm, tmp_path):
    """The control of every learning claim on the sums (grpo, the variants, the user reward file):
    the same iterations from the same warm policy with `update.epochs: 0` move neither the held-out
    GSM8K reward nor the user file's reward. Two iterations stand for five: each one hands on the
    policy it was given bit for bit (asserted), so the third to fifth would roll out the same weights."""
    config = _user_reward_config(arithmetic, warm, tmp_path, update={"epochs": 0})
    history = _iterate(config, 2)[-1]["history"]
    assert all(h["steps"] == 0 for h in history)
    assert _weights(history[-1]["checkpoint"]) == _weights(warm)
    for rewards in (("numeric_match",), ("even_below_50",)):
        start = held_out_reward(arithmetic, warm, tmp_path, rewards=rewards, rewards_file=config.rewards_file)
        end = held_out_reward(arithmetic, history[-1]["checkpoint"], tmp_path, rewards=rewards,
                              rewards_file=config.rewards_file)
        print(f"held-out {rewards[0]} without updates: {start:.3f} -> {end:.3f}")
        assert abs(end - start) < 0.05


@pytest.mark.parametrize("loss,update", [
    ("dapo", {}), ("dr_grpo", {}), ("gspo", {}), ("rloo", {})])
def test_each_grpo_variant_raises_held_out_reward_by_20_points(arithmetic, warm, tmp_path, loss, update):
    """DAPO, Dr. GRPO, GSPO and RLOO on the GSM8K-format sums, from the warm policy, in 4 iterations
    (grpo's test runs 5; at 3 the measured gains were +0.32 dapo, +0.25 dr_grpo, +0.21 gspo, +0.23
    rloo: too close to the bar for a test). The control (the same iterations with the update off) is
    test_the_same_iterations_without_the_update_stay_flat: its policy never changes, so it is flat
    after 4 iterations as after 5."""
    config = rl_config(arithmetic, tmp_path, policy=warm, warmup=None, iterations=4, update={"loss": loss, **update})
    history = _iterate(config, 4)[-1]["history"]
    start, end = held_out_reward(arithmetic, warm, tmp_path), held_out_reward(arithmetic, history[-1]["checkpoint"], tmp_path)
    print(f"{loss}: held-out mean reward {start:.3f} -> {end:.3f}")
    assert end - start >= 0.20 and all(h["steps"] > 0 for h in history)


def _on_policy_pairs(rows: list[dict], questions: dict, out: Path, per_question: int = 4, seed: int = 0) -> Path:
    """InstructGPT's comparisons: each wrong sample of a question (at most `per_question`) is the
    rejected side against a right sample of the same question, and against the reference answer."""
    rng, groups = random.Random(seed), {}
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    pairs = []
    for qid, group in groups.items():
        right = [r["response"] for r in group if r["correct"] == 1.0]
        wrong = [r["response"] for r in group if r["correct"] != 1.0]
        prompt = questions[qid].messages[-1]["content"]
        for w in rng.sample(wrong, min(per_question, len(wrong))):
            chosen = ([rng.choice(right)] if right else []) + [questions[qid].reference["solution"]]
            pairs += [{"prompt": prompt, "chosen": c, "rejected": w} for c in chosen]
    out.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return out


@pytest.fixture(scope="module")
def sum_reward_model(arithmetic, warm, prefect_server, tmp_path_factory) -> dict:
    """The preference issue's `reward-model` flow on comparisons of the warm policy's own samples
    (8 of each of 400 train questions), labelled by the GSM8K checker, the stand-in for a human
    labeller. Returns its dir and its score's mean and std on those samples (the starting
    policy's), what the `reward_model` term's `normalize` takes."""
    import numpy as np

    from flows.preference import reward_model
    from mlxcore.config import RewardModelRunConfig
    from mlxcore.preference.reward import score
    from mlxcore.rl.loop import read_buffer

    root = tmp_path_factory.mktemp("sum-rm")
    questions = load_questions([arithmetic / "train.jsonl"])[-400:]
    with Scorer([RewardSpec(name="numeric_match")]) as labeller:
        run_rollout(warm, questions, root / "samples.jsonl", rl_config(arithmetic, root).rollout, labeller, seed=7,
                    checkpoint=warm)
    rows, by_id = read_buffer(root / "samples.jsonl"), {q.id: q for q in questions}
    cfg = RewardModelRunConfig.model_validate({
        "name": "rm", "out_dir": str(root), "init_from": warm,
        "data": {"train": [str(_on_policy_pairs(rows, by_id, root / "pairs.jsonl"))]},
        "train": {"steps": 200, "batch_size": 32, "seq_len": 48, "lr": 1e-3, "warmup_steps": 10, "eval_every": 0,
                  "save_every": 0, "weight_decay": 0.0}})
    state = reward_model(cfg, [], return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    scores = np.array(score(out["checkpoint"], [by_id[r["prompt_id"]].messages for r in rows],
                            [r["response"] for r in rows]))
    return {"checkpoint": out["checkpoint"], "eval": out["eval"],
            "normalize": {"mean": float(scores.mean()), "std": float(scores.std())}}


def _ranked_pairs(buffer: Path) -> float:
    """The share of (right, wrong) sample pairs of one question the reward model ranks right (ties half)."""
    from mlxcore.rl.loop import read_buffer

    groups, hits, n = {}, 0.0, 0
    for r in read_buffer(buffer):
        groups.setdefault(r["prompt_id"], []).append((r["rewards"]["numeric_match"], r["rewards"]["reward_model"]))
    for group in groups.values():
        for good in (s for c, s in group if c == 1.0):
            for bad in (s for c, s in group if c != 1.0):
                hits, n = hits + (good > bad) + 0.5 * (good == bad), n + 1
    return hits / n


def test_ppo_with_a_learned_reward_model_raises_held_out_accuracy_and_its_score(arithmetic, warm, sum_reward_model,
                                                                              tmp_path):
    """PPO (a critic on the reward model's decoder, GAE, per-token KL to the start) from the warm
    policy with the `reward-model` flow's model as the reward (normalised by its statistics on the
    warm policy's samples and clipped to +-3, beside the format-only `gsm8k_format` term;
    correctness tracked at weight 0, never rewarded): held-out accuracy (4 samples at temperature 1
    on all 200 questions) and the reward model's score both rise; the control, the same iterations
    with the update off, moves neither. On 64 questions (256 samples) the gain was too noisy for a
    bar: one trained policy measured 0.051 there, and 0.104 / 0.092 / 0.073 with three seeds on all
    200 (800 samples each), the way it is measured now. The settings, and what fails without each:
    README, RL. (PPO with the verifiable reward learns too, 0.363 -> 0.445-0.492 in 5 iterations on
    64 questions: measured, not re-run here for time.)"""
    rm = sum_reward_model
    ppo = {"loss": "ppo", "lr": 5e-5, "epochs": 4, "batch_size": 32, "kl_coef": 0.05, "critic_lr": 3e-4,
           "cliprange_value": 10.0}
    learned = {"name": "ppo", "policy": warm, "warmup": None, "reward_model": rm["checkpoint"], "iterations": 4,
               "rollout": {"prompts": 128, "k": 8, "max_tokens": 16}, "eval_prompts": 16, "update": ppo,
               "rewards": [{"name": "reward_model", "args": {"normalize": rm["normalize"], "clip": 3.0}},
                           {"name": "gsm8k_format"}, {"name": "numeric_match", "weight": 0.0}]}
    runs = {"learned": learned, "control": {**learned, "update": {**ppo, "epochs": 0}}}
    # the control's iterations hand on the warm policy bit for bit (asserted): two stand for four
    history = {k: _iterate(rl_config(arithmetic, tmp_path / k, **cfg), 4 if k == "learned" else 2)[-1]["history"]
               for k, cfg in runs.items()}
    measure = dict(rewards=("numeric_match", "reward_model"), reward_model=rm["checkpoint"], questions=200)
    start = held_out_terms(arithmetic, warm, tmp_path, **measure)
    end = {k: held_out_terms(arithmetic, h[-1]["checkpoint"], tmp_path, **measure)["rewards"] for k, h in history.items()}
    acc0, score0, std = start["rewards"]["numeric_match"], start["rewards"]["reward_model"], rm["normalize"]["std"]
    gain = {k: (e["numeric_match"] - acc0, (e["reward_model"] - score0) / std) for k, e in end.items()}
    ranked = _ranked_pairs(start["buffer"])
    print(f"reward model: held-out pairs {rm['eval']['accuracy']:.3f}, the warm policy's right-vs-wrong samples "
          f"{ranked:.3f}; held-out accuracy / reward-model score: warm {acc0:.3f} / {score0:.2f} (std {std:.2f}), "
          + ", ".join(f"{k} {e['numeric_match']:.3f} / {e['reward_model']:.2f}" for k, e in end.items()))
    assert ranked >= 0.9  # it ranks the policy's own right answers above its wrong ones
    assert gain["learned"][0] >= 0.06 and gain["learned"][1] >= 0.25  # true accuracy, and the model's score
    assert all(abs(g) < 0.05 for g in gain["control"])
    assert all(h["steps"] > 0 and h["value_loss"] is not None for h in history["learned"])
    assert all(h["steps"] == 0 for h in history["control"])
    assert _weights(history["control"][-1]["checkpoint"]) == _weights(warm)
    # the critic and the KL coefficient carried from one iteration to the next
    assert all((tmp_path / "learned" / "ppo" / f"iter-{i:04d}" / "update" / "critic" / "config.json").exists()
               for i in range(1, 5))


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
                            start_new_session=True, preexec_fn=die_with_parent)
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
    """`mlxflow run rl` SIGKILLed mid-rollout, then run again: the rows written are kept, the rest sampled."""
    cfg = _small(arithmetic, tmp_path, name="kill", rollout={"prompts": 32, "k": 4, "max_tokens": 8, "prompts_per_batch": 1},
                 bench={"suites": ["copy", "sort"], "examples": 4, "max_tokens": 8})
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "flows.cli", "run", "rl", "--config", str(tmp_path / "rl.yaml")]
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
    # the iteration ends with the new policy on the bench, beside the random baseline; runs/<name>/model is
    # the champion (the starting policy or iteration 1: promotion.json says which)
    assert set(state["history"][0]["bench"]) == {"iter-1", "random"}
    assert state["history"][0]["bench"]["iter-1"]["n"] == 8
    champion = json.loads((tmp_path / "kill" / "promotion.json").read_text())["champion"]
    assert champion["key"] in (0, 1) and (tmp_path / "kill" / "model").resolve() == Path(champion["checkpoint"]).resolve()


def test_an_llm_judge_scores_the_rollout_and_its_faults_never_crash_the_iteration(arithmetic, tmp_path):
    """The judge is the Ollama stand-in: it rates replies ending in an even digit 8/10, others 2/10,
    and some requests fail (500s, a timeout, replies with no number). The iteration completes,
    every sample is in the buffer, failed judgements are counted and their groups sit out."""
    from tests.ollama_standin import OllamaStandin

    def rate(messages):
        text = messages[-1]["content"]
        answer = text.split("Answer:\n")[-1].split("\n\nReply with")[0].strip()
        return "8" if answer[-1:] in "02468" and answer[-1:] else "2"

    with OllamaStandin(answer=rate) as server:
        server.fail_next(6, "500")
        server.fail_next(1, "timeout")
        cfg = _small(arithmetic, tmp_path, name="judged", warmup={**WARMUP, "steps": 10},
                     rewards=[{"name": "judge"}, {"name": "numeric_match", "weight": 0}],
                     judge={"teacher": {"url": server.url, "model": "qwen3:0.6b", "retries": 0, "timeout_s": 2,
                                        "backoff_s": 0.01, "failure_budget": 40, "temperature": 0}},
                     iterations=1, promotion={"enabled": False})  # the gate's eval of iteration 0 would meet the faults first
        result = _iterate(cfg, 1)[0]
        buffer = tmp_path / "judged" / "iter-0001" / "buffer.jsonl"
        rows = [json.loads(line)["meta"] for line in buffer.read_text().splitlines()]
    assert len(rows) == 8 * 4 and len({r["id"] for r in rows}) == 32  # nothing lost
    failed = [r for r in rows if r["judge_failed"]]
    assert failed and all(r["reward"] is None for r in failed)  # the 500s and the timeout, not retried here
    scored = [r for r in rows if not r["judge_failed"]]
    assert {r["reward"] for r in scored} <= {0.2, 0.8} and all(r["rewards"]["judge"] == r["reward"] for r in scored)
    last = result["history"][-1]
    assert last["judge_failures"] == len(failed) and last["unscored_groups"] >= 1
    assert last["eval_mean_reward"] is not None
    # the flow's warmup ran first: iteration 1 started from its SFT checkpoint, not the fresh policy
    first = json.loads((tmp_path / "judged" / "iter-0001" / "update" / "manifest.json").read_text())["config"]["policy"]
    assert Path(first).resolve() != (arithmetic / "policy").resolve() and (Path(first) / "model.safetensors").exists()


BAD_REWARDS = """
def picky(prompt, completion):
    if "7 +" in prompt:
        {kind}
    return 1.0 if completion.strip() else 0.0
"""


def test_a_bad_reward_function_fails_naming_file_function_and_row_and_keeps_the_buffer(arithmetic, tmp_path):
    """`mlxflow run rl`: iteration 1 commits; in iteration 2 the user's function raises on one row:
    a non-zero exit naming the file, the function, the sample and its source row; iteration 1
    stays committed, the buffer holds only rewarded rows; fixed, the run continues the buffer.
    (NaN and wrong-type returns give the same message shape: tests/mlxcore/test_rl_rewards.py.)"""
    kind, message = "raise ValueError('no sevens')", "raised ValueError: no sevens"
    rewards = tmp_path / "rewards.py"
    rewards.write_text(BAD_REWARDS.replace("{kind}", "return 1.0"))
    cfg = _small(arithmetic, tmp_path, name="bad", rewards=[{"name": "picky"}], rewards_file=str(rewards), iterations=2,
                 rollout={"prompts": 32, "k": 2, "max_tokens": 4, "prompts_per_batch": 4})
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "flows.cli", "run", "rl", "--config", str(tmp_path / "rl.yaml")]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    committed = (tmp_path / "bad" / "state.json").read_bytes()
    rewards.write_text(BAD_REWARDS.replace("{kind}", kind))  # iteration 2 meets a question "What is 7 + ...?"
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode != 0
    assert f"reward function 'picky' ({rewards})" in out and message in out, out[-3000:]
    m = re.search(r"on sample (\S+) from (\S+):(\d+)", out)
    assert m, out[-3000:]
    source = Path(m.group(2))
    assert "7 +" in source.read_text().splitlines()[int(m.group(3)) - 1]  # the row named is the one that failed
    assert (tmp_path / "bad" / "state.json").read_bytes() == committed  # iteration 1 stays committed
    buffer = tmp_path / "bad" / "iter-0002" / "buffer.jsonl"
    kept = buffer.read_text().splitlines() if buffer.exists() else []
    assert all(json.loads(line)["meta"]["reward"] is not None for line in kept)  # only complete rows
    assert not any("7 +" in json.loads(line)["conversations"][-2]["content"] for line in kept)
    rewards.write_text(BAD_REWARDS.replace("{kind}", "return 0.5"))  # fixed: the iteration continues
    third = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    after = buffer.read_text().splitlines()
    assert after[: len(kept)] == kept and len(after) == 32 * 2
    assert json.loads((tmp_path / "bad" / "state.json").read_text())["iteration"] == 2


def test_the_gate_promotes_a_better_iteration_and_keeps_a_worse_one_out_of_model(arithmetic, tmp_path):
    """Champion / challenger on the held-out prompts' accuracy (no bench). Iteration 0, the champion, is
    the policy given (random weights: accuracy 0). Iteration 1 (the SFT warmup, then a small sound
    update) is significantly better: promoted, <run>/model moves to it. Iteration 2, with an lr far too
    high, is significantly worse: kept in its dir, not promoted, <run>/model stays; the next
    iteration would start again from the champion."""
    from flows.rl import _start_from, rl

    cfg = _small(arithmetic, tmp_path, name="gate", warmup={**WARMUP, "steps": 40}, iterations=3, eval_prompts=64)
    run = tmp_path / "gate"
    for overrides in ([], ["update.lr=0.05"]):
        state = rl(cfg, overrides, return_state=True)
        assert state.is_completed(), state.message
        result = state.result()
    book = json.loads((run / "promotion.json").read_text())
    start, first, second = book["history"]
    assert [h["key"] for h in book["history"]] == [0, 1, 2] and start["promoted"] and start["score"] == 0.0
    assert first["promoted"] and first["low"] > 0 and first["reason"].startswith("better")
    assert not second["promoted"] and second["high"] < 0 and second["reason"].startswith("worse")
    assert second["champion_score"] == first["score"] and book["champion"]["key"] == 1
    assert (run / "model").resolve() == (run / "iter-0001" / "update" / "model").resolve()
    assert (run / "iter-0002" / "update" / "model" / "model.safetensors").is_file()  # kept, not promoted
    # the RL history and the flow's result say so too; iteration 3 would start from the champion
    assert [(h["iteration"], h["promoted"], h["champion"]) for h in result["history"]] == [(1, True, 1), (2, False, 1)]
    assert _start_from(str(run), "auto", result["checkpoint"], cfg.policy)[0] == book["champion"]["checkpoint"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gate-promotion"])))
    table = json.loads(sorted(arts, key=lambda a: a.created)[-1].data)
    assert [(r["model"], r["promoted"]) for r in table] == [(0, True), (1, True), (2, False)]
