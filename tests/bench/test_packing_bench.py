"""bench/packing.py runs end to end on a few GSM8K rows with a tiny model: both sides train through
`fit` from the same weights on the same held-out rows, feed comparable tokens a step, and the
printed ratio is the one its numbers give. Speed itself is not asserted (timings here are noisy).
Needs $MLXFLOW_TEST_DATA (GSM8K and the MiniMind tokenizer); skips without it."""

from __future__ import annotations

import math
import re

import pytest

from bench import packing as bench

# 3000 tokens: every padded side takes more steps than there are widths (256 / 32), so some steps
# reuse a compiled shape and its steady-state tok/s exists
TINY = ["--rows", "300", "--val-rows", "16", "--seq-len", "256", "--packs", "1", "--tokens", "3000",
        "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate", "64",
        "--sides", "pack,length,none,length@1"]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_tiny_packing_bench_reports_both_sides(test_data, capsys, tmp_path):
    res = bench.main(TINY + ["--gsm8k", str(test_data / "gsm8k"), "--tokenizer", str(test_data / "minimind_tokenizer"),
                             "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    pack, length = res["pack"], res["length"]
    assert res["train_rows"] == 300 and 0.8 < res["pack_fill"] <= 1.0
    assert list(res["sides"]) == ["pack", "length", "none", "length@1"]
    for side in res["sides"].values():
        assert _positive(side["steady_tok_per_s"]) and _positive(side["end_to_end_tok_per_s"])
        assert side["trained_tokens"] >= 3000 * 0.9 and side["loss_tokens"] < side["trained_tokens"] <= side["fed_tokens"]
        assert math.isfinite(side["val_loss"])
    assert pack["compiled_shapes"] == 1 and pack["fed_tokens"] == pack["steps"] * 256
    # same weights, same held-out rows: the same starting loss on every side
    for side in res["sides"].values():
        assert side["initial_val_loss"] == pytest.approx(pack["initial_val_loss"], rel=1e-6)
    # "same batch tokens": the padded sides' rows a batch feed about what one pack of 256 does
    for name in ("length", "none"):
        assert abs(res["sides"][name]["epoch"]["fed_per_batch"] - 256) < 0.35 * 256, name
    assert res["ratios_steady"]["none"] == pytest.approx(pack["steady_tok_per_s"] / res["sides"]["none"]["steady_tok_per_s"])
    assert res["reshuffle_val_loss_diffs"]["length@1"] == pytest.approx(
        res["sides"]["length@1"]["val_loss"] - length["val_loss"])
    assert res["ratio_steady"] == pytest.approx(pack["steady_tok_per_s"] / length["steady_tok_per_s"])
    m = re.search(re.escape(bench.FINAL_PREFIX) + r"([0-9.]+)x steady state \(([0-9.]+)x end to end\)", out)
    assert m, out[-2000:]
    assert float(m.group(1)) == pytest.approx(res["ratio_steady"], abs=0.006)
    assert float(m.group(2)) == pytest.approx(res["ratio_end_to_end"], abs=0.006)
    assert (tmp_path / "r.json").exists()
