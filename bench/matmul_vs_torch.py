"""Where MLX's backend limits the training step: its matmuls vs PyTorch's on the model's own shapes.

    python bench/matmul_vs_torch.py --preset 200mb --tokens 32768 --dtype bfloat16

For each GEMM of one decoder layer and the output head, in the forward and both backward
products (dX = dY W, dW = dY^T X), times `mx.matmul` and `torch.matmul` on the same device
and dtype (best of a few runs after warm-up, fully synchronised) and prints TFLOP/s and the
ratio. A step can only be as fast as its matmuls allow: where MLX's are slower than torch's
here, no change to mlxcore's training loop closes that part of the gap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import torch

from mlxcore.config import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
from timing import best_seconds  # noqa: E402


def shapes(cfg: ModelConfig, tokens: int, vocab: int) -> list[tuple[str, int, int, int]]:
    h, d, i = cfg.hidden_size, cfg.resolved_head_dim, cfg.intermediate_size
    qkv = d * (cfg.num_heads + 2 * cfg.num_kv_heads)
    out = []
    for name, k, n in (("qkv", h, qkv), ("o_proj", cfg.num_heads * d, h), ("gate+up", h, 2 * i), ("down", i, h),
                       ("lm_head", h, vocab)):
        out += [(f"{name} fwd", tokens, n, k), (f"{name} dX", tokens, k, n), (f"{name} dW", k, n, tokens)]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="200mb")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--vocab", type=int, default=6400)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    cfg = ModelConfig(preset=args.preset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdt, mdt = getattr(torch, args.dtype), getattr(mx, args.dtype)
    tsync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(f"mlx {mx.__version__} on {mx.default_device()} vs torch {torch.__version__} on {device}, {args.dtype}")
    unit, scale = ("TFLOP/s", 1e12) if device == "cuda" else ("GFLOP/s", 1e9)
    print(f"{'gemm':<14} {'M x N x K':>22} {'mlx ' + unit:>12} {'torch ' + unit:>14} {'ratio':>6}")
    total_m = total_t = 0.0
    for name, m, n, k in shapes(cfg, args.tokens, args.vocab):
        a, b = mx.random.normal((m, k)).astype(mdt), mx.random.normal((k, n)).astype(mdt)
        ta, tb = torch.randn(m, k, device=device, dtype=tdt), torch.randn(k, n, device=device, dtype=tdt)
        mx.eval(a, b)
        tm = best_seconds(lambda: mx.eval(a @ b))
        tt = best_seconds(lambda: ta @ tb, tsync)
        flops = 2 * m * n * k
        total_m, total_t = total_m + tm, total_t + tt
        print(f"{name:<14} {f'{m}x{n}x{k}':>22} {flops / tm / scale:>12.1f} {flops / tt / scale:>14.1f} {tt / tm:>6.2f}")
    print(f"all GEMMs of a layer + head: mlx {total_m * 1e3:.2f} ms, torch {total_t * 1e3:.2f} ms, ratio {total_t / total_m:.2f}x")


if __name__ == "__main__":
    main()
