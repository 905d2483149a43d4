"""GSM8K answer extraction and rewards (against real GSM8K answers) and the GRPO objective (objectives.py)."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from mlxcore.rl.objectives import advantages, policy_loss


def group_advantages(rewards, scale_rewards=True):
    return advantages(rewards, "grpo", scale=scale_rewards)


def grpo_loss(logp, old, adv, mask, clip_eps=0.2, beta=0.0, ref_logp=None):
    return policy_loss(logp, old, adv, mask, "grpo", clip_low=clip_eps, beta=beta, ref_logp=ref_logp)
from mlxcore.rl.rewards import correctness_reward, extract_answer, format_reward, gsm8k_truth, reward


@pytest.mark.parametrize("text, want", [
    ("so 5 + 3 = 8\n#### 8", "8"),
    ("#### 1,000", "1000"),
    ("The total is $1,234.00.", "1234"),
    ("It drops by 7 degrees, so it ends at -3.", "-3"),
    ("#### -12", "-12"),
    ("So she pays 12.50 dollars.", "12.5"),
    ("She pays 5 + 7.50 = 12.50 dollars.", "12.5"),
    ("Answer: 12", "12"),
    ("42", "42"),
    # no stated final answer: a bare last number is not one (restated question, unfinished work)
    ("It drops by 7 degrees, to -3", None),
    ("she pays 12.50 dollars", None),
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.", None),
    ("First 48 / 2 = 24, then we add 48 and", None),
    ("<think>48 + 24 = 72", None),
    ("#### 18.0", "18"),
    ("#### $20", "20"),
    ("First 4, then 6.\n#### 10\n", "10"),
    ("#### ten", "10"),
    ("no number here", None),
    ("", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_rewards():
    assert correctness_reward("So she has 1,200 left.\n#### 1,200", "1200") == 1.0
    assert correctness_reward("#### 1201", "1200") == 0.0
    assert format_reward("work...\n#### 42") == 1.0 and format_reward("The answer is 42.") == 0.0
    assert reward("#### 42", "42", format_weight=0.5) == 1.5 and reward("42", "42", format_weight=0.5) == 1.0
    # a response that restates the question, with the right number in it, earns nothing
    question = "Weng earns $12 an hour. She did 50 minutes of babysitting. How much did she earn? She earned 10"
    assert correctness_reward(question, "10") == 0.0
    assert correctness_reward("To find her pay we take 12 and 50 and get 10 ...", "10") == 0.0
    assert correctness_reward("12 / 60 = 0.2 per minute, so she earned 0.2 x 50 = 10 dollars.", "10") == 1.0


def test_every_real_gsm8k_answer_extracts_to_its_final_number(test_data):
    rows = [json.loads(line) for line in (test_data / "gsm8k/train.jsonl").open()]
    rows += [json.loads(line) for line in (test_data / "gsm8k/test.jsonl").open()]
    assert len(rows) == 7473 + 1319
    kinds = {"comma": 0, "negative": 0, "decimal": 0}
    for r in rows:
        final = r["answer"].rsplit("####", 1)[1].strip()
        truth = gsm8k_truth(r["answer"])
        assert truth == final.replace(",", "").removesuffix(".0") or float(truth) == float(final.replace(",", ""))
        assert correctness_reward(r["answer"], truth) == 1.0 and format_reward(r["answer"]) == 1.0
        # the same number written the way a model might: commas, a dollar sign, a full stop
        assert correctness_reward(f"The answer is ${float(truth):,.2f}.", truth) == 1.0
        assert correctness_reward(f"#### {truth}.0", truth) == 1.0  # a trailing .0 is the same number
        assert correctness_reward(f"#### {int(truth) + 1}", truth) == 0.0
        kinds["comma"] += "," in final
        kinds["negative"] += final.startswith("-")
        kinds["decimal"] += "." in r["answer"].rsplit("####", 1)[0]  # decimals in the worked steps
    assert all(v > 0 for v in kinds.values()), kinds  # the real data has all three (final answers are integers)


def test_group_advantages_by_hand():
    adv, zero = group_advantages(np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]))
    assert zero.tolist() == [False, True, False]
    # group 0: mean 0.5, std 0.5 -> +-1; group 2: mean 0.25, std sqrt(3)/4
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], atol=1e-3)
    assert adv[1].tolist() == [0, 0, 0, 0]
    s = math.sqrt(3) / 4
    np.testing.assert_allclose(adv[2], [-0.25 / s, -0.25 / s, -0.25 / s, 0.75 / s], atol=1e-3)
    centred, _ = group_advantages(np.array([[0.0, 0.0, 0.0, 1.0]]), scale_rewards=False)
    np.testing.assert_allclose(centred[0], [-0.25, -0.25, -0.25, 0.75])


def test_clipped_objective_by_hand():
    old = mx.log(mx.array([[0.5, 0.5, 0.5]]))
    new = mx.log(mx.array([[0.5, 0.75, 0.25]]))  # ratios 1, 1.5, 0.5
    mask = mx.array([[1.0, 1.0, 1.0]])
    for adv, want_terms, want_clipped in (
        (1.0, [1.0, 1.2, 0.5], 1 / 3),  # A > 0: min(r, clip(r)) -> 1, 1.2 (clipped), 0.5
        (-1.0, [-1.0, -1.5, -0.8], 1 / 3),  # A < 0: min(-r, -clip(r)) -> -1, -1.5, -0.8 (clipped)
    ):
        loss, m = grpo_loss(new, old, mx.array([adv]), mask, clip_eps=0.2)
        assert loss.item() == pytest.approx(-sum(want_terms) / 3, abs=1e-5)
        assert m["clip_fraction"].item() == pytest.approx(want_clipped, abs=1e-6)
    # masked tokens do not count, and the mean is over tokens, not sequences
    loss, _ = grpo_loss(new, old, mx.array([1.0]), mx.array([[1.0, 1.0, 0.0]]), clip_eps=0.2)
    assert loss.item() == pytest.approx(-(1.0 + 1.2) / 2, abs=1e-5)


def test_kl_is_zero_at_the_reference_and_positive_away_from_it():
    logp = mx.log(mx.array([[0.2, 0.7, 0.1]]))
    mask = mx.ones((1, 3))
    loss0, m0 = grpo_loss(logp, logp, mx.array([0.0]), mask, beta=0.1, ref_logp=logp)
    assert m0["kl"].item() == 0.0 and loss0.item() == 0.0
    ref = mx.log(mx.array([[0.3, 0.5, 0.2]]))
    _, m1 = grpo_loss(logp, logp, mx.array([0.0]), mask, beta=0.1, ref_logp=ref)
    d = np.log([0.3, 0.5, 0.2]) - np.log([0.2, 0.7, 0.1])
    assert m1["kl"].item() == pytest.approx(float(np.mean(np.exp(d) - d - 1)), rel=1e-5) and m1["kl"].item() > 0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, mx.array([0.0]), mask, beta=0.1)
