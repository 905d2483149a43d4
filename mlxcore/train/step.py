"""The optimizer step (`Stepper`) and the held-out loss, shared by training, `speed` and the benchmarks."""

from __future__ import annotations

import time

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from mlxcore.kernels import cuda
from mlxcore.kernels.patch import use_fast_kernels
from mlxcore.models import moe
from mlxcore.train import fused as fused_step, multi_tensor
from mlxcore.train.losses import Loss


def mean_loss(model: nn.Module, batches, loss: Loss | None = None, group=None, on_progress=None) -> float:
    """Token-weighted mean loss over `batches` (host `(inputs, targets, mask)` tuples).

    With a data-parallel group, rank r takes batches r, r + world, ... and the sums are
    all-reduced, so the result does not depend on the number of ranks. `on_progress(done, total)`
    is called after every batch.
    """
    loss = loss or Loss()
    rank, world = (group.rank(), group.size()) if group is not None else (0, 1)
    was_training = model.training
    model.eval()  # adapters' dropout off
    total, count = mx.array(0.0), mx.array(0.0)
    mine = batches[rank::world]
    for i, batch in enumerate(mine):
        l_, n_ = loss(model, *map(mx.array, loss.prepare(batch)))[:2]
        total, count = total + l_, count + n_
        mx.eval(total, count)  # one batch's logits alive at a time
        if on_progress is not None:
            on_progress(i + 1, len(mine))
    if world > 1:
        total, count = mx.distributed.all_sum(total, group=group), mx.distributed.all_sum(count, group=group)
    model.train(was_training)
    return total.item() / max(count.item(), 1.0)


def _shell(tree, keys: list):
    """A copy of `tree`'s dicts and lists holding the same arrays. `mx.random.state`, which is not
    a list, goes to `keys` with a (lazy) copy of its arrays."""
    if isinstance(tree, dict):
        return {k: _shell(v, keys) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_shell(v, keys) for v in tree]
    if isinstance(tree, type(mx.random.state)):
        keys.append((tree, [mx.array(tree[i]) for i in range(len(tree))]))
    return tree


def _put_back(tree, saved) -> None:
    """Make `tree`'s dicts and lists, in place, hold what `_shell` saved: entries added since go,
    replaced entries come back (a compiled function keeps references to the containers)."""
    if isinstance(tree, dict):
        for k in [k for k in tree if k not in saved]:
            del tree[k]
        keys = saved.keys()
    else:
        del tree[len(saved):]
        tree.extend(saved[len(tree):])
        keys = range(len(saved))
    for k in keys:
        now, was = tree.get(k) if isinstance(tree, dict) else tree[k], saved[k]
        if isinstance(was, dict) and isinstance(now, dict) or isinstance(was, list) and isinstance(now, list):
            _put_back(now, was)
        else:
            tree[k] = was


class _RestoresOnError:
    """A function compiled with `inputs=state, outputs=state` that puts `state` back if it raises.

    While `mx.compile` traces, it puts placeholders without a value in place of the state's arrays
    (the model's parameters, the optimizer's moments, `mx.random.state`). If the traced function
    raises (a loss rejecting a batch, a shape error, Ctrl-C), MLX leaves the placeholders there,
    and every later use of the model, or of `mx.random` anywhere in the process, fails with
    "Attempting to eval an array without a primitive". Tracing happens on a call whose arguments
    have a new shape, so only those calls save the state first (its containers, and a lazy copy of
    the random key: no array is copied).
    """

    def __init__(self, fn, state):
        self.fn, self.state, self.traced = fn, state, set()

    def __call__(self, *args):
        key = tuple((a.shape, a.dtype) if isinstance(a, mx.array) else type(a) for a in args)
        if key in self.traced:
            return self.fn(*args)
        keys: list = []
        saved = _shell(self.state, keys)
        try:
            out = self.fn(*args)
        except BaseException:
            _put_back(self.state, saved)
            for random_state, values in keys:  # no item assignment: the placeholder takes the value
                for i, value in enumerate(values):
                    random_state[i][...] = value
            raise
        self.traced.add(key)
        return out


class Stepper:
    """One optimizer step over one or more micro-batches: `step(micro_batches) -> (loss_sum, n, grad_norm)`.

    Gradients of the summed masked loss are added over micro-batches (and all-reduced across
    data-parallel ranks), divided by the step's total token count, clipped to `grad_clip`
    (0: off) and applied. A mixture of experts adds `router_aux_loss_coef` x its routers'
    load-balancing loss and reports their statistics (`mlxcore.models.moe.router_loss`).
    Normally the whole step is one compiled graph. With `profile=True` the phases (forward+backward, all-reduce, clip, optimizer) are compiled and evaluated one
    by one so each can be timed (`timings`, ms); the arithmetic is the same, only slower.
    `state` is what the compiled graph reads and writes: evaluate it after each step.
    `fused` ("auto", "on", "off"): "on" runs clip + update as a few ops over concatenated buffers
    (`mlxcore.train.fused`) for elementwise optimizers (AdamW, Lion, SGD); "auto" does where
    `fused_step.default_for_device()` says so, and otherwise runs AdamW as multi-tensor kernels
    (`mlxcore.train.multi_tensor`: one CPU kernel for float32 parameters; on CUDA, the clip norm and
    the update for float32 / bfloat16 / float16 ones); "off" (and anything the others do not
    support) is MLX's per-tensor path. All give the same update.
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, grad_clip: float = 0.0, compile: bool = True,
                 loss: Loss | None = None, group=None, profile: bool = False, router_aux_loss_coef: float = 0.0,
                 fused: str = "auto"):
        self.model, self.optimizer, self.loss, self.profile = model, optimizer, loss or Loss(), profile
        if fused not in ("auto", "on", "off"):
            raise ValueError(f"fused must be auto, on or off, not {fused!r}")
        wanted = fused == "on" or (fused == "auto" and fused_step.default_for_device())
        self.fused = wanted and fused_step.supports(optimizer)
        # auto: AdamW as multi-tensor kernels (CPU: bit for bit MLX's; CUDA: MLX's rule, IEEE-rounded)
        self.one_kernel = fused == "auto" and not self.fused and multi_tensor.supports(optimizer, model)
        # on CUDA the kernels keep flat parameter / moment buffers between steps too
        self.keeps_buffers = self.fused or (self.one_kernel and cuda.available() and multi_tensor.KEEP_FLAT)
        self.group = group if group is not None and group.size() > 1 else None
        self.world = self.group.size() if self.group else 1
        # the fused path's flat parameter / state buffers, kept from step to step (fused.Resident)
        self.resident = fused_step.Resident(model, optimizer)
        self.state = [model.state, optimizer.state, mx.random.state, self.resident.buffers]
        self.timings: dict[str, float] = {}
        self.aux: dict[str, mx.array] = {}
        use_fast_kernels(model)  # fused CPU attention / SwiGLU for mlx-lm's layers (no-op elsewhere)
        if mx.default_device() == mx.cpu:
            # MLX's CPU buffer cache defaults to 32 MB: every vocab-sized array would come fresh
            # from the OS (page faults cost ~5% of a small model's step). Keep 1 GB of buffers.
            mx.set_cache_limit(max(mx.set_cache_limit(1 << 30), 1 << 30))
        # a mixture of experts: + the routers' load-balancing loss, and their statistics reported
        objective = moe.router_loss(self.loss, router_aux_loss_coef) if moe.is_moe(model) else self.loss
        loss_and_grad = nn.value_and_grad(model, objective)
        max_norm = grad_clip if grad_clip > 0 else float("inf")

        def grads_fn(*arrays):
            out, grads = loss_and_grad(model, *arrays)
            loss_sum, n, aux = (*out, {})[:3]  # a loss may add sums to report (GRPO: kl, clipped tokens)
            return loss_sum, n, aux, grads

        def reduce_fn(loss_sum, n, aux, grads):  # sum over ranks (average_gradients packs small arrays)
            if self.group is None:
                return loss_sum, n, aux, grads
            all_sum = lambda x: mx.distributed.all_sum(x, group=self.group)  # noqa: E731
            grads = nn.average_gradients(grads, group=self.group)  # mean over ranks: x world below
            return all_sum(loss_sum), all_sum(n), tree_map(all_sum, aux), grads

        def clip_fn(grads, n):
            scale = self.world / mx.maximum(n, 1)  # keep each gradient in its parameter's dtype
            if self.fused:  # (flat clipped gradients, the tree for their layout), norm
                params = dict(tree_flatten(model.parameters()))
                packed, norm = fused_step.clip(fused_step.Packed.pack(grads, params), scale, max_norm)
                return (packed.flats(), grads), norm
            if self.one_kernel:  # ((grads, scale, clip scale), norm): scaled inside the kernel
                return multi_tensor.clip(grads, scale, max_norm)
            grads = tree_map(lambda g: g * scale.astype(g.dtype), grads)
            return optim.clip_grad_norm(grads, max_norm)

        def update_fn(grads):
            if self.fused:
                flats, tree = grads
                params = dict(tree_flatten(model.parameters()))
                packed = fused_step.Packed(list(zip(fused_step.Packed.layout(tree, params), flats)))
                model.update(fused_step.apply(optimizer, packed, params, tree, resident=self.resident.buffers))
                return
            if self.one_kernel:
                kept = self.resident.buffers if self.keeps_buffers else None
                model.update(multi_tensor.apply(optimizer, grads, model.trainable_parameters(), kept))
                return
            optimizer.update(model, grads)

        def apply_fn(loss_sum, n, aux, grads):
            loss_sum, n, aux, grads = reduce_fn(loss_sum, n, aux, grads)
            grads, norm = clip_fn(grads, n)
            update_fn(grads)
            return loss_sum, n, norm, aux

        def full_step(*arrays):
            return apply_fn(*grads_fn(*arrays))

        fns = dict(grads=grads_fn, reduce=reduce_fn, clip=clip_fn, update=update_fn, apply=apply_fn, full=full_step)
        if compile:  # nn.value_and_grad writes the traced params into the model: state is an output too
            fns = {k: _RestoresOnError(mx.compile(f, inputs=self.state, outputs=self.state), self.state)
                   for k, f in fns.items()}
        self.fns = fns

    def _timed(self, phase: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        mx.eval(out, self.state)
        self.timings[phase] = self.timings.get(phase, 0.0) + 1e3 * (time.perf_counter() - t0)
        return out

    def __call__(self, micro_batches):
        """(loss sum, token count, grad norm) of one optimizer step; the loss's own sums (if any)
        are left in `self.aux` (evaluate it with `state`)."""
        arrays = [tuple(map(mx.array, self.loss.prepare(b))) for b in micro_batches]
        f = self.fns
        if self.keeps_buffers:
            self.resident.check()
        if self.profile:
            self.timings = {}
            loss_sum, n, aux, acc = self._accumulate(arrays, lambda a: self._timed("fwd_bwd", f["grads"], *a))
            if self.group is not None:
                loss_sum, n, aux, acc = self._timed("allreduce", f["reduce"], loss_sum, n, aux, acc)
            grads, norm = self._timed("clip", f["clip"], acc, n)
            self._timed("optimizer", f["update"], grads)
        elif len(arrays) == 1:
            loss_sum, n, norm, aux = f["full"](*arrays[0])
        else:
            loss_sum, n, norm, aux = f["apply"](*self._accumulate(arrays, lambda a: f["grads"](*a)))
        self.aux = aux
        if self.keeps_buffers:
            self.resident.record()
        return loss_sum, n, norm

    def update_cost(self, micro_batch, reps: int) -> dict[str, float]:
        """What the clip and the optimizer add to the compiled step, in ms: `reps` interleaved runs
        of the whole step and of forward + backward alone, each evaluated, their medians and the
        difference. `--profile-timing`'s phases each end in a synchronisation and pay the compiled
        call's own cost; this is what they cost inside the step, where their work overlaps the rest.
        The whole-step runs train (`reps` steps on `micro_batch`). After each forward + backward
        the state's containers get back the arrays the last step left (the same values), so kept
        flat buffers stay kept."""
        if not isinstance(self.fns["full"], _RestoresOnError):
            raise ValueError("update_cost measures the compiled step: build the Stepper with compile=True")
        arrays = tuple(map(mx.array, self.loss.prepare(micro_batch)))

        def timed(fn):
            t0 = time.perf_counter()
            mx.eval(fn(*arrays), self.state)
            return 1e3 * (time.perf_counter() - t0)

        whole, alone = [], []
        for _ in range(reps):
            if self.keeps_buffers:
                self.resident.check()
            whole.append(timed(self.fns["full"]))
            if self.keeps_buffers:
                self.resident.record()
            saved = _shell(self.state, [])
            alone.append(timed(self.fns["grads"]))
            _put_back(self.state, saved)
        w, a = sorted(whole)[len(whole) // 2], sorted(alone)[len(alone) // 2]
        return {"whole": w, "fwd_bwd": a, "clip_optimizer": w - a}

    @staticmethod
    def _accumulate(arrays, grads_of):
        """Sum the loss, token count, reported sums and gradients over micro-batches."""
        loss_sum, n, aux, acc = mx.array(0.0), mx.array(0.0), None, None
        for a in arrays:
            l_, n_, x_, g_ = grads_of(a)
            loss_sum, n = loss_sum + l_, n + n_
            aux = x_ if aux is None else tree_map(mx.add, aux, x_)
            acc = g_ if acc is None else tree_map(mx.add, acc, g_)
        return loss_sum, n, aux, acc


def make_step(model: nn.Module, optimizer: optim.Optimizer, grad_clip: float = 0.0, compile: bool = True,
              loss: Loss | None = None, group=None, profile: bool = False, router_aux_loss_coef: float = 0.0,
              fused: str = "auto"):
    """(step, state): a `Stepper` and the arrays to evaluate after each call."""
    stepper = Stepper(model, optimizer, grad_clip, compile, loss, group, profile, router_aux_loss_coef, fused)
    return stepper, stepper.state
