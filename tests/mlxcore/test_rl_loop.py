"""Rollout into a resumable buffer and the GRPO update, on a micro model."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxcore.data.rows import iter_rows
from mlxcore.config import RLUpdateConfig
from mlxcore.rl.iteration import run_update
from mlxcore.config import RewardSpec
from mlxcore.rl.loop import read_buffer, rollout as _rollout, sequence_logprobs
from mlxcore.rl.prompts import RLPrompt
from mlxcore.rl.rewards import Scorer

from tests.conftest import hf_model_dir


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, small_data):
    return hf_model_dir(tmp_path_factory.mktemp("policy") / "m", small_data["tok"], model_type="qwen2")


@pytest.fixture(scope="module")
def policy(policy_dir):
    from mlxcore.models.generate import load_chat

    return load_chat(policy_dir)


PROMPTS = [RLPrompt(id=f"q{i}", messages=[{"role": "user", "content": f"Compute: {i} + {i}"}], reference={"answer": str(2 * i)})
           for i in range(3)]


def rollout(*args, **kw):
    """The rollout with the GSM8K correctness reward."""
    with Scorer([RewardSpec(name="numeric_match")]) as scorer:
        return _rollout(*args, scorer=scorer, **kw)


def test_rollout_writes_k_samples_per_prompt_with_their_logprobs_and_resumes(policy, tmp_path):
    model, tok = policy
    buf = tmp_path / "buffer.jsonl"
    stats = rollout(model, tok, PROMPTS[:2], buf, k=4, max_tokens=6, temperature=1.0, seed=1, checkpoint="c0")
    rows = read_buffer(buf)
    assert stats["samples"] == 8 and sorted((r["prompt_id"], r["sample"]) for r in rows) == \
        [(f"q{i}", s) for i in range(2) for s in range(4)]
    for r in rows:
        assert 1 <= len(r["response_ids"]) <= 6 and len(r["old_logprobs"]) == len(r["response_ids"])
        assert r["checkpoint"] == "c0" and r["seed"] == 1 and r["reward"] in (0.0, 1.0)
        assert tok.decode(r["response_ids"]).strip().startswith(r["response"].strip()[:3]) or not r["response"].strip()
    # the stored log-probs are the model's own for those tokens
    again = sequence_logprobs(model, [rows[0]["prompt_ids"]], [rows[0]["response_ids"]])[0]
    np.testing.assert_allclose(again, rows[0]["old_logprobs"], atol=1e-4)
    # a re-run with a third prompt adds only that prompt's samples
    before = buf.read_bytes()
    stats = rollout(model, tok, PROMPTS, buf, k=4, max_tokens=6, seed=1, checkpoint="c0")
    assert stats["samples"] == 12 and buf.read_bytes().startswith(before)
    ids = [r["meta"]["id"] for r in iter_rows(buf)]
    assert len(ids) == len(set(ids)) == 12


def _varied_rewards(buf):
    rows = list(iter_rows(buf))
    for r in rows:  # rewards that vary within every group
        r["meta"]["reward"] = float(r["meta"]["sample"] % 2)
    buf.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _weights(path):
    return {k: np.array(v) for k, v in mx.load(str(path / "model.safetensors")).items()}


def test_update_first_step_has_ratio_one_and_moves_the_policy(policy, policy_dir, tmp_path):
    model, tok = policy
    buf = tmp_path / "buffer.jsonl"
    rollout(model, tok, PROMPTS, buf, k=4, max_tokens=6, temperature=1.0, seed=2)
    rows = _varied_rewards(buf)
    m = run_update(policy_dir, buf, tmp_path / "one", RLUpdateConfig(batch_size=12, lr=1e-6), seed=0)
    assert m["zero_variance_groups"] == 0 and m["samples_used"] == 12 and m["steps"] == 1
    # ratio 1 on the first step: the loss is minus the token-weighted mean advantage (+-1 per group here)
    lens = [len(r["meta"]["response_ids"]) for r in rows]
    adv = [1.0 if r["meta"]["sample"] % 2 else -1.0 for r in rows]
    want = -sum(a * n for a, n in zip(adv, lens)) / sum(lens)
    assert m["clip_fraction"] == 0.0 and m["loss"] == pytest.approx(want, abs=1e-3)
    m = run_update(policy_dir, buf, tmp_path / "six", RLUpdateConfig(batch_size=4, epochs=2, lr=0.05), seed=0)
    assert m["steps"] == 6 and m["grad_norm"] > 0
    before, after = _weights(policy_dir), _weights(tmp_path / "six" / "model")
    assert any(not np.allclose(before[k], after[k]) for k in before)
    assert not (tmp_path / "six-train").exists()  # the update's checkpoints only served a resume


def test_the_update_is_the_training_loop_resumed_exactly_after_an_interruption(policy, policy_dir, tmp_path):
    """Stopped after its second checkpoint (as a kill would), the update resumes from it and ends
    with the weights and AdamW moments of an uninterrupted one."""
    from mlxcore.train.callbacks import TrainingCallback

    model, tok = policy
    buf = tmp_path / "buffer.jsonl"
    rollout(model, tok, PROMPTS, buf, k=4, max_tokens=6, temperature=1.0, seed=4)
    _varied_rewards(buf)
    cfg = RLUpdateConfig(batch_size=3, epochs=2, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1)  # 8 steps, checkpoint every 2
    whole = run_update(policy_dir, buf, tmp_path / "whole", cfg, seed=1)

    class Stop(TrainingCallback):
        def on_checkpoint(self, info):
            if info["step"] == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_update(policy_dir, buf, tmp_path / "cut", cfg, seed=1, callback=Stop())
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut-train/checkpoints/step-00000004").is_dir()
    events = []

    class Seen(TrainingCallback):
        def on_event(self, event, info):
            events.append((event, info))

    resumed = run_update(policy_dir, buf, tmp_path / "cut", cfg, seed=1, callback=Seen())
    begin = next(i for e, i in events if e == "begin")
    assert begin["start_step"] == 4 and begin["resumed_from"].endswith("step-00000004")
    lrs = [i["lr"] for e, i in events if e == "train"]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < cfg.lr  # past the warmup, decaying on the schedule
    a, b = _weights(tmp_path / "whole" / "model"), _weights(tmp_path / "cut" / "model")
    assert all(np.array_equal(a[k], b[k]) for k in a), "resumed weights differ"
    ma, mb = (mx.load(str(tmp_path / d / "optimizer.safetensors")) for d in ("whole", "cut"))
    assert all(np.array_equal(np.array(ma[k]), np.array(mb[k])) for k in ma)
    assert resumed["steps"] == whole["steps"] == 8 and resumed["loss"] == pytest.approx(whole["loss"], abs=1e-6)


def test_all_equal_rewards_skip_the_update(policy, policy_dir, tmp_path):
    model, tok = policy
    buf = tmp_path / "buffer.jsonl"
    rollout(model, tok, PROMPTS[:2], buf, k=2, max_tokens=4, seed=3)
    m = run_update(policy_dir, buf, tmp_path / "out", RLUpdateConfig(), seed=0)
    if m["mean_reward"] in (0.0, 1.0):  # a random model: every reward 0
        assert m["zero_variance_groups"] == 2 and m["steps"] == 0 and m["samples_used"] == 0
        assert all(np.array_equal(v, _weights(policy_dir)[k]) for k, v in _weights(tmp_path / "out" / "model").items())
    with pytest.raises(ValueError, match="reference_dir"):
        rows = list(iter_rows(buf))
        rows[0]["meta"]["reward"] = 1.0
        buf.write_text("".join(json.dumps(r) + "\n" for r in rows))
        run_update(policy_dir, buf, tmp_path / "kl", RLUpdateConfig(beta=0.1), seed=0)


def test_mx_seed_makes_rollout_reproducible(policy, tmp_path):
    model, tok = policy
    a = rollout(model, tok, PROMPTS[:1], tmp_path / "a.jsonl", k=3, max_tokens=5, seed=9)
    b = rollout(model, tok, PROMPTS[:1], tmp_path / "b.jsonl", k=3, max_tokens=5, seed=9)
    ra, rb = read_buffer(tmp_path / "a.jsonl"), read_buffer(tmp_path / "b.jsonl")
    assert [r["response_ids"] for r in ra] == [r["response_ids"] for r in rb] and a["samples"] == b["samples"] == 3
    mx.random.seed(0)


@pytest.mark.parametrize("fine_tune_type", ["lora", "full"])
def test_run_update_writes_a_plain_policy_dir_lora_fused_and_kl_to_the_reference(policy_dir, tmp_path, fine_tune_type):
    from mlxcore.config import RLUpdateConfig
    from mlxcore.models.generate import load_chat
    from mlxcore.io import read_manifest
    from mlxcore.rl.iteration import run_update

    src = policy_dir
    model, tok = load_chat(src)
    buf = tmp_path / "buffer.jsonl"
    rollout(model, tok, PROMPTS, buf, k=4, max_tokens=6, seed=5)
    rows = list(iter_rows(buf))
    for r in rows:
        r["meta"]["reward"] = float(r["meta"]["sample"] % 2)
    buf.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RLUpdateConfig(lr=1e-2, beta=0.5, epochs=2, batch_size=6, fine_tune_type=fine_tune_type)
    m = run_update(src, buf, tmp_path / "out", cfg, seed=0, reference_dir=src)
    assert m["steps"] == 4 and m["kl"] > 0  # moved away from the reference, and the KL says so
    new, _ = load_chat(tmp_path / "out" / "model")  # a plain model dir: adapters fused
    assert not (tmp_path / "out" / "model" / "adapters.safetensors").exists()
    before, after = dict(tree_flatten(model.parameters())), dict(tree_flatten(new.parameters()))
    assert set(before) == set(after) and any(not np.allclose(np.array(before[k]), np.array(after[k])) for k in before)
    assert read_manifest(tmp_path / "out", "rl-update")["metrics"]["steps"] == 4
    assert (tmp_path / "out" / "optimizer.safetensors").exists() == (fine_tune_type == "full")
