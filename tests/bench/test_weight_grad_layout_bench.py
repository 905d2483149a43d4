"""bench/weight_grad_layout.py runs on the `tiny` preset: a row per weight of a layer and the head,
every time positive, and `lean_linear`'s weight gradient equal to autodiff's (float32 here, so to
rounding: the two GEMMs may sum in another order). Speed itself is not asserted."""

from __future__ import annotations

from bench import weight_grad_layout as bench


def test_every_weight_is_timed_both_ways_and_the_gradients_agree(capsys):
    rows = bench.main(["--preset", "tiny", "--tokens", "256", "--dtype", "float32", "--repeats", "2"])
    assert list(rows) == ["qkv", "o_proj", "gate+up", "down", "lm_head"]
    for name, row in rows.items():
        assert all(row[k] > 0 for k in ("autodiff_ms", "lean_ms", "grad_autodiff_ms", "grad_lean_ms")), name
        assert row["max_diff"] <= 1e-4, name
    printed = capsys.readouterr().out
    assert "weight-gradient products of a layer + head" in printed and "ratio" in printed
