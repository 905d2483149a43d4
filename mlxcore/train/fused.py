"""One fused optimizer step: global-norm clipping and an elementwise optimizer (AdamW, Adam, Lion,
SGD) over all parameters as a few large ops instead of a few ops per tensor.

The gradients, parameters and per-parameter optimizer state (AdamW's `m`, `v`) are flattened and
concatenated per group of tensors with the same (gradient dtype, parameter dtype); the clip's
squared norm is one reduction per group, and the update is the optimizer's own `apply_single`
run once on each group's flat buffers, so the update rule is the optimizer's, element for
element. The results are split back into views of the flat buffers: the model's parameters and
`optimizer.state` keep their per-tensor layout, so `optimizer.safetensors` is unchanged and
checkpoints move freely between the fused and the per-tensor path.

What differs from the per-tensor path (`optim.clip_grad_norm` + `optimizer.update`): only the
summation order of the clip's squared norm (rows of 4096 elements per group instead of one sum
per tensor, added up in tree order). In float32 the norms agree to ~1e-7 relative; in bfloat16 both are rounded to
bfloat16 (the fused one once, the per-tensor one once per tensor), so they can differ by a
bfloat16 ulp or so, and with it the clip scale. Given the same scale the update is bit-identical
(tests/mlxcore/test_fused_optimizer.py).

`supports(optimizer)` says whether the fused path applies: the optimizer's class must be one of
`ELEMENTWISE` (exactly; a subclass may change `apply_single`) or `AdamWFloat32State`; Adafactor,
Muon and MultiOptimizer need per-tensor shapes and stay on the per-tensor path.
"""

from __future__ import annotations

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from mlxcore.train.optimizers import AdamWFloat32State

ELEMENTWISE = (optim.AdamW, optim.Adam, optim.Lion, optim.SGD, AdamWFloat32State)


def supports(optimizer: optim.Optimizer) -> bool:
    """True where `optimizer.apply_single` is elementwise, so running it on concatenated tensors is exact."""
    return type(optimizer) in ELEMENTWISE and not getattr(optimizer, "bias_correction", False)


class Packed:
    """Gradients flattened into one buffer per (gradient dtype, parameter dtype) group.

    `groups[i]` is `(entries, flat)`; each entry is `(path, shape, start, stop)` into `flat`.
    """

    def __init__(self, groups):
        self.groups = groups

    @staticmethod
    def layout(grads, params: dict) -> list:
        """The groups' entries for a gradient tree (`params`: path -> parameter), in tree order."""
        by_key: dict = {}
        tree_map_with_path(lambda path, g: by_key.setdefault((str(g.dtype), str(params[path].dtype)), [])
                           .append((path, g.shape, g.size)), grads)
        layout = []
        for items in by_key.values():
            entries, start = [], 0
            for path, shape, size in items:
                entries.append((path, shape, start, start + size))
                start += size
            layout.append(entries)
        return layout

    @classmethod
    def pack(cls, grads, params: dict) -> "Packed":
        flat = {}
        tree_map_with_path(lambda path, g: flat.__setitem__(path, g), grads)
        return cls([(entries, _cat([flat[path] for path, *_ in entries])) for entries in cls.layout(grads, params)])

    def flats(self) -> list:
        return [flat for _, flat in self.groups]

    def map(self, fn) -> "Packed":
        return Packed([(entries, fn(flat)) for entries, flat in self.groups])


def _cat(xs):
    return mx.concatenate([x.reshape(-1) for x in xs]) if len(xs) > 1 else xs[0].reshape(-1)


def clip(packed: Packed, scale: mx.array, max_norm: float) -> tuple[Packed, mx.array]:
    """Scale every gradient by `scale` (in its own dtype), then clip the global norm to `max_norm`:
    `optim.clip_grad_norm`'s arithmetic (float16 squares summed in float32, the normalizer
    min(max_norm / (norm + 1e-6), 1) applied before casting back) on the flat buffers."""
    packed = packed.map(lambda g: g * scale.astype(g.dtype))
    norm_squared = 0.0
    for _, g in packed.groups:
        norm_squared = norm_squared + _sum_squares(g.astype(mx.float32) if g.dtype == mx.float16 else g)
    total_norm = mx.sqrt(norm_squared)
    normalizer = mx.minimum(max_norm / (total_norm + 1e-6), 1.0)
    return packed.map(lambda g: (g * normalizer).astype(g.dtype)), total_norm


ROW = 4096


def _sum_squares(g: mx.array) -> mx.array:
    """Sum of squares of a flat buffer in two levels (rows of ROW, then the row sums): MLX's CPU
    sum of one long vector accumulates sequentially (1e-3 relative error at 3M float32 elements);
    two levels keep it near 1e-7, like the per-tensor sums."""
    whole = g.size // ROW * ROW
    parts = [g[:whole].reshape(-1, ROW).square().sum(axis=1).sum()] if whole else []
    if whole < g.size:
        parts.append(g[whole:].square().sum())
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _split(flat: mx.array, entries):
    return [flat[a:b].reshape(shape) for _, shape, a, b in entries]


def apply(optimizer: optim.Optimizer, packed: Packed, params: dict, grads_tree, resident: dict | None = None) -> dict:
    """`optimizer.apply_gradients` on packed gradients: the same lazy init, schedule and step
    count, then `apply_single` once per group. Returns the new parameters in `grads_tree`'s shape.

    `resident` (a dict the caller keeps between steps, empty at first): each group's flat parameter
    and state buffers are kept there, and the parameters and state this returns are views (slices)
    of them. A later step whose parameters and state are still those views (the caller checks,
    `Resident.check`) reads the flat buffers instead of concatenating the tensors again: the
    update then moves each parameter's bytes once, as a per-tensor update does, in a few large ops.
    """
    if not optimizer._initialized:
        optimizer.init(grads_tree)
    for name, scheduler in optimizer._schedulers.items():
        optimizer.state[name] = scheduler(optimizer.step)
    optimizer.state["step"] = optimizer.step + 1

    states: dict = {}
    tree_map_with_path(lambda path, g, s: states.__setitem__(path, s), grads_tree, optimizer.state)
    new: dict = {}
    for index, (entries, g) in enumerate(packed.groups):
        sts = [states[path] for path, *_ in entries]
        keys = sorted(sts[0])
        uniform = all(sorted(s) == keys and all(s[k].shape == shape and s[k].dtype == sts[0][k].dtype for k in keys)
                      for s, (_, shape, _, _) in zip(sts, entries))
        if not uniform:  # state that is not one array per parameter element: per tensor
            for (path, *_), g_i, s in zip(entries, _split(g, entries), sts):
                new[path] = optimizer.apply_single(g_i, params[path], s)
            continue
        paths = [path for path, *_ in entries]
        kept = (resident or {}).get(index)
        if kept is not None and kept["paths"] == paths and sorted(kept["state"]) == keys:
            flat_param, flat_state = kept["param"], dict(kept["state"])
        else:
            flat_param = _cat([params[path] for path, *_ in entries])
            flat_state = {k: _cat([s[k] for s in sts]) for k in keys}
        p = optimizer.apply_single(g, flat_param, flat_state)
        if resident is not None:
            resident[index] = {"param": p, "state": dict(flat_state), "paths": paths}
        for k in keys:
            for s, piece in zip(sts, _split(flat_state[k], entries)):
                s[k] = piece
        for (path, *_), piece in zip(entries, _split(p, entries)):
            new[path] = piece
    return tree_map_with_path(lambda path, _: new[path], grads_tree)


class Resident:
    """The flat buffers `apply` keeps between steps (`buffers`, part of the step's compiled state),
    and whether the model's parameters and the optimizer's state are still the views of them that
    the last step left (`check`). Anything else (weights loaded from a checkpoint, a state
    restored, a parameter set by hand) drops them, and the next step concatenates afresh."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer, self.buffers, self.views = model, optimizer, {}, None

    def _leaves(self) -> list:
        return [v for _, v in tree_flatten(self.model.parameters())] + [v for _, v in tree_flatten(self.optimizer.state)]

    def check(self) -> None:
        """Before a step: drop the buffers unless every parameter and state array is the one the
        last step left."""
        leaves = self._leaves()
        if self.views is None or len(leaves) != len(self.views) or any(a is not b for a, b in zip(leaves, self.views)):
            self.buffers.clear()
        self.views = None

    def record(self) -> None:
        """After a step (its outputs written into the model and optimizer)."""
        self.views = self._leaves()


def default_for_device() -> bool:
    """Whether `fused="auto"` takes the fused path on the current default device: nowhere yet.

    Measured on an H200 (mlx-cuda-13 0.32.4, `200mb` bf16, B32 x T1024): the compiled step took
    75.2 ms fused vs 74.5 ms per tensor, and in `--profile-timing` clip + optimizer 8.6 vs 8.1 ms
    (clip 4.9 -> 3.4 ms, but the optimizer 3.3 -> 5.2 ms: concatenating parameters and moments
    and splitting them back costs more memory traffic than the per-tensor launches it saves).
    With the flat buffers kept between steps (`Resident`; H100, 2026-12-06), clip + AdamW alone
    took 3.4 ms against 4.9 per tensor, but the whole compiled step 83.6 ms against 81.8.
    """
    return False
