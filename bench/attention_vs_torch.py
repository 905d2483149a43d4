"""Causal GQA attention alone, MLX against PyTorch, forward and forward + backward, in two layouts.

    python bench/attention_vs_torch.py --preset 200mb --batch 32 --seq 1024 --dtype bfloat16

On an H100 the `200mb` step's attention kernels (cuDNN's flash forward and backward in both
frameworks, the same kernels by name) took 15.2 ms in MLX against 11.6 ms in torch
(`bench/kernel_profile.py`). This times the attention mlxcore's training step calls,
`mlxcore.kernels.attention` (on CUDA our cuDNN graph, `mlxcore.kernels.cuda_attention`, or MLX's
`mx.fast.scaled_dot_product_attention` when `MLXFLOW_CUDA_LAYERS` leaves `attention` out; on the Linux CPU the
fused C++ kernel), and torch's `scaled_dot_product_attention` (`is_causal`, `enable_gqa`) on
the same values, each with its gradient, for q / k / v given as

- `contiguous`: [B, H, T, D] arrays, what MLX's RoPE hands the attention in mlx-lm's layers;
- `heads view`: [B, T, H, D] arrays viewed as [B, H, T, D], what a projection's output is before
  any copy (torch's layers pass this view to its attention).

It prints each time (best of `--repeats`, synchronised), ours / PyTorch as a speed ratio, and the
largest difference between the two frameworks' outputs and input gradients. `--kernels N` (CUDA)
also lists each side's N longest kernels of one forward + backward: on an H100 both run cuDNN's
`flash_bprop_..._knob_26` kernel, MLX's for 0.654 ms and torch's for 0.421 (README, "What is left:
attention is MLX-CUDA's cuDNN graph"). `--kv-heads 12` on `200mb` (no GQA) separates grouped heads
from the rest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
import torch
import torch.nn.functional as F

from mlxcore import kernels
from mlxcore.config import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from timing import best_seconds  # noqa: E402

LAYOUTS = ("contiguous", "heads view")


def _inputs(b: int, t: int, h: int, hkv: int, d: int, seed: int = 0) -> list[np.ndarray]:
    """q, k, v and the output's cotangent as float32 [B, T, heads, D] arrays."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((b, t, n, d)).astype(np.float32) for n in (h, hkv, hkv, h)]


def _mlx_side(arrays: list[np.ndarray], layout: str, dtype: str, scale: float, repeats: int) -> dict:
    q, k, v, c = (mx.array(a).astype(getattr(mx, dtype)) for a in arrays)
    if layout == "contiguous":  # a copy into [B, H, T, D] memory
        q, k, v, c = (mx.contiguous(x.transpose(0, 2, 1, 3)) for x in (q, k, v, c))
    else:
        q, k, v, c = (x.transpose(0, 2, 1, 3) for x in (q, k, v, c))
    mx.eval(q, k, v, c)

    def attend(q, k, v):
        return kernels.attention(q, k, v, scale, causal=True)

    fwd = mx.compile(attend)
    grad = mx.compile(mx.grad(lambda q, k, v: (attend(q, k, v) * c).astype(mx.float32).sum(), argnums=(0, 1, 2)))
    out = {"fwd_ms": 1e3 * best_seconds(lambda: mx.eval(fwd(q, k, v)), mx.synchronize, repeats),
           "fwd_bwd_ms": 1e3 * best_seconds(lambda: mx.eval(grad(q, k, v)), mx.synchronize, repeats),
           "fwd_bwd": lambda: mx.eval(grad(q, k, v))}
    values = [fwd(q, k, v), *grad(q, k, v)]
    out["values"] = [np.array(x.astype(mx.float32)) for x in values]  # [B, H, T, D]
    return out


def _torch_side(arrays: list[np.ndarray], layout: str, dtype: str, scale: float, repeats: int,
                device: str, compiled: bool) -> dict:
    tdt = getattr(torch, dtype)
    q, k, v, c = (torch.tensor(a, device=device, dtype=tdt) for a in arrays)
    q, k, v, c = (x.transpose(1, 2) for x in (q, k, v, c))
    if layout == "contiguous":
        q, k, v, c = (x.contiguous() for x in (q, k, v, c))
    for x in (q, k, v):
        x.requires_grad_(True)

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    def fwd_bwd(q, k, v):
        return torch.autograd.grad((attend(q, k, v) * c).float().sum(), (q, k, v))

    if compiled:
        attend_c, fwd_bwd_c = torch.compile(attend), torch.compile(fwd_bwd)
    else:
        attend_c, fwd_bwd_c = attend, fwd_bwd
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        fwd_ms = 1e3 * best_seconds(lambda: attend_c(q, k, v), sync, repeats)
    out = {"fwd_ms": fwd_ms, "fwd_bwd_ms": 1e3 * best_seconds(lambda: fwd_bwd_c(q, k, v), sync, repeats),
           "fwd_bwd": lambda: fwd_bwd_c(q, k, v)}
    with torch.no_grad():
        first = attend(q, k, v)
    out["values"] = [x.detach().float().cpu().numpy() for x in (first, *fwd_bwd(q, k, v))]
    return out


def _kernels(side: dict, top: int) -> list[tuple[float, int, str]]:
    """The `top` CUDA kernels of one forward + backward call (ms and launches per call)."""
    import kernel_profile

    return kernel_profile.profile_step(side["fwd_bwd"], warmup=1, steps=3)[:top]


def run(preset: str, batch: int, seq: int, dtype: str, repeats: int, compiled: bool, kv_heads: int | None = None,
        kernels_top: int = 0) -> dict:
    cfg = ModelConfig(preset=preset)
    h, hkv, d = cfg.num_heads, kv_heads or cfg.num_kv_heads, cfg.resolved_head_dim
    if h % hkv:
        raise SystemExit(f"--kv-heads {hkv} must divide the {h} query heads")
    scale = d ** -0.5
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arrays = _inputs(batch, seq, h, hkv, d)
    print(f"mlx {mx.__version__} on {mx.default_device()} vs torch {torch.__version__} on {device} "
          f"({'compiled' if compiled else 'eager'}); {preset}: B {batch} x T {seq}, {h} heads ({hkv} kv) x {d}, {dtype}")
    print(f"{'layout':<12} {'mlx fwd':>9} {'torch fwd':>10} {'ratio':>6} {'mlx f+b':>9} {'torch f+b':>10} {'ratio':>6} "
          f"{'max |out diff|':>15} {'max |grad diff|':>16}")
    rows = {}
    for layout in LAYOUTS:
        ours = _mlx_side(arrays, layout, dtype, scale, repeats)
        ref = _torch_side(arrays, layout, dtype, scale, repeats, device, compiled)
        out_diff = float(np.abs(ours["values"][0] - ref["values"][0]).max())
        grad_diff = max(float(np.abs(a - b).max()) for a, b in zip(ours["values"][1:], ref["values"][1:]))
        rows[layout] = {"mlx_fwd_ms": ours["fwd_ms"], "torch_fwd_ms": ref["fwd_ms"],
                        "mlx_fwd_bwd_ms": ours["fwd_bwd_ms"], "torch_fwd_bwd_ms": ref["fwd_bwd_ms"],
                        "out_diff": out_diff, "grad_diff": grad_diff}
        r = rows[layout]
        print(f"{layout:<12} {r['mlx_fwd_ms']:>9.3f} {r['torch_fwd_ms']:>10.3f} {r['torch_fwd_ms'] / r['mlx_fwd_ms']:>5.2f}x "
              f"{r['mlx_fwd_bwd_ms']:>9.3f} {r['torch_fwd_bwd_ms']:>10.3f} {r['torch_fwd_bwd_ms'] / r['mlx_fwd_bwd_ms']:>5.2f}x "
              f"{out_diff:>15.3g} {grad_diff:>16.3g}")
        if kernels_top and device == "cuda":  # the same cuDNN kernel can take different times
            for name, side in (("mlx", ours), ("torch", ref)):
                for ms, count, kernel in _kernels(side, kernels_top):
                    print(f"    {name:<6} {ms:8.3f} ms x{count:<3} {kernel[:110]}")
    if kernels_top and device != "cuda":
        print("--kernels lists CUDA kernels: no GPU here")
    print("ratio: ours / PyTorch as speed (torch ms / mlx ms); above 1 is faster")
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="200mb")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the torch side (auto: on CUDA only)")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="key / value heads (default: the preset's; the query heads' count: no GQA)")
    p.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="on CUDA, also list each side's N longest kernels of one forward + backward")
    args = p.parse_args(argv)
    compiled = args.compile == "on" or (args.compile == "auto" and torch.cuda.is_available())
    return run(args.preset, args.batch, args.seq, args.dtype, args.repeats, compiled, args.kv_heads, args.kernels)


if __name__ == "__main__":
    main()
