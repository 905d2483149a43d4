"""bench/retention.py --quick runs end to end on tinyshakespeare: both sides start from the same data and
report finite numbers; retention's decode cache does not grow with the context while llama's does, and the
printed ratios are the ones its numbers give. Speed itself is not asserted (timings here are noisy).
Needs $MLXFLOW_TEST_DATA (tinyshakespeare); skips without it."""

from __future__ import annotations

import math
import re

import pytest

from bench import retention as bench


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_quick_retention_bench_reports_both_sides(test_data, capsys, tmp_path):
    res = bench.main(["--quick", "--text", str(test_data / "tinyshakespeare" / "input.txt"),
                      "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    loss = res["loss"]
    assert loss["llama"]["tokens"] == loss["retention"]["tokens"] > 0
    assert abs(loss["llama"]["params"] - loss["retention"]["params"]) < 0.02 * loss["llama"]["params"]
    for side in loss.values():
        assert side["val_loss_after"] < side["val_loss_before"] and _positive(side["train_tok_per_s"])
    lo, hi = res["args"]["contexts"][0], res["args"]["contexts"][-1]
    dec = res["decode"]
    assert dec["retention"][lo]["cache_bytes"] == dec["retention"][hi]["cache_bytes"] > 0
    assert dec["llama"][hi]["cache_bytes"] > dec["llama"][lo]["cache_bytes"]
    assert all(_positive(r["tok_per_s"]) and _positive(r["peak_bytes"]) for side in dec.values() for r in side.values())
    ratio = float(re.search(r"ratio \(retention / llama\): ([0-9.]+)\n\Z", out).group(1))
    sp = res["train_speed"]
    assert ratio == pytest.approx(sp["retention"]["tok_per_s"] / sp["llama"]["tok_per_s"], abs=1e-3)
    assert (tmp_path / "r.json").is_file()
