"""bench/sft_vs_mlx_lm.py --smoke runs end to end: ours, mlx-lm's trainer and mlx-lm-lora's SFT
trainer load the same model dir, train the same tokens of the same batch, start from the same loss
(and, with the same AdamW and no clipping, end at it), and the printed ratios are the ones their
numbers give. Speed itself is not asserted (timings on this machine are noisy). mlx-lm-lora is not
a dependency of mlxflow: without it only ours vs mlx-lm runs."""

from __future__ import annotations

import math
import re

import pytest

from bench import sft_vs_mlx_lm as bench


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_sft_bench_reports_every_side(capsys, tmp_path):
    sides = "ours,mlx-lm,mlx-lm-lora" if bench.mlx_lm_lora_version() else "ours,mlx-lm"
    res = bench.main(["--smoke", "--blas-threads", "1", "--sides", sides, "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    rows = {r["side"]: r for r in res["rows"]}
    assert list(rows) == sides.split(",")
    ours = rows["ours"]
    steps = 1 + 2  # smoke: 1 warmup + 1 round of 2 steps
    for r in rows.values():
        assert _positive(r["tok_per_s"]) and _positive(r["peak_mem_bytes"]) and len(r["step_times_ms"]) == 2
        assert r["tokens_per_step"] == [res["trained_tokens_per_step"]] * steps  # the same masked tokens
        assert r["tok_per_s"] == pytest.approx(res["trained_tokens_per_step"] / (r["step_ms"] / 1e3))
    assert 0 < res["trained_tokens_per_step"] < 2 * 128
    for name, r in rows.items():
        if name == "ours":
            continue
        q = res["ratios"][name]
        assert r["initial_loss"] == pytest.approx(ours["initial_loss"], abs=bench.LOSS_ATOL) and q["initial_losses_agree"]
        assert r["final_loss"] == pytest.approx(ours["final_loss"], abs=1e-4)  # same update rule on every side
        assert q["tok_per_s"] == pytest.approx(ours["tok_per_s"] / r["tok_per_s"])
        m = re.search(re.escape(f"{bench.FINAL_PREFIX}{name}: ") + r"tok/s ([0-9.]+)x .* peak memory ([0-9.]+)x .*agrees", out)
        assert m, out[-2000:]
        assert float(m.group(1)) == pytest.approx(q["tok_per_s"], abs=0.006)
        assert float(m.group(2)) == pytest.approx(q["peak_mem"], abs=0.006)
    assert (tmp_path / "r.json").exists()
