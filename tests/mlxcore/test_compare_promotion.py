"""The paired bootstrap, config differences, run records and the champion / challenger rule on known data."""

import json

import numpy as np
import pytest

from mlxcore.tracking import promotion, runrecord
from mlxcore.bench.compare import CompareError, compare, config_diff, paired_bootstrap


def test_identical_outcomes_give_the_interval_zero_zero():
    outcomes = [1, 0, 1, 1, 0, 0, 1, 0] * 10
    stats = paired_bootstrap(outcomes, outcomes)
    assert (stats["delta"], stats["low"], stats["high"], stats["n"]) == (0.0, 0.0, 0.0, 80)


def test_a_clear_improvement_excludes_zero_and_a_coin_flip_does_not():
    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.3
    better = base | (rng.random(200) < 0.5)  # every right answer kept, about half the wrong ones fixed
    stats = paired_bootstrap(base, better)
    assert stats["delta"] == pytest.approx(better.mean() - base.mean())
    assert 0 < stats["low"] < stats["delta"] < stats["high"]
    noise = paired_bootstrap([1, 0] * 50, [0, 1] * 50)  # as many fixed as broken
    assert noise["low"] < 0 < noise["high"]
    # seeded: the same interval every time; a wider confidence gives a wider interval
    assert paired_bootstrap(base, better) == stats
    wide = paired_bootstrap(base, better, confidence=0.99)
    assert wide["low"] <= stats["low"] and wide["high"] >= stats["high"]
    with pytest.raises(ValueError, match="no common questions"):
        paired_bootstrap([], [])


def test_config_diff_lists_only_the_keys_that_differ():
    a = {"sft": {"lr": 1e-3, "steps": 20}, "name": "x", "data": {"files": [1, 2]}}
    b = {"sft": {"lr": 5e-4, "steps": 20}, "name": "x", "data": {"files": [1, 2]}, "extra": {"k": 1}}
    assert config_diff([a, b]) == {"sft.lr": [1e-3, 5e-4], "extra.k": ["<absent>", 1]}
    assert config_diff([a, a]) == {}


def test_run_records_and_clear_errors(tmp_path):
    with pytest.raises(runrecord.RunRecordError, match="is not a run dir: it has no run.json"):
        runrecord.load(tmp_path)
    first = runrecord.write(tmp_path / "r", "pipeline", "r", {"sft": {"lr": 1}}, {}, None)
    second = runrecord.write(tmp_path / "r", "pipeline", "r", {"sft": {"lr": 2}}, {}, None)
    assert runrecord.history(tmp_path / "r") == [first, second]
    assert runrecord.load(tmp_path / "r")["config"] == {"sft": {"lr": 2}}  # the run dir: its latest run
    assert runrecord.load(first)["config"] == {"sft": {"lr": 1}}
    with pytest.raises(CompareError, match="at least two runs"):
        compare([first], tmp_path / "out")
    result = compare([first, second], tmp_path / "out")  # no stages, no bench: the config still compares
    assert result["config_diff"] == {"sft.lr": [1, 2]} and result["bench"] is None
    assert (tmp_path / "out" / "loss-curves.png").read_bytes().startswith(b"\x89PNG")


def test_records_written_across_a_second_boundary_keep_their_order(tmp_path, monkeypatch):
    """A record's name takes its seconds and nanoseconds from one clock read: two runs 2 ms apart
    across a second boundary (15.998919356 s, then 16.000978467 s) are listed in that order (seen
    in a suite run when they came from two reads: 15 s with the next second's nanoseconds)."""
    clock = iter([1_796_556_435_998_919_356, 1_796_556_436_000_978_467])
    monkeypatch.setattr(runrecord.time, "time_ns", lambda: next(clock))
    first = runrecord.write(tmp_path / "r", "pipeline", "r", {"sft": {"lr": 1}}, {}, None)
    second = runrecord.write(tmp_path / "r", "pipeline", "r", {"sft": {"lr": 2}}, {}, None)
    assert runrecord.history(tmp_path / "r") == [first, second]
    assert first.name.startswith("20261206T112715Z-998919356") and second.name.startswith("20261206T112716Z-000978467")


def _outcomes(values, suite="s"):
    return {"metric": "bench", "values": {f"q{i}": float(v) for i, v in enumerate(values)},
            "suites": {f"q{i}": (suite if isinstance(suite, str) else suite[i]) for i in range(len(values))}}


def test_the_rule_promotes_only_a_significant_gain_with_no_suite_past_the_tolerance(tmp_path):
    champion = _outcomes([0] * 60 + [1] * 40)
    assert promotion.decide(None, champion)["promoted"]  # no champion yet
    same = promotion.decide(champion, champion)
    assert not same["promoted"] and same["reason"].startswith("not better") and not same["worse"]
    gain = promotion.decide(champion, _outcomes([1] * 30 + [0] * 30 + [1] * 40))
    assert gain["promoted"] and gain["low"] > 0 and gain["delta"] == pytest.approx(0.3)
    worse = promotion.decide(champion, _outcomes([0] * 100))
    assert not worse["promoted"] and worse["high"] < 0 and worse["worse"] and worse["reason"].startswith("worse")
    # overall better, but one suite loses 5 points > the 2-point tolerance: not promoted
    suites = ["a"] * 80 + ["b"] * 20
    base = _outcomes([0] * 60 + [1] * 20 + [1] * 20, suites)
    mixed = _outcomes([1] * 60 + [1] * 20 + [0] * 1 + [1] * 19, suites)
    verdict = promotion.decide(base, mixed, tolerance=0.02)
    assert verdict["low"] > 0 and not verdict["promoted"] and "suite b lost 0.050 > tolerance 0.02" in verdict["reason"]
    assert promotion.decide(base, mixed, tolerance=0.1)["promoted"]
    # the book: a promoted model becomes the champion; a decision is kept once per key
    book = promotion.Promotion(tmp_path)
    book.record(0, "/m0", promotion.decide(None, champion), champion)
    book.record(1, "/m1", worse, _outcomes([0] * 100))
    book.record(2, "/m2", gain, _outcomes([1] * 30 + [0] * 30 + [1] * 40))
    again = promotion.Promotion(tmp_path)
    assert again.champion["key"] == 2 and again.decided(1)["promoted"] is False
    rows = again.table()
    assert [r["promoted"] for r in rows] == [True, False, True] and rows[2]["interval"].startswith("[+")
    assert "| 1 | bench |" in promotion.markdown(rows)
    assert json.loads((tmp_path / "promotion.json").read_text())["champion"]["checkpoint"] == "/m2"


def test_eval_outcomes_use_accuracy_when_every_prompt_has_it_else_reward():
    acc = promotion.eval_outcomes([{"id": "a", "reward": 0.5, "correct": 1.0}, {"id": "b", "reward": 0.1, "correct": 0.0}])
    assert acc["metric"] == "eval_accuracy" and acc["values"] == {"a": 1.0, "b": 0.0}
    rew = promotion.eval_outcomes([{"id": "a", "reward": 0.5, "correct": None}])
    assert rew["metric"] == "eval_reward" and rew["values"] == {"a": 0.5}


def test_the_registry_is_skipped_without_a_uri_and_a_dead_one_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    assert promotion.register(str(tmp_path), "m", None) is None
    out = promotion.register(str(tmp_path), "m", "http://127.0.0.1:9")  # nothing listens on port 9
    assert out["uri"] == "http://127.0.0.1:9" and "error" in out
