"""Clip + AdamW alone, per tensor vs fused (`mlxcore.train.fused`), on a preset's parameters.

    python bench/fused_optimizer.py --preset 200mb --dtype bfloat16 --reps 30

Builds the model, draws one random gradient tree, compiles two functions, each taking
(gradients) -> new parameters and optimizer state with global-norm clipping to 1.0 and
AdamW(state float32, as `optimizer_state_dtype: float32`): `optim.clip_grad_norm` +
`optimizer.apply_gradients` per tensor, `fused.clip` + `fused.apply` concatenating the parameters
and moments at every call, and the same keeping the flat buffers between calls (`resident`, as
the training step does; only the gradients are concatenated), and `kernels.adamw_step`
(`mlxcore.train.multi_tensor`: one kernel over every tensor on the CPU, multi-tensor CUDA kernels on
an NVIDIA GPU) where it runs. They alternate,
`--reps` evaluated calls each after a warmup; prints median and min ms and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from mlxcore.config import ModelConfig
from mlxcore.models.model import from_config, hf_config
from mlxcore import kernels
from mlxcore.train import fused, multi_tensor, optimizers


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=["tiny", "200mb"], default="tiny")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)

    model = from_config(hf_config(ModelConfig(preset=args.preset, dtype=args.dtype), 6400), seed=0)
    params = model.trainable_parameters()
    grads = tree_map(lambda w: mx.random.normal(w.shape).astype(w.dtype) * 1e-2, params)
    flat_params = dict(tree_flatten(params))
    mx.eval(grads)
    runs = {}
    names = ["per-tensor", "fused", "fused, kept buffers"]
    if kernels.fast_adamw(w.dtype for w in flat_params.values()):
        names.append("one kernel")
    for name in names:
        opt = optimizers.AdamWFloat32State(1e-3, betas=[0.9, 0.95], weight_decay=0.01)
        opt.init(params)
        # the parameters are carried from call to call, as a model's are; "kept buffers" also keeps
        # the flat parameter and moment buffers between calls (what the fused training step does)
        held, resident = {"params": tree_map(lambda w: w, params)}, {}  # a tree of its own: compile writes into it

        def step(grads, opt=opt, name=name, held=held, resident=resident):
            if name == "per-tensor":
                clipped, norm = optim.clip_grad_norm(grads, 1.0)
                held["params"] = opt.apply_gradients(clipped, held["params"])
                return norm
            if name == "one kernel":
                clipped, norm = multi_tensor.clip(grads, mx.array(1.0), 1.0)
                held["params"] = multi_tensor.apply(opt, clipped, held["params"])
                return norm
            current = dict(tree_flatten(held["params"]))
            packed, norm = fused.clip(fused.Packed.pack(grads, current), mx.array(1.0), 1.0)
            held["params"] = fused.apply(opt, packed, current, grads, resident=resident if "kept" in name else None)
            return norm

        state = [held, opt.state, resident]
        fn = mx.compile(step, inputs=state, outputs=state)
        runs[name] = (fn, state, [])
    for _ in range(3):
        for fn, state, _ in runs.values():
            mx.eval(fn(grads), state)
    for _ in range(args.reps):
        for fn, state, times in runs.values():
            t0 = time.perf_counter()
            mx.eval(fn(grads), state)
            times.append(1e3 * (time.perf_counter() - t0))
    n = sum(v.size for _, v in tree_flatten(params))
    print(f"mlx {mx.__version__} on {mx.default_device()}; {args.preset} {args.dtype}: "
          f"{len(flat_params)} tensors, {n / 1e6:.1f}M parameters; {args.reps} alternating reps")
    out = {}
    for name, (_, _, times) in runs.items():
        out[name] = {"median_ms": statistics.median(times), "min_ms": min(times)}
        print(f"{name:<20} median {out[name]['median_ms']:8.2f} ms  min {out[name]['min_ms']:8.2f} ms")
    # every path took the same updates from the same gradients: how far its parameters are from
    # the per-tensor path's (0 for the CPU kernel: bit for bit; a float rounding elsewhere)
    reference = dict(tree_flatten(runs["per-tensor"][1][0]["params"]))
    for name in names[1:]:
        mine = dict(tree_flatten(runs[name][1][0]["params"]))
        out[name]["max_abs_diff"] = max(mx.abs(mine[k].astype(mx.float32) - reference[k].astype(mx.float32)).max().item()
                                        for k in reference)
        print(f"{name} / per-tensor: median {out[name]['median_ms'] / out['per-tensor']['median_ms']:.2f}x, "
              f"min {out[name]['min_ms'] / out['per-tensor']['min_ms']:.2f}x; "
              f"parameters differ by at most {out[name]['max_abs_diff']:.3g}")
    return out


if __name__ == "__main__":
    main()
