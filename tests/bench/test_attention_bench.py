"""bench/attention_vs_torch.py runs on the `tiny` preset on this CPU: both layouts timed in both
frameworks, and the two frameworks' causal GQA attention (output and the three input gradients)
agree to float32 rounding on the same values. Speed itself is not asserted."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from bench import attention_vs_torch as bench  # noqa: E402


def test_both_layouts_are_timed_and_the_frameworks_agree(capsys):
    rows = bench.main(["--preset", "tiny", "--batch", "2", "--seq", "48", "--dtype", "float32", "--repeats", "2"])
    assert list(rows) == list(bench.LAYOUTS)
    for layout, row in rows.items():
        assert all(row[k] > 0 for k in ("mlx_fwd_ms", "torch_fwd_ms", "mlx_fwd_bwd_ms", "torch_fwd_bwd_ms")), layout
        assert row["out_diff"] <= 1e-5 and row["grad_diff"] <= 1e-4, (layout, row)
    printed = capsys.readouterr().out
    assert "heads view" in printed and "ours / PyTorch" in printed


def test_kv_heads_override_and_the_kernel_listing_off_cuda(capsys):
    """`--kv-heads 4` on `tiny` (4 query heads): plain multi-head attention, still agreeing;
    `--kernels` off CUDA says it needs a GPU; a count that does not divide the heads fails."""
    rows = bench.main(["--preset", "tiny", "--batch", "1", "--seq", "16", "--dtype", "float32", "--repeats", "1",
                       "--kv-heads", "4", "--kernels", "3"])
    assert all(row["out_diff"] <= 1e-5 and row["grad_diff"] <= 1e-4 for row in rows.values())
    printed = capsys.readouterr().out
    assert "4 heads (4 kv)" in printed and "no GPU here" in printed
    with pytest.raises(SystemExit, match="must divide"):
        bench.main(["--preset", "tiny", "--kv-heads", "3"])
