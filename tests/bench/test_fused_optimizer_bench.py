"""bench/fused_optimizer.py runs end to end on the `tiny` preset: every path it times reports a
positive time, and, after the same updates from the same gradients, the same parameters as MLX's
per-tensor path: bit for bit for the CPU AdamW kernel ("one kernel"), within float32 rounding for
the flat-buffer paths (their clip norm sums in another order). Speed itself is not asserted."""

from __future__ import annotations

import math

from bench import fused_optimizer as bench
from mlxcore import kernels


def test_every_path_is_timed_and_lands_on_the_per_tensor_parameters(capsys):
    out = bench.main(["--preset", "tiny", "--reps", "2"])
    printed = capsys.readouterr().out
    names = ["per-tensor", "fused", "fused, kept buffers"] + (["one kernel"] if kernels.available() else [])
    assert list(out) == names
    for name in names:
        assert math.isfinite(out[name]["median_ms"]) and out[name]["min_ms"] > 0
    for name in names[1:]:
        assert out[name]["max_abs_diff"] <= 1e-6, name
        assert f"{name} / per-tensor" in printed
    if kernels.available():
        assert out["one kernel"]["max_abs_diff"] == 0.0
