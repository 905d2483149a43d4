"""The rl-gsm8k flow: GRPO iterations that learn, state that carries over, and a control run.

The task is synthetic single-step arithmetic in GSM8K's format ("What is 3 + 4?" -> "3 + 4 = 7
#### 7"); the policy is a fresh tiny model that the flow's SFT warmup teaches the format and
some of the sums, so RL has both right and wrong samples to learn from.
"""

import json
import random

import pytest

from mlxcore.config import ModelConfig, RLConfig, TokenizerConfig
from mlxcore.rl.iteration import load_questions, run_rollout

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
    from mlxcore.checkpoint import save_model_dir
    from mlxcore.data import tokenizer
    from mlxcore.model import from_config, hf_config

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
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
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


def test_the_same_iterations_without_the_update_do_not_raise_it(arithmetic, tmp_path):
    config = rl_config(arithmetic, tmp_path, update={"epochs": 0})
    history = _iterate(config, 5)[-1]["history"]
    first = json.loads((tmp_path / "arith" / "iter-0001" / "update" / "manifest.json").read_text())["config"]["policy"]
    start, end = held_out_reward(arithmetic, first, tmp_path), held_out_reward(arithmetic, history[-1]["checkpoint"], tmp_path)
    print(f"held-out mean reward without updates: {start:.3f} -> {end:.3f}")
    assert all(h["steps"] == 0 for h in history) and end - start < 0.05
