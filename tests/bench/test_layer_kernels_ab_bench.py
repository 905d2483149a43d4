"""bench/layer_kernels_ab.py on the `tiny` preset (CPU): a row per variant, each variant built
under its own settings (the groups variants group each layer's attention and MLP, the others
none) and the same loss to rounding, since every path computes the same function. Speed itself
is not asserted; off CUDA the layer kernels do not apply."""

from __future__ import annotations

import pytest

from bench import layer_kernels_ab as bench
from mlxcore.config import ModelConfig


def test_each_variant_is_built_under_its_setting_and_computes_the_same_loss(capsys, monkeypatch):
    monkeypatch.setenv("MLXFLOW_LEAN_LINEAR", "on")  # the groups' switch (on CUDA by default)
    rows = bench.run(bench.parse_args(["--preset", "tiny", "--dtype", "float32", "--batch", "2", "--seq", "128",
                                       "--warmup", "1", "--rounds", "2", "--variants", "none", "groups", "all"]))
    layers = ModelConfig(preset="tiny").num_layers
    assert {k: r["grouped"] for k, r in rows.items()} == {"none": 0, "groups": 2 * layers, "all": 2 * layers}
    assert rows["none"]["relative"] == 1.0 and all(r["median_ms"] > 0 for r in rows.values())
    for name in ("groups", "all"):
        assert rows[name]["loss"] == pytest.approx(rows["none"]["loss"], rel=1e-5)
    printed = capsys.readouterr().out
    assert "interleaved rounds" in printed and "grouped" in printed
