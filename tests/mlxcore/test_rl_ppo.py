"""PPO with a value model and a learned reward model (mlxcore/rl/ppo.py), on a micro model."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from mlxcore.preference import reward
from mlxcore.rl.ppo import (ActorCritic, AdaptiveKL, FixedKL, PPOLoss, clipped_policy_loss, clipped_value_loss, gae,
                            kl_controller, load_critic, prepare_ppo_items, run_ppo_update, save_critic,
                            sequence_values, token_rewards)

from tests.conftest import hf_model_dir


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, small_data):
    return hf_model_dir(tmp_path_factory.mktemp("ppo-policy") / "m", small_data["tok"], model_type="qwen2")


@pytest.fixture(scope="module")
def reward_dir(policy_dir, tmp_path_factory):
    """A 'learned' reward model: the policy's decoder with a random head, saved in the HF layout."""
    model, config = reward.from_base(policy_dir, 0, seed=3)
    return save_critic(tmp_path_factory.mktemp("ppo-rm") / "rm", model, config, tokenizer_dir=policy_dir)


@pytest.fixture(scope="module")
def rows(policy_dir):
    """Eight rollout rows: random prompts and responses, their log-probs under the policy, a reward each."""
    from mlxcore.models.model import load
    from mlxcore.rl.loop import sequence_logprobs

    policy, _ = load(policy_dir)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 500, size=int(rng.integers(3, 7))).tolist() for _ in range(8)]
    responses = [rng.integers(5, 500, size=int(rng.integers(2, 7))).tolist() for _ in range(8)]
    old = sequence_logprobs(policy, prompts, responses)
    return [{"prompt_ids": p, "response_ids": r, "old_logprobs": lp, "reward": float(i % 3) - 1.0,
             "finish_reason": "stop"} for i, (p, r, lp) in enumerate(zip(prompts, responses, old))]


def _weights(path, name="model.safetensors"):
    return {k: np.array(v) for k, v in mx.load(str(path / name)).items()}


# ------------------------------------------------------------------ host-side pieces, by hand


def test_gae_by_hand_on_four_tokens():
    r, v = [0.1, -0.2, 0.0, 1.0], [0.5, 0.4, 0.3, 0.2]
    # gamma 1, lam 0.95: deltas 0.0, -0.3, -0.1, 0.8 (V after the last token is 0)
    adv, ret = gae(r, v, gamma=1.0, lam=0.95)
    np.testing.assert_allclose(adv, [0.31065, 0.327, 0.66, 0.8], atol=1e-12)
    np.testing.assert_allclose(ret, [0.81065, 0.727, 0.96, 1.0], atol=1e-12)
    # gamma 0.9, lam 0.95: deltas -0.04, -0.33, -0.12, 0.8; gamma x lam = 0.855
    adv, ret = gae(r, v, gamma=0.9, lam=0.95)
    np.testing.assert_allclose(adv, [0.0901481, 0.15222, 0.564, 0.8], atol=1e-7)
    np.testing.assert_allclose(ret, np.array(adv) + v, atol=1e-12)
    # gamma = lam = 1: the returns are the rewards-to-go, whatever the values
    _, ret = gae(r, v, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(ret, [0.9, 0.8, 1.0, 1.0], atol=1e-12)
    with pytest.raises(ValueError):
        gae([1.0, 2.0], [0.0])


def test_value_and_policy_clipping_by_hand():
    values, old, ret = mx.array([1.0, 1.0, 0.55]), mx.array([0.5, 0.5, 0.5]), mx.array([2.0, 0.0, 2.0])
    loss, clipped = clipped_value_loss(values, old, ret, cliprange_value=0.2)
    # V moved +0.5 past the clip: V_clip = 0.7. Towards R=2 the clipped error (1.3^2) is the larger one;
    # away from R=0 the plain error (1.0^2) is; within the range both are the same.
    np.testing.assert_allclose(np.array(loss), [0.5 * 1.69, 0.5 * 1.0, 0.5 * 1.45 ** 2], atol=1e-6)
    assert np.array(clipped).tolist() == [1.0, 0.0, 0.0]
    logp, old_lp = mx.array([math.log(1.5), math.log(1.5), math.log(0.5)]), mx.zeros(3)
    adv = mx.array([1.0, -1.0, -1.0])
    pg, pg_clipped, ratio = clipped_policy_loss(logp, old_lp, adv, clip_range=0.2)
    np.testing.assert_allclose(np.array(pg), [-1.2, 1.5, 0.8], atol=1e-6)
    np.testing.assert_allclose(np.array(ratio), [1.5, 1.5, 0.5], atol=1e-6)
    assert np.array(pg_clipped).tolist() == [1.0, 0.0, 1.0]


def test_per_token_rewards_are_the_kl_penalty_plus_the_score_at_the_last_token():
    old, ref = [-1.0, -2.0, -0.5], [-1.5, -1.0, -0.5]
    rew, kl = token_rewards(2.0, old, ref, kl_coef=0.1)  # k1: old - ref
    np.testing.assert_allclose(kl, [0.5, -1.0, 0.0])
    np.testing.assert_allclose(rew, [-0.05, 0.1, 2.0])
    rew, kl = token_rewards(2.0, old, ref, kl_coef=0.1, kl_estimator="k3")  # exp(d) - d - 1, d = ref - old
    want = [math.exp(-0.5) + 0.5 - 1.0, math.e - 2.0, 0.0]
    np.testing.assert_allclose(kl, want, atol=1e-12)
    assert min(kl) >= 0
    np.testing.assert_allclose(rew, [-0.1 * want[0], -0.1 * want[1], 2.0], atol=1e-12)
    rew, _ = token_rewards(-1.0, [-3.0], [-3.0], kl_coef=0.5)  # one token: the score only
    np.testing.assert_allclose(rew, [-1.0])


def test_items_put_the_score_on_the_last_token_and_the_kl_everywhere(policy_dir, reward_dir, rows):
    critic, _ = reward.load(reward_dir)
    refs = [[lp - 0.1 * (j + 1) for j, lp in enumerate(r["old_logprobs"])] for r in rows]  # KL_t = 0.1 (t + 1)
    items, m = prepare_ppo_items(critic, refs, rows, kl_coef=0.2, gamma=1.0, lam=1.0, whiten_advantages=False)
    assert m["samples"] == 8 and m["skipped"] == 0
    for r, it in zip(rows, items):
        n = len(r["response_ids"])
        kl = [0.1 * (j + 1) for j in range(n)]
        # gamma = lam = 1: the return of the first token is the sum of all the token rewards
        assert it["returns"][0] == pytest.approx(r["reward"] - 0.2 * sum(kl), abs=1e-6)
        # and of the last token: its KL penalty plus the score
        assert it["returns"][-1] == pytest.approx(r["reward"] - 0.2 * kl[-1], abs=1e-6)
        np.testing.assert_allclose(np.array(it["advantages"]) + it["old_values"], it["returns"], atol=1e-6)
        assert len(it["old_values"]) == len(it["advantages"]) == n
    assert m["kl"] == pytest.approx(np.mean([sum(0.1 * (j + 1) for j in range(len(r["response_ids"]))) for r in rows]))
    assert m["mean_score"] == pytest.approx(np.mean([r["reward"] for r in rows]))
    # whitened: mean 0, std 1 over every response token of the iteration
    items, _ = prepare_ppo_items(critic, refs, rows, kl_coef=0.2)
    flat = np.concatenate([it["advantages"] for it in items])
    assert abs(flat.mean()) < 1e-6 and flat.std() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="reference"):
        prepare_ppo_items(critic, None, rows, kl_coef=0.1)
    # a row without response tokens carries nothing
    _, m = prepare_ppo_items(critic, None, rows + [dict(rows[0], response_ids=[], old_logprobs=[])], kl_coef=0.0)
    assert m["samples"] == 8 and m["skipped"] == 1


def test_first_ppo_step_has_ratio_one_and_the_loss_is_minus_the_mean_advantage(policy_dir, reward_dir, rows):
    from mlxcore.models.model import load

    policy, _ = load(policy_dir)
    critic, _ = reward.load(reward_dir)
    items, _ = prepare_ppo_items(critic, policy, rows, kl_coef=0.1, whiten_advantages=False)
    # the old values are the critic's own values at the response positions
    again = sequence_values(critic, [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows])
    for it, v in zip(items, again):
        np.testing.assert_allclose(it["old_values"], v, atol=1e-6)
    loss = PPOLoss(clip_range=0.2, cliprange_value=0.2, vf_coef=0.1)
    total, n, aux = loss(ActorCritic(policy, critic), *map(mx.array, loss.prepare(items)))
    n = n.item()
    adv = np.concatenate([it["advantages"] for it in items])
    ret, old_v = np.concatenate([it["returns"] for it in items]), np.concatenate([it["old_values"] for it in items])
    assert n == len(adv)
    assert aux["policy_loss"].item() / n == pytest.approx(-adv.mean(), abs=1e-4)
    assert aux["value_loss"].item() / n == pytest.approx(0.5 * np.mean((old_v - ret) ** 2), rel=1e-4)
    assert aux["clip_fraction"].item() == 0 and aux["value_clip_fraction"].item() == 0
    assert abs(aux["approx_kl"].item()) < 1e-5
    assert total.item() / n == pytest.approx((aux["policy_loss"].item() + 0.1 * aux["value_loss"].item()) / n, rel=1e-5)


def test_a_zero_head_critic_starts_at_zero_values_with_or_without_a_reward_model(policy_dir, reward_dir, rows):
    """`zero_head` zeroes the head of a reward model's decoder and of a fresh one alike: a fresh
    random head's values would be noise in every advantage of the first iteration."""
    prompts, responses = [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows]
    for source in (None, reward_dir):
        plain, _ = load_critic(source, policy_dir, 0)
        assert np.abs(np.concatenate(sequence_values(plain, prompts, responses))).max() > 1e-3
        zeroed, _ = load_critic(source, policy_dir, 0, zero_head=True)
        assert np.abs(np.concatenate(sequence_values(zeroed, prompts, responses))).max() == 0.0


def test_adaptive_kl_follows_the_target_and_its_state_round_trips():
    ctl = AdaptiveKL(0.2, target=6.0, horizon=10000)
    assert ctl.update(12.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))  # error clipped to +0.2
    up = ctl.value
    assert ctl.update(5.4, 256) == pytest.approx(up * (1 - 0.1 * 256 / 10000)) and ctl.value < up
    state = json.loads(json.dumps(ctl.state()))
    again = kl_controller(state)
    assert isinstance(again, AdaptiveKL) and again.state() == ctl.state()
    assert again.update(1.0, 100) < ctl.value  # far below the target: down (clipped to -0.2)
    fixed = kl_controller(json.loads(json.dumps(FixedKL(0.05).state())))
    assert isinstance(fixed, FixedKL) and fixed.update(100.0, 1000) == 0.05


# ------------------------------------------------------------------ the update, from and to directories

# 8 samples, 2 minibatches of 4 per epoch: 8 optimizer steps. The critic at its own, higher rate.
PPO = dict(lr=1e-5, critic_lr=3e-4, ppo_epochs=4, mini_batch_size=4, kl_coef=0.05, vf_coef=0.5, seed=0)


def test_run_ppo_update_trains_policy_and_critic_and_writes_both(policy_dir, reward_dir, rows, tmp_path):
    from mlxcore.io import read_manifest
    from mlxcore.models.generate import load_chat

    m = run_ppo_update(policy_dir, reward_dir, policy_dir, rows, tmp_path / "it1", **PPO)
    assert m["steps"] == 8 and m["samples"] == 8 and m["grad_norm"] > 0 and m["kl"] == pytest.approx(0.0, abs=1e-5)
    out = tmp_path / "it1"
    new_policy, _ = load_chat(out / "model")  # a plain model dir, tokenizer included
    critic, _ = reward.load(out / "critic")  # reward-model layout
    assert reward.is_reward_dir(out / "critic") and not reward.is_reward_dir(out / "model")
    assert read_manifest(out, "rl-update")["metrics"]["steps"] == 8 and (out / "optimizer.safetensors").exists()
    assert not (tmp_path / "it1-train").exists()
    before, after = _weights(policy_dir), _weights(out / "model")
    assert set(before) == set(after) and any(not np.allclose(before[k], after[k]) for k in before)
    rm, cr = _weights(reward_dir), _weights(out / "critic")
    assert set(rm) == set(cr) and not np.allclose(rm["score.weight"], cr["score.weight"])
    # the critic moved toward the returns: value loss falls epoch by epoch, and on the rows
    assert len(m["value_loss_by_epoch"]) == 4 and m["value_loss_by_epoch"][-1] < 0.8 * m["value_loss_by_epoch"][0]
    assert 0 < m["approx_kl"] < 0.1 and m["policy_loss_by_epoch"][-1] < m["policy_loss_by_epoch"][0]
    items, _ = prepare_ppo_items(reward.load(reward_dir)[0], None, rows, kl_coef=0.0)  # the returns trained on
                                                                                        # (the reference is the policy: KL 0)
    ps, rs = [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows]
    ret = np.concatenate([it["returns"] for it in items])
    err_before = np.mean((np.concatenate([it["old_values"] for it in items]) - ret) ** 2)
    err_after = np.mean((np.concatenate(sequence_values(critic, ps, rs)) - ret) ** 2)
    assert err_after < 0.5 * err_before
    # the next iteration starts from this critic and these moments
    m2 = run_ppo_update(out / "model", out / "critic", policy_dir, rows, tmp_path / "it2", optimizer_from=out,
                        **PPO | {"ppo_epochs": 1})
    assert m2["steps"] == 2 and m2["moments_carried"] and not m["moments_carried"]
    assert m2["explained_variance"] > m["explained_variance"] + 0.3  # its critic learned the returns


def test_no_update_and_a_tiny_lr_leave_policy_and_critic_as_they_were(policy_dir, reward_dir, rows, tmp_path):
    m = run_ppo_update(policy_dir, reward_dir, policy_dir, rows, tmp_path / "none", **PPO | {"ppo_epochs": 0})
    assert m["steps"] == 0 and m["value_loss"] is None
    for src, dst in ((policy_dir, "model"), (reward_dir, "critic")):
        a, b = _weights(src), _weights(tmp_path / "none" / dst)
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    m = run_ppo_update(policy_dir, reward_dir, policy_dir, rows, tmp_path / "tiny", **PPO | {"lr": 1e-12, "critic_lr": 1e-12, "ppo_epochs": 1})
    assert m["steps"] == 2
    for src, dst in ((policy_dir, "model"), (reward_dir, "critic")):
        a, b = _weights(src), _weights(tmp_path / "tiny" / dst)
        assert all(np.allclose(a[k], b[k], rtol=0, atol=1e-9) for k in a)


def test_a_killed_update_resumes_to_the_same_weights(policy_dir, rows, tmp_path):
    """A fresh critic (no reward model) at its own learning rate; stopped after the checkpoint of
    step 2 (as a kill would), the update resumes and ends where an uninterrupted one does."""
    from mlxcore.train.callbacks import TrainingCallback

    cfg = PPO | {"critic_lr": 1e-3, "warmup_steps": 1, "min_lr_ratio": 0.1, "ppo_epochs": 2}  # 4 steps, a checkpoint each
    whole = run_ppo_update(policy_dir, None, policy_dir, rows, tmp_path / "whole", **cfg)

    class Stop(TrainingCallback):
        def on_checkpoint(self, info):
            if info["step"] == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_ppo_update(policy_dir, None, policy_dir, rows, tmp_path / "cut", **cfg, callback=Stop())
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut-train/checkpoints/step-00000002").is_dir()
    begins = []

    class Seen(TrainingCallback):
        def on_begin(self, info):
            begins.append(info)

    resumed = run_ppo_update(policy_dir, None, policy_dir, rows, tmp_path / "cut", **cfg, callback=Seen())
    assert begins[0]["start_step"] == 2 and resumed["steps"] == whole["steps"] == 4
    for name in ("model", "critic"):
        a, b = _weights(tmp_path / "whole" / name), _weights(tmp_path / "cut" / name)
        assert all(np.array_equal(a[k], b[k]) for k in a), f"resumed {name} weights differ"
    assert resumed["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    # the fresh critic was the policy's decoder with a new head: a reward-model dir now
    critic, config = load_critic(tmp_path / "whole" / "critic", policy_dir)
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and critic.score.weight.shape[0] == 1
