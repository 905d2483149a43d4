"""AdamW over all of a model's parameters as one kernel call (`mlxcore.kernels.adamw_step`): one
CPU kernel, or on an NVIDIA GPU a few multi-tensor CUDA kernels (`mlxcore.kernels.cuda`).

On the CPU, MLX runs the optimizer tensor by tensor: the clip's scaling and AdamW's update are
several single-threaded passes over each parameter (for `tiny`, clip 11 ms + optimizer 19 ms of
a 570 ms step). `adamw_step` reads each parameter, gradient and moment once, on all cores, and
writes the new ones. The arithmetic is MLX's, in MLX's order and rounding, so a step gives the
same bits as `optim.clip_grad_norm` + `optimizer.update` (tests/mlxcore/test_fused_optimizer.py);
the clip's norm is still computed by MLX's own ops (the same reduction, so the same bits).

On an NVIDIA GPU MLX's per-tensor clip took 4.0 ms and its AdamW 2.9 ms of the `200mb` step (137
tensors, H100). There the clip's squared norm is one multi-tensor CUDA reduction per launch
(`cuda.squared_norm`: the same scaled values, squared and summed in float32 in another order;
1.5 ms) and the update one kernel per group of up to 256 tensors with MLX's arithmetic (explicitly
rounded, no fused multiply-adds), over flat parameter / moment buffers kept between steps, each
gradient read in place (`KEEP_FLAT`). The README's "AdamW and the clip norm as CUDA kernels" has
the numbers.

`supports` says where it applies: `optim.AdamW` or `AdamWFloat32State` (exactly: a subclass may
change the rule) without bias correction, scalar hyper-parameters, and trainable parameters the
kernels take: float32 on the CPU with the kernels built; float32, bfloat16 or float16 on CUDA,
with `AdamWFloat32State`'s float32 moments or plain `AdamW`'s in the parameters' dtype (each
operation then rounded to it, as MLX's are). Anything else keeps MLX's per-tensor path.
"""

from __future__ import annotations

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from mlxcore import kernels
from mlxcore.kernels import cuda
from mlxcore.train.optimizers import AdamWFloat32State


# On CUDA, keep the parameters and moments in flat buffers between steps, one kernel a group
# reading each gradient in place (`_apply_flat`). H200, `200mb` bf16 B32xT1024, --profile-timing:
# clip + optimizer 4.8 ms, against 8.2 ms with a launch per 32 tensors (False) and 9.0 ms for MLX's
# per-tensor ops; the whole compiled step is the same for all three (69.5-71 ms). Read when a step is built.
KEEP_FLAT = True


def supports(optimizer: optim.Optimizer, model: nn.Module) -> bool:
    if type(optimizer) not in (optim.AdamW, AdamWFloat32State) or optimizer.bias_correction:
        return False
    if not all(isinstance(x, (int, float)) for x in (*optimizer.betas, optimizer.eps, optimizer.weight_decay)):
        return False
    params = tree_flatten(model.trainable_parameters())
    dtypes = {p.dtype for _, p in params}
    if dtypes != {mx.float32} and type(optimizer) is not AdamWFloat32State and not cuda.available():
        return False  # AdamW's moments in bfloat16 / float16: only the CUDA kernels round to them
    return bool(params) and kernels.fast_adamw(dtypes)


def clip(grads, scale: mx.array, max_norm: float):
    """`((grads, scale, normalizer), norm)`: what `optim.clip_grad_norm` computes for the gradients
    times `scale`, with the scaling left to `apply` (so the gradients are read once)."""
    if cuda.available():  # one multi-tensor reduction instead of one per tensor
        norm = mx.sqrt(cuda.squared_norm([g for _, g in tree_flatten(grads)], scale))
    else:
        scaled = tree_map(lambda g: g * scale.astype(g.dtype), grads)
        _, norm = optim.clip_grad_norm(scaled, max_norm)  # the clipped copies are never evaluated
    normalizer = mx.minimum(max_norm / (norm + 1e-6), 1.0)  # clip_grad_norm's own scale
    return (grads, scale, normalizer), norm


def apply(optimizer: optim.Optimizer, clipped, params, resident: dict | None = None):
    """`optimizer.apply_gradients(grads * scale * normalizer, params)`: the new parameters (a tree
    like the gradients), the state updated as `Optimizer.apply_gradients` updates it (initialised
    on first use, schedules read at the step before it is incremented).

    On CUDA, with `resident` (a dict the caller keeps between steps, `fused.Resident.buffers`):
    the parameters and moments live in flat buffers from step to step, and the model's parameters
    and `optimizer.state` are views of them; one kernel a group (`cuda.adamw_flat_step`) reads the
    flat buffers and each gradient in place, so a step makes 3 new arrays a group instead of 3 a
    tensor (see `fused.Resident` for when the buffers are dropped and rebuilt)."""
    grads, scale, normalizer = clipped
    if not optimizer._initialized:
        optimizer.init(grads)
    for name, schedule in optimizer._schedulers.items():
        optimizer.state[name] = schedule(optimizer.step)
    optimizer.state["step"] = optimizer.step + 1
    gs, ps, states = [], [], []
    tree_map(lambda g, p, s: (gs.append(g), ps.append(p), states.append(s)), grads, params, optimizer.state)
    hyper = (optimizer.learning_rate, scale, normalizer, *optimizer.betas, optimizer.eps, optimizer.weight_decay)
    if resident is not None and cuda.available():
        new_params = _apply_flat(ps, gs, states, hyper, resident)
    else:
        out = kernels.adamw_step(ps, gs, [s["m"] for s in states], [s["v"] for s in states], *hyper)
        n = len(ps)
        for s, m, v in zip(states, out[n:2 * n], out[2 * n:]):
            s["m"], s["v"] = m, v
        new_params = out[:n]
    new = iter(new_params)
    return tree_map(lambda _: next(new), grads)


def _flat(xs: list) -> mx.array:
    return mx.concatenate([x.reshape(-1) for x in xs])


def _apply_flat(ps: list, gs: list, states: list, hyper: tuple, resident: dict) -> list:
    new: list = [None] * len(ps)
    groups = cuda.flat_groups(ps, gs)
    for index in [i for i in resident if i >= len(groups)]:
        del resident[index]
    for index, ids in enumerate(groups):
        layout = ";".join(f"{ps[k].shape}{ps[k].dtype}{gs[k].dtype}" for k in ids)  # a string: compiled state holds it
        kept = resident.get(index)
        if kept is not None and kept["layout"] == layout:  # still the views the last step left
            flat = kept["p"], kept["m"], kept["v"]
        else:
            flat = _flat([ps[k] for k in ids]), _flat([states[k]["m"] for k in ids]), _flat([states[k]["v"] for k in ids])
        p, m, v = cuda.adamw_flat_step(*flat, [gs[k] for k in ids], *hyper)
        resident[index] = {"p": p, "m": m, "v": v, "layout": layout}
        start = 0
        for k in ids:
            stop = start + ps[k].size
            new[k] = p[start:stop].reshape(ps[k].shape)
            states[k]["m"], states[k]["v"] = (x[start:stop].reshape(ps[k].shape) for x in (m, v))
            start = stop
    return new
