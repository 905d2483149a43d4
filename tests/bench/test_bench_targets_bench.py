"""bench/bench_targets.py runs end to end (--quick): both sides generate the same tokens (greedy)
and the printed ratio is the one its numbers give. Speed itself is in the README, not asserted."""

import re

import pytest

from bench import bench_targets


def test_quick_bench_targets_reports_both_sides(test_data, capsys, tmp_path):
    res = bench_targets.main(["--quick", "--tokenizer", str(test_data / "minimind_tokenizer"),
                              "--json", str(tmp_path / "r.json")])
    [r] = res["rounds"]
    assert res["questions"] == 7 * 2 and r["ours"]["tokens"] == r["one_at_a_time"]["tokens"] > 0
    assert res["ratio"] == pytest.approx(r["ours"]["tok_per_s"] / r["one_at_a_time"]["tok_per_s"])
    m = re.search(re.escape(bench_targets.FINAL_PREFIX) + r"([0-9.]+)", capsys.readouterr().out)
    assert m and float(m.group(1)) == pytest.approx(res["ratio"], abs=0.006)
    assert (tmp_path / "r.json").exists()
