"""The training step with each of mlxcore's CUDA layer paths on and off, side by side in one process.

    python bench/layer_kernels_ab.py --preset 200mb --dtype bfloat16 --batch 32 --seq 1024 --rounds 20

Builds one model and compiled step per variant (same seed, same batch, the `mlxflow speed` step
with its default `AdamWFloat32State`), each traced under its own setting: `MLXFLOW_CUDA_LAYERS`
for the RoPE, SwiGLU, residual add + RMSNorm and cross-entropy kernels (`mlxcore.kernels.cuda_rope` /
`cuda_swiglu` / `cuda_addnorm` / `cuda_xent`; `all` also has `cuda_attention`, `no-attention` not) and the projection
groups of `use_fast_kernels` (`kernels.lean_projections`) on or off. Then it times the steps in
interleaved rounds, one step of each variant a round, so that a busy or throttled machine slows
every variant alike, and prints each variant's median and fastest step, its time relative to the
first variant, its loss after the warm-up steps (the same to rounding: the paths compute the same
function) and how many layers it groups. Runs on different machines differ by more than these
paths change, so compare variants of one run only. Off CUDA the layer kernels do not apply and
the groups need `MLXFLOW_LEAN_LINEAR=on`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx

from mlxcore.kernels import patch
from mlxcore.models import adapters, remat
from mlxcore.perf.speed import SpeedConfig, _batch, _model
from mlxcore.train import optimizers
from mlxcore.train.losses import Loss
from mlxcore.train.step import make_step

# name -> (MLXFLOW_CUDA_LAYERS, projection groups on)
VARIANTS = {"none": ("off", False), "rope": ("rope", False), "swiglu": ("swiglu", False),
            "addnorm": ("addnorm", False), "cross_entropy": ("cross_entropy", False), "groups": ("off", True),
            "rope+swiglu+groups": ("rope,swiglu", True), "no-cross_entropy": ("rope,swiglu,addnorm", True),
            "all": ("auto", True), "no-attention": ("rope,swiglu,addnorm,cross_entropy", True)}


def build(cfg: SpeedConfig, layers: str, groups: bool, warmup: int) -> dict:
    """One variant's model and compiled step, traced (by its warm-up steps) under its settings."""
    saved_env, saved_groups = os.environ.get("MLXFLOW_CUDA_LAYERS"), patch.GROUPS
    os.environ["MLXFLOW_CUDA_LAYERS"] = layers
    patch.GROUPS = saved_groups if groups else ()
    try:
        tcfg = cfg.train_config()
        model, config = _model(cfg)
        adapters.prepare(model, tcfg)
        remat.checkpoint_layers(model, tcfg.grad_checkpoint)
        step, state = make_step(model, optimizers.build(tcfg), tcfg.grad_clip, tcfg.compile,
                                Loss(tcfg.loss_chunk, tcfg.sparse_loss), fused=tcfg.fused_optimizer)
        batch = _batch(cfg, config["vocab_size"])
        t0 = time.perf_counter()
        for _ in range(warmup):
            out = step([batch])
            mx.eval(state, out)
        grouped = sum(getattr(type(m), "_mlxflow_group", None) is not None for _, m in model.named_modules())
        return {"step": step, "state": state, "batch": batch, "times": [], "warmup_s": time.perf_counter() - t0,
                "loss": (out[0] / mx.maximum(out[1], 1)).item(), "grouped": grouped}
    finally:
        patch.GROUPS = saved_groups
        if saved_env is None:
            os.environ.pop("MLXFLOW_CUDA_LAYERS", None)
        else:
            os.environ["MLXFLOW_CUDA_LAYERS"] = saved_env


def run(args) -> dict[str, dict]:
    cfg = SpeedConfig(preset=args.preset, dtype=args.dtype, batch_size=args.batch, seq_len=args.seq)
    names = args.variants or list(VARIANTS)
    runs = {name: build(cfg, *VARIANTS[name], warmup=args.warmup) for name in names}
    for _ in range(args.rounds):
        for r in runs.values():
            t0 = time.perf_counter()
            mx.eval(r["state"], r["step"]([r["batch"]]))
            r["times"].append(time.perf_counter() - t0)
    print(f"mlx {mx.__version__} on {mx.default_device()}: {args.preset}, batch {args.batch} x seq {args.seq}, "
          f"{args.dtype}; {args.warmup} warm-up steps each, then {args.rounds} interleaved rounds")
    print(f"{'variant':<8} {'median ms':>10} {'min ms':>8} {'vs ' + names[0]:>8} {'loss':>10} {'grouped':>8}")
    base = statistics.median(runs[names[0]]["times"])
    rows = {}
    for name, r in runs.items():
        med = statistics.median(r["times"])
        rows[name] = {"median_ms": 1e3 * med, "min_ms": 1e3 * min(r["times"]), "relative": med / base,
                      "loss": r["loss"], "grouped": r["grouped"]}
        print(f"{name:<8} {1e3 * med:>10.2f} {1e3 * min(r['times']):>8.2f} {med / base:>8.3f} {r['loss']:>10.5f} "
              f"{r['grouped']:>8d}")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="200mb")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all, the first is the baseline")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
