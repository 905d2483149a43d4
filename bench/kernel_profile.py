"""Where each framework's training step spends GPU time, kernel by kernel (CUDA only).

    python bench/kernel_profile.py --preset 200mb --dtype bfloat16 --batch 32 --seq 1024

Builds the same two steps as `bench/train_vs_torch.py` (mlxcore's compiled step on mlx-lm's
llama, and the equivalent PyTorch model under `torch.compile`, same weights, batch, AdamW and
clipping), warms each up, then records a few steps of each with `torch.profiler`. CUPTI, which
the profiler uses, sees every kernel of the process, so MLX's kernels are recorded as well as
torch's. Prints, per step, the kernel time by category (GEMMs, attention, RMSNorm, RoPE, SwiGLU,
clip + AdamW, loss, the rest) and the top kernels of each framework.

Kernel time is not wall time: MLX-CUDA runs independent kernels of its graph concurrently, so
its kernel sum can exceed its step time. Use the categories to see where the extra work is, and
`bench/train_vs_torch.py` for the step times.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
import torch_llama  # noqa: E402
import train_vs_torch  # noqa: E402

# (category, substrings of a lower-cased kernel name), first match wins. cuDNN's attention kernels
# contain "wgmma" and "sm90" as GEMMs do, so attention is matched first.
CATEGORIES = (
    ("attention", ("sdpa", "fmha", "flash", "cudnn")),
    ("GEMM", ("nvjet", "splitkreduce", "gemm", "cutlass", "xmma")),
    ("RoPE", ("rope",)),
    ("RMSNorm", ("rms_norm", "col_reduce", "addnorm")),  # torch's and ours fuse the residual add in
    ("SwiGLU", ("swiglu", "sigmoid", "silu", "tanh")),
    ("clip + optimizer", ("multi_tensor_apply", "lpnorm", "square", "all_reduce", "adamw", "sumsq")),
    ("loss", ("softmax", "logsumexp", "nll_loss", "xent")),
)
OTHER = "other elementwise / copies"


def category(kernel: str) -> str:
    name = kernel.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in name for k in keys)), OTHER)


def per_step(events, steps: int) -> list[tuple[float, int, str]]:
    """(ms, launches) per step of each kernel name, most time first."""
    rows = []
    for e in events:
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append((t / steps / 1e3, e.count // steps, e.key))
    return sorted(rows, reverse=True)


def by_category(rows) -> dict[str, tuple[float, int]]:
    out: dict[str, list] = {}
    for ms, count, name in rows:
        acc = out.setdefault(category(name), [0.0, 0])
        acc[0] += ms
        acc[1] += count
    return {k: (v[0], v[1]) for k, v in sorted(out.items(), key=lambda kv: -kv[1][0])}


def profile_step(once, warmup: int, steps: int):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        once()
    torch.cuda.synchronize()
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            once()
        torch.cuda.synchronize()
        mx.synchronize()
    return per_step(prof.key_averages(), steps)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=["tiny", "200mb"], default="200mb")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25, help="kernels listed per framework")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or mx.default_device() != mx.gpu:
        raise SystemExit("kernel_profile: needs an NVIDIA GPU for both MLX (mlx-cuda) and PyTorch")
    targs = train_vs_torch.parse_args(["--preset", args.preset, "--dtype", args.dtype,
                                       "--batch", str(args.batch), "--seq", str(args.seq)])
    config = train_vs_torch.hf_config(train_vs_torch.model_config(targs), targs.vocab)
    mlx_model = train_vs_torch.from_config(config, seed=0)
    device = torch.device("cuda")
    torch_model = torch_llama.Llama(config, device)
    torch_llama.load_from_mlx(torch_model, mlx_model)
    init = {k: v.detach().cpu().clone() for k, v in torch_model.state_dict().items()}
    del torch_model
    rng = np.random.default_rng(0)
    B, T, V = args.batch, args.seq, targs.vocab
    batch = (rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T)), np.ones((B, T), np.float32))
    runners = [train_vs_torch.mlx_runner(mlx_model, batch),
               train_vs_torch.torch_runner(config, init, tuple(torch.from_numpy(a).to(device) for a in batch),
                                           device, compiled=True)]
    result = {}
    for r in runners:
        rows = profile_step(r["once"], args.warmup, args.steps)
        cats = by_category(rows)
        total = sum(ms for ms, _, _ in rows)
        result[r["framework"]] = {"total_ms": total, "categories": cats, "kernels": rows}
        print(f"\n=== {r['framework']}: kernel time {total:.2f} ms per step ===")
        for cat, (ms, count) in cats.items():
            print(f"  {cat:<28} {ms:8.2f} ms  {count:5d} launches")
        for ms, count, name in rows[:args.top]:
            print(f"  {ms:7.3f} ms {count:4d}x  [{category(name)}] {name[:140]}")
    return result


if __name__ == "__main__":
    main()
