"""The GRPO-family objectives (grpo, dapo, dr_grpo, gspo, rloo) on a tiny random model."""

import copy
import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxcore.rl.objectives import token_logprobs
from mlxcore.rl.objectives import (DEFAULTS, VARIANTS, PolicyLoss, advantages, objective_sums, policy_items,
                                   policy_loss, truncated)

from tests.conftest import tiny_hf_config

VOCAB = 96
MAX_TOKENS = 8  # the "rollout's" generation budget
EPS = 1e-4


def _model(seed: int = 0):
    from mlxcore.models.model import from_config

    config = tiny_hf_config("qwen2", VOCAB)
    return from_config(config, seed=seed), config


@pytest.fixture(scope="module")
def model():
    return _model()[0]


def sequence_logprobs(model, prompts, responses):
    """The rollout's scoring (`loop.sequence_logprobs`): log pi of each response token, one forward pass."""
    full = [p + r for p, r in zip(prompts, responses)]
    x = np.zeros((len(full), max(map(len, full))), dtype=np.int32)
    for i, s in enumerate(full):
        x[i, : len(s)] = s
    lp = np.array(token_logprobs(model, mx.array(x[:, :-1]), mx.array(x[:, 1:])))
    return [lp[i, len(p) - 1: len(p) - 1 + len(r)].tolist() for i, (p, r) in enumerate(zip(prompts, responses))]


def _rows(model, rewards, seed=0, finish=None, lengths=None):
    """Buffer rows (as `read_buffer` gives them) of random prompts/responses, scored by `model`."""
    rng = np.random.default_rng(seed)
    rows = []
    for g, rs in enumerate(rewards):
        prompt = rng.integers(1, VOCAB, size=3 + g).tolist()
        for s, r in enumerate(rs):
            n = lengths[g][s] if lengths is not None else int(rng.integers(2, MAX_TOKENS))
            rows.append({"id": f"p{g}/{s}", "prompt_id": f"p{g}", "sample": s, "reward": float(r), "correct": float(r),
                         "prompt_ids": prompt, "response_ids": rng.integers(1, VOCAB, size=n).tolist(),
                         "finish_reason": finish[g][s] if finish is not None else "stop"})
    old = sequence_logprobs(model, [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows])
    for r, lp in zip(rows, old):
        r["old_logprobs"] = lp
    return rows


def _by_hand(rewards, variant):
    """Advantages straight from the definitions, one sample at a time."""
    out = []
    for g in rewards:
        g = [float(x) for x in g]
        k, mean = len(g), sum(g) / len(g)
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / k)
        if std < 1e-8:
            out.append([0.0] * k)
        elif variant in ("grpo", "dapo", "gspo"):
            out.append([(x - mean) / (std + EPS) for x in g])
        elif variant == "dr_grpo":
            out.append([x - mean for x in g])
        else:  # rloo: minus the mean of the others
            out.append([x - (sum(g) - x) / (k - 1) for x in g])
    return np.array(out)


def _run(loss, model, items):
    arrays = tuple(map(mx.array, loss.prepare(items)))
    return loss(model, *arrays), arrays


def _grad_norm(loss, model, arrays):
    def f(m, *a):
        s, n, _ = loss(m, *a)
        return s / mx.maximum(n, 1.0)

    value, grads = nn.value_and_grad(model, f)(model, *arrays)
    return value.item(), math.sqrt(sum(float((g * g).sum()) for _, g in tree_flatten(grads)))


REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0]]


def test_defaults_are_documented_for_every_variant():
    assert set(DEFAULTS) == set(VARIANTS) == {"grpo", "dapo", "dr_grpo", "gspo", "rloo"}
    assert (DEFAULTS["grpo"]["clip_low"], DEFAULTS["grpo"]["clip_high"]) == (0.2, 0.2)
    dapo = DEFAULTS["dapo"]
    assert (dapo["clip_low"], dapo["clip_high"], dapo["overlong_filter"]) == (0.2, 0.28, True)
    assert (DEFAULTS["gspo"]["clip_low"], DEFAULTS["gspo"]["clip_high"]) == (3e-4, 4e-4)
    loss = PolicyLoss("dapo")
    assert (loss.clip_low, loss.clip_high, loss.overlong_filter, loss.beta) == (0.2, 0.28, True, 0.0)
    assert PolicyLoss("dapo", clip_high=0.3, overlong_filter=False).clip_high == 0.3
    # a symmetric variant given only clip_low stays symmetric; an asymmetric one keeps its upper default
    assert (PolicyLoss("grpo", clip_low=0.1).clip_high, PolicyLoss("rloo", clip_low=0.1).clip_high) == (0.1, 0.1)
    assert PolicyLoss("dapo", clip_low=0.1).clip_high == 0.28 and PolicyLoss("gspo", clip_low=1e-4).clip_high == 4e-4
    with pytest.raises(ValueError, match="max_tokens"):
        PolicyLoss("dr_grpo")
    with pytest.raises(ValueError, match="unknown"):
        PolicyLoss("ppo")


@pytest.mark.parametrize("variant", VARIANTS)
def test_advantages_by_hand(variant):
    adv, zero = advantages(np.array(REWARDS), variant, EPS)
    assert adv.dtype == np.float32 and zero.tolist() == [False, False, True]
    np.testing.assert_allclose(adv, _by_hand(REWARDS, variant), rtol=1e-5, atol=1e-6)
    if variant == "rloo":  # K/(K-1) x (r - mean)
        np.testing.assert_allclose(adv[0], [2 / 3, -2 / 3, -2 / 3, 2 / 3], atol=1e-6)
    if variant == "dr_grpo":
        np.testing.assert_allclose(adv[0], [0.5, -0.5, -0.5, 0.5], atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_first_step_loss_is_minus_the_weighted_advantage_and_has_a_gradient(model, variant):
    rows = _rows(model, REWARDS, seed=1)
    items, metrics = policy_items(rows, variant)
    assert metrics["zero_variance_groups"] == 1 and metrics["samples_used"] == 8 and metrics["variant"] == variant
    adv = _by_hand(REWARDS, variant)[:2].reshape(-1)  # the all-equal group is left out
    np.testing.assert_allclose([a for _, a in items], adv, rtol=1e-5, atol=1e-6)
    lens = np.array([len(r["response_ids"]) for r, _ in items], dtype=np.float64)
    want = {"dr_grpo": -(adv * lens).sum() / (len(items) * MAX_TOKENS), "gspo": -adv.mean()}.get(
        variant, -(adv * lens).sum() / lens.sum())
    loss = PolicyLoss(variant, max_tokens=MAX_TOKENS)
    (loss_sum, n, sums), arrays = _run(loss, model, items)
    want_n = {"dr_grpo": len(items) * MAX_TOKENS, "gspo": len(items)}.get(variant, lens.sum())
    assert n.item() == want_n
    assert loss_sum.item() / n.item() == pytest.approx(want, abs=1e-5)
    assert sums["ratio"].item() / n.item() == pytest.approx(1.0, abs=1e-5)  # the rollout policy: ratio 1
    assert sums["clip_fraction"].item() == 0.0 and sums["kl"].item() == 0.0
    value, norm = _grad_norm(loss, model, arrays)
    assert value == pytest.approx(want, abs=1e-5) and norm > 1e-4  # a policy-gradient signal


def test_group_size_two_stays_finite_and_bounded():
    rewards = np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 1e-9], [0.0, 1e-6], [3.0, -2.0]])
    for variant in VARIANTS:
        adv, zero = advantages(rewards, variant)
        assert np.isfinite(adv).all() and zero.tolist() == [False, True, True, False, False], variant
        assert (adv[1] == 0).all() and (adv[2] == 0).all()
        if DEFAULTS[variant]["advantage"] == "std":
            assert np.abs(adv).max() <= 1.0 + 1e-6
            np.testing.assert_allclose(adv[0], [-1, 1], atol=1e-3)
            assert np.abs(adv[3]).max() < 0.01  # a near-tie stays small (eps), never blows up
    np.testing.assert_allclose(advantages(rewards, "rloo")[0][0], [-1, 1])
    np.testing.assert_allclose(advantages(rewards, "dr_grpo")[0][4], [2.5, -2.5])
    with pytest.raises(ValueError, match="K=1"):
        advantages(np.array([[1.0], [0.0]]), "rloo")
    with pytest.raises(ValueError, match="finite"):
        advantages(np.array([[np.nan, 1.0]]), "grpo")


@pytest.mark.parametrize("variant", VARIANTS)
def test_group_size_two_loss_and_gradient_are_finite(model, variant):
    rewards = [[0.0, 1.0], [1.0, 1.0], [0.0, 1e-9], [1.0, 0.0]]
    items, metrics = policy_items(_rows(model, rewards, seed=2), variant)
    assert metrics["zero_variance_groups"] == 2 and len(items) == 4
    loss = PolicyLoss(variant, max_tokens=MAX_TOKENS, beta=0.1)
    for r, _ in items:
        r["ref_logprobs"] = [x - 0.05 for x in r["old_logprobs"]]  # a reference slightly off the policy
    (loss_sum, n, sums), arrays = _run(loss, model, items)
    assert all(math.isfinite(v.item()) for v in (loss_sum, n, *sums.values())) and sums["kl"].item() > 0
    value, norm = _grad_norm(loss, model, arrays)
    assert math.isfinite(value) and math.isfinite(norm) and norm > 0


def test_dapo_clips_asymmetrically_by_hand():
    old = mx.log(mx.array([[0.4] * 5]))
    new = mx.log(mx.array([[0.4, 0.5, 0.54, 0.34, 0.3]]))  # ratios 1, 1.25, 1.35, 0.85, 0.75
    mask = mx.ones((1, 5))
    for a, terms, clipped in (
        (1.0, [1.0, 1.25, 1.28, 0.85, 0.75], 1 / 5),  # A > 0: only 1.35 > 1.28 clips (1.25 does not)
        (-1.0, [-1.0, -1.25, -1.35, -0.85, -0.8], 1 / 5),  # A < 0: only 0.75 < 0.8 clips
    ):
        loss, m = policy_loss(new, old, mx.array([a]), mask, "dapo")
        assert loss.item() == pytest.approx(-sum(terms) / 5, abs=1e-5)
        assert m["clip_fraction"].item() == pytest.approx(clipped, abs=1e-6)
        assert m["ratio"].item() == pytest.approx((1 + 1.25 + 1.35 + 0.85 + 0.75) / 5, abs=1e-5)
    # grpo's symmetric range clips 1.25 at 1.2 where dapo does not
    grpo, _ = policy_loss(new, old, mx.array([1.0]), mask, "grpo")
    assert grpo.item() == pytest.approx(-(1.0 + 1.2 + 1.2 + 0.85 + 0.75) / 5, abs=1e-5)


def test_gspo_clips_the_sequence_ratio_by_hand():
    old = mx.zeros((3, 4))
    # sequence 0: token log-ratios with mean +1e-3 (the last position is padding, a huge value
    # there must not count); sequence 1: mean -1e-3; sequence 2: no response token at all
    new = mx.array([[0.003, -0.002, 0.002, 50.0], [-0.001, -0.001, -0.001, -0.001], [0.0, 0.0, 0.0, 0.0]])
    mask = mx.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    s0, s1 = math.exp(1e-3), math.exp(-1e-3)
    for a, terms, clipped in (
        ([1.0, 1.0, 1.0], [1.0004, s1], 1 / 2),  # s0 > 1 + 4e-4: clipped; s1 below 1 with A > 0: not
        ([-1.0, -1.0, 1.0], [-s0, -0.9997], 1 / 2),  # A < 0: s0 not clipped, s1 < 1 - 3e-4 clipped
    ):
        loss_sum, n, sums = objective_sums(new, old, mx.array(a), mask, "gspo")
        assert n.item() == 2  # per sequence, the empty one not counted
        assert loss_sum.item() / 2 == pytest.approx(-sum(terms) / 2, abs=1e-6)
        assert sums["clip_fraction"].item() / 2 == pytest.approx(clipped)
        assert sums["ratio"].item() / 2 == pytest.approx((s0 + s1) / 2, abs=1e-6)
    # the same log-probs per token (grpo) would give a different loss: ratio per token, clip 0.2
    tok, _ = policy_loss(new, old, mx.array([1.0, 1.0, 1.0]), mask, "grpo")
    assert tok.item() != pytest.approx(-(1.0004 + s1) / 2, abs=1e-6)


def test_dr_grpo_divides_by_the_budget_not_the_length():
    old = mx.zeros((2, 6))
    mask = mx.array([[1.0, 1.0, 0, 0, 0, 0], [1.0] * 6])
    loss_sum, n, _ = objective_sums(old, old, mx.array([1.0, 1.0]), mask, "dr_grpo", max_tokens=10)
    assert n.item() == 20 and loss_sum.item() / 20 == pytest.approx(-(2 + 6) / 20)
    with pytest.raises(ValueError, match="max_tokens"):
        objective_sums(old, old, mx.array([1.0, 1.0]), mask, "dr_grpo")


def test_dapo_overlong_filter_masks_truncated_samples(model):
    finish = [["stop", "length", "stop", "length"], ["length", "stop", "stop", "stop"]]
    rows = _rows(model, REWARDS[:2], seed=3, finish=finish)
    items, metrics = policy_items(rows, "dapo")
    assert metrics["truncated_samples"] == 3 and len(items) == 8
    on = PolicyLoss("dapo")
    x, y, old, adv, mask, ref = on.prepare(items)
    cut = [r["finish_reason"] == "length" for r, _ in items]
    assert [mask[i].sum() == 0 for i in range(len(items))] == cut
    off = PolicyLoss("dapo", overlong_filter=False)
    assert [off.prepare(items)[4][i].sum() for i in range(len(items))] == [len(r["response_ids"]) for r, _ in items]
    # with the filter, the loss is that of the finished samples alone (ratio 1: -sum A n / sum n)
    kept = [(r, a) for r, a in items if r["finish_reason"] != "length"]
    want = -sum(a * len(r["response_ids"]) for r, a in kept) / sum(len(r["response_ids"]) for r, _ in kept)
    every = -sum(a * len(r["response_ids"]) for r, a in items) / sum(len(r["response_ids"]) for r, _ in items)
    assert want != pytest.approx(every, abs=1e-3)
    (s, n, _), _ = _run(on, model, items)
    assert n.item() == sum(len(r["response_ids"]) for r, _ in kept)
    assert s.item() / n.item() == pytest.approx(want, abs=1e-5)
    (s, n, _), _ = _run(off, model, items)
    assert s.item() / n.item() == pytest.approx(every, abs=1e-5)
    # rows written without a finish_reason: truncated means the full budget was used
    assert truncated({"response_ids": [1] * 8}, max_tokens=8) and not truncated({"response_ids": [1] * 7}, max_tokens=8)
    with pytest.raises(ValueError, match="finish_reason"):
        truncated({"response_ids": [1] * 8})


def test_ratios_are_against_the_stored_rollout_logprobs():
    from mlxcore.train.step import make_step

    policy = _model()[0]  # its own copy: this test moves it
    rows = _rows(policy, REWARDS, seed=4)
    items, _ = policy_items(rows, "grpo")
    stored = copy.deepcopy([r["old_logprobs"] for r, _ in items])
    loss = PolicyLoss("grpo")
    step, state = make_step(policy, optim.SGD(learning_rate=0.5), loss=loss, compile=False)
    loss_sum, n, _ = step([items])
    mx.eval(state, loss_sum, n, step.aux)
    assert step.aux["ratio"].item() / n.item() == pytest.approx(1.0, abs=1e-5)  # first step: rollout policy
    assert [r["old_logprobs"] for r, _ in items] == stored  # the items still carry the rollout's values
    (s2, n2, sums), _ = _run(loss, policy, items)
    new = sequence_logprobs(policy, [r["prompt_ids"] for r, _ in items], [r["response_ids"] for r, _ in items])
    ratios = np.exp(np.concatenate(new) - np.concatenate(stored))
    assert abs(ratios.mean() - 1) > 1e-3  # the update moved the policy
    assert sums["ratio"].item() / n2.item() == pytest.approx(ratios.mean(), rel=1e-4)
    assert s2.item() / n2.item() < loss_sum.item() / n.item()  # and it lowered the objective


@pytest.mark.parametrize("variant", ["dr_grpo", "gspo"])
def test_gradient_accumulation_keeps_the_variant_denominator(variant):
    """Two micro-batches of a step give the same loss and update as one batch of both (fit divides
    the summed loss by the summed n: constant budget for dr_grpo, sequences for gspo)."""
    from mlxcore.train.step import make_step

    rows = _rows(_model()[0], REWARDS, seed=5)
    items, _ = policy_items(rows, variant)
    out = []
    for micro in ([items], [items[:3], items[3:]]):
        m = _model()[0]
        step, state = make_step(m, optim.SGD(learning_rate=0.1), loss=PolicyLoss(variant, max_tokens=MAX_TOKENS),
                                compile=False)
        loss_sum, n, _ = step(micro)
        mx.eval(state, loss_sum, n)
        out.append((loss_sum.item() / n.item(), n.item(), {k: np.array(v) for k, v in tree_flatten(m.parameters())}))
    (l1, n1, w1), (l2, n2, w2) = out
    assert n1 == n2 and l1 == pytest.approx(l2, abs=1e-6)
    assert all(np.allclose(w1[k], w2[k], atol=1e-6) for k in w1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_weights_change_after_each_compiled_update(tmp_path, variant):
    """Two steps of `fit` with compile=True and LoRA: the adapters move after each step, and the
    second step's loss is the one of the weights after the first (not of weights baked into the
    compiled graph as constants)."""
    from mlxcore.config import LoRAConfig, TrainConfig
    from mlxcore.models import adapters
    from mlxcore.train.callbacks import TrainingCallback
    from mlxcore.train.loop import fit

    m, config = _model()
    cfg = TrainConfig(steps=2, batch_size=8, lr=0.05, warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0, eval_every=0,
                      save_every=0, log_every=1, compile=True, fine_tune_type="lora", lora=LoRAConfig(rank=4))
    mx.random.seed(0)
    acfg = adapters.prepare(m, cfg)
    items, _ = policy_items(_rows(m, REWARDS, seed=6), variant)  # old log-probs of the adapted (= base) model
    loss = PolicyLoss(variant, max_tokens=MAX_TOKENS)
    arrays = tuple(map(mx.array, loss.prepare(items)))

    def lora():
        return {k: np.array(v) for k, v in adapters.trainable_weights(m).items()}

    def frozen():
        trainable = set(adapters.trainable_weights(m))
        return {k: np.array(v) for k, v in tree_flatten(m.parameters()) if k not in trainable}

    class Same:  # the same batch every step
        def next(self, cursor):
            return items, cursor

    snapshots, losses, expected = [lora()], [], []
    base = frozen()
    assert snapshots[0] and all(k.endswith(("lora_a", "lora_b")) for k in snapshots[0])

    class Watch(TrainingCallback):
        def on_train(self, info):
            snapshots.append(lora())
            losses.append(info["loss"])
            s, n, _ = loss(m, *arrays)  # eager, with the weights the step just wrote
            expected.append(s.item() / n.item())

    fit(m, config, cfg, Same(), None, tmp_path / "run", loss=loss, callback=Watch(), adapter_config=acfg)
    assert len(snapshots) == 3
    for before, after in zip(snapshots, snapshots[1:]):
        assert any(not np.array_equal(before[k], after[k]) for k in before), "LoRA weights did not change"
    adv = np.array([a for _, a in items])
    lens = np.array([len(r["response_ids"]) for r, _ in items])
    first = {"dr_grpo": -(adv * lens).sum() / (len(items) * MAX_TOKENS), "gspo": -adv.mean()}.get(
        variant, -(adv * lens).sum() / lens.sum())
    assert losses[0] == pytest.approx(first, abs=1e-5)  # step 1: the rollout policy, ratio 1
    assert losses[1] == pytest.approx(expected[0], abs=1e-5)  # step 2 saw step 1's adapters
    assert abs(losses[1] - losses[0]) > 1e-5
    assert all(np.array_equal(base[k], v) for k, v in frozen().items())  # the base stays frozen


def test_policy_items_from_a_buffer_file(model, tmp_path):
    """A buffer as rollout writes it: full groups only, zero-variance groups out, rows untouched."""
    import json

    from mlxcore.data.rows import make_row
    from mlxcore.rl.loop import read_buffer

    rows = _rows(model, REWARDS, seed=7, finish=[["stop"] * 4, ["stop", "length", "stop", "stop"], ["stop"] * 4])
    rows[0]["correct"] = None  # a reward without an accuracy term
    partial = dict(rows[-1], prompt_id="p9", id="p9/0", sample=0)  # a group still being sampled
    buf = tmp_path / "buffer.jsonl"
    buf.write_text("".join(json.dumps(make_row(messages=[{"role": "user", "content": "q"}], reply="a", id=r["id"],
                                               category="rl", teacher="c0", verified=False,
                                               **{k: v for k, v in r.items() if k != "id"})) + "\n"
                           for r in rows + [partial]))
    for variant in VARIANTS:
        items, metrics = policy_items(read_buffer(buf), variant)
        assert [r["id"] for r, _ in items] == [f"p{g}/{s}" for g in range(2) for s in range(4)]
        want = _by_hand(REWARDS, variant)[:2].reshape(-1)
        np.testing.assert_allclose([a for _, a in items], want, rtol=1e-5, atol=1e-6)
        assert [r["old_logprobs"] for r, _ in items] == [r["old_logprobs"] for r in rows[:8]]
        assert (metrics["groups"], metrics["zero_variance_groups"], metrics["samples_used"]) == (3, 1, 8)
        assert metrics["truncated_samples"] == 1
        assert metrics["accuracy"] == pytest.approx(np.mean([r["reward"] for r in rows[1:]] + [partial["reward"]]))
