"""Fast BLAS vs MLX's bundled reference BLAS on this machine, measured in one run.

    python bench/blas.py [--steps 3]

Each setting runs in its own process (the BLAS must be chosen before mlx.core loads):
MLXFLOW_BLAS=auto (what mlxcore does by default: MKL, else OpenBLAS) and MLXFLOW_BLAS=reference.
It reports sgemm GFLOP/s (1024^3) and the training throughput of the `tiny` preset with a 6400
vocab (the MiniMind tokenizer's size) at batch 8 x 256 tokens: AdamW, compiled step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(steps: int) -> dict:
    import mlxcore
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    from mlxcore.config import ModelConfig
    from mlxcore.perf.doctor import sgemm_gflops
    from mlxcore.models.model import from_config, hf_config
    from mlxcore.train.step import make_step

    B, T, V = 8, 256, 6400
    model = from_config(hf_config(ModelConfig(preset="tiny"), V))
    optimizer = optim.AdamW(1e-3)
    step, state = make_step(model, optimizer, grad_clip=1.0)
    rng = np.random.default_rng(0)
    batch = [(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T)), np.ones((B, T), np.float32))]
    mx.eval(state, step(batch))  # compile + warm up
    start = time.perf_counter()
    for _ in range(steps):
        mx.eval(state, step(batch))
    seconds = (time.perf_counter() - start) / steps
    return {"blas": mlxcore.BLAS.name, "sgemm_gflops": sgemm_gflops(), "step_s": seconds, "tok_per_s": B * T / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.steps)))
        return
    rows = {}
    for choice in ("auto", "reference"):
        out = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(args.steps)], capture_output=True,
                             text=True, env={**os.environ, "MLXFLOW_BLAS": choice}, check=True)
        rows[choice] = json.loads(out.stdout.strip().splitlines()[-1])
    fast, ref = rows["auto"], rows["reference"]
    print(f"{'MLXFLOW_BLAS':<13} {'blas':<10} {'sgemm GFLOP/s':>14} {'train step s':>13} {'train tok/s':>12}")
    for choice, r in rows.items():
        print(f"{choice:<13} {r['blas']:<10} {r['sgemm_gflops']:>14.1f} {r['step_s']:>13.3f} {r['tok_per_s']:>12.0f}")
    print(f"ratio fast/reference: sgemm {fast['sgemm_gflops'] / ref['sgemm_gflops']:.1f}x, "
          f"training tok/s {fast['tok_per_s'] / ref['tok_per_s']:.1f}x")


if __name__ == "__main__":
    main()
