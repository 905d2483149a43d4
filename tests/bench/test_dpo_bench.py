"""bench/dpo_vs_mlx_lm_lora.py runs end to end with a tiny model and 2 steps: both sides report a
positive throughput, start from the same loss (ln 2: policy == reference), and the printed ratio
is the one its numbers give. Speed itself is not asserted (timings on this machine are noisy).
mlx-lm-lora is not a dependency of mlxflow: its case skips when it does not import."""

from __future__ import annotations

import math
import re

import pytest

from bench import dpo_vs_mlx_lm_lora as bench

TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
        "--vocab", "512", "--batch", "2", "--prompt", "8", "--response", "8",
        "--warmup", "0", "--steps", "2", "--ref-repeats", "1", "--blas-threads", "1"]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("theirs,kernels", [("mlx-lm-lora", "mlx-lm"), ("plain", "mlxcore")])
def test_tiny_dpo_bench_reports_both_sides(theirs, kernels, capsys, tmp_path):
    if theirs == "mlx-lm-lora" and bench.mlx_lm_lora_version() is None:
        pytest.skip("mlx_lm_lora does not import here")
    res = bench.main(TINY + ["--theirs", theirs, "--their-kernels", kernels, "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    ours, their = res["ours"], res["theirs"]
    assert res["reference_impl"] == theirs and res["their_kernels"] == kernels
    assert (res["mlx_lm_lora_version"] is not None) == (theirs == "mlx-lm-lora")
    for row in (ours, their, res["ours_with_reference"]):
        assert _positive(row["tok_per_s"]) and _positive(row["pairs_per_s"]) and _positive(row["peak_mem_bytes"])
        assert len(row["step_times_ms"]) == 2
    for row in (ours, their):
        assert row["active_mem_before_bytes"] < 16 << 20  # the other side's models were freed first
        assert row["tok_per_s"] == pytest.approx(res["tokens_per_step"] / (row["step_ms"] / 1e3))
    assert res["tokens_per_step"] == 2 * 2 * (8 + 8)
    assert _positive(res["reference_pass"]["ms"])
    # same initial weights and data, policy == reference: both losses are ln 2
    assert ours["initial_loss"] == pytest.approx(their["initial_loss"], abs=1e-4)
    assert ours["initial_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert res["initial_losses_agree"]
    # the same update rule (AdamW, no clipping) on both sides: the losses stay together
    assert ours["final_loss"] == pytest.approx(their["final_loss"], abs=1e-4)
    assert res["ratio_tok_per_s"] == pytest.approx(ours["tok_per_s"] / their["tok_per_s"])
    assert res["ratio_peak_mem"] == pytest.approx(ours["peak_mem_bytes"] / their["peak_mem_bytes"])
    m = re.search(re.escape(bench.FINAL_PREFIX) + r"tok/s ([0-9.]+)x .* peak memory ([0-9.]+)x", out)
    assert m, out[-2000:]
    assert float(m.group(1)) == pytest.approx(res["ratio_tok_per_s"], abs=0.006)
    assert float(m.group(2)) == pytest.approx(res["ratio_peak_mem"], abs=0.006)
    assert (tmp_path / "r.json").exists()
