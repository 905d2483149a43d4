"""The fused optimizer step (mlxcore.train.fused) against the per-tensor path, and resume across both."""

import shutil

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlxcore import kernels
from mlxcore.kernels import cuda
from mlxcore.models.model import from_config, hf_config
from mlxcore.train import fused, loop as train, multi_tensor, optimizers
from mlxcore.train.loop import TrainJob
from mlxcore.train.losses import Loss
from mlxcore.train.step import Stepper

from tests.conftest import micro_model, quick_train

# CPU kernels are deterministic, so the two paths are compared bit for bit there; MLX's CUDA
# kernels are not bitwise reproducible even run to run (see test_train.py), hence a tolerance.
ON_CPU = mx.default_device() == mx.cpu
VOCAB = 96


def _bits(a: mx.array) -> np.ndarray:
    a = a.astype(mx.float32) if a.dtype == mx.bfloat16 else a  # bf16 -> f32 is exact
    return np.array(a)


def _assert_same(xs: dict, ys: dict, exact: bool, rtol: float = 0.0):
    assert xs.keys() == ys.keys()
    for k in xs:
        assert xs[k].dtype == ys[k].dtype and xs[k].shape == ys[k].shape, k
        if exact:
            assert np.array_equal(_bits(xs[k]), _bits(ys[k])), k
        else:
            np.testing.assert_allclose(_bits(xs[k]), _bits(ys[k]), rtol=rtol, atol=rtol, err_msg=k)


def _model(dtype: str):
    cfg = micro_model().model_copy(update={"dtype": dtype})
    return from_config(hf_config(cfg, VOCAB), seed=0)


def _batches(n: int):
    rng = np.random.default_rng(1)
    return [(rng.integers(0, VOCAB, (4, 16)), rng.integers(0, VOCAB, (4, 16)), np.ones((4, 16), np.float32))
            for _ in range(n)]


def _train(fused_mode: str, dtype: str, make_opt, grad_clip: float, steps: int = 4, profile: bool = False):
    model, opt = _model(dtype), make_opt()
    stepper = Stepper(model, opt, grad_clip=grad_clip, compile=True, fused=fused_mode, profile=profile)
    norms = []
    for b in _batches(steps):
        _, _, norm = stepper([b])
        mx.eval(stepper.state, norm)
        norms.append(norm.item())
    return stepper, dict(tree_flatten(model.parameters())), dict(tree_flatten(opt.state)), norms


OPTIMIZERS = {
    "adamw_f32_state": lambda: optimizers.AdamWFloat32State(optimizers.optim.cosine_decay(3e-2, 10),
                                                            betas=[0.9, 0.95], weight_decay=0.1),
    "adamw": lambda: optim.AdamW(3e-2, betas=[0.9, 0.95], weight_decay=0.1),
    "lion": lambda: optim.Lion(1e-3, weight_decay=0.1),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_update_rule_equals_the_per_tensor_rule_given_the_same_gradients(dtype, name):
    """The update rule alone, on every device: the same parameters and the same gradients (three
    steps of fixed random ones) through `fused.apply` and `optimizer.apply_gradients`. Bit for bit
    on the CPU; within a rounding of the parameter dtype on a GPU (its elementwise kernels may
    contract multiply-adds differently for a flat buffer than for each tensor)."""
    rng = np.random.default_rng(2)
    params = dict(tree_flatten(_model(dtype).parameters()))
    opt_f, opt_p = OPTIMIZERS[name](), OPTIMIZERS[name]()
    p_f, p_p = dict(params), dict(params)
    for _ in range(3):
        grads = tree_unflatten([(k, mx.array(rng.standard_normal(v.shape).astype(np.float32)).astype(v.dtype))
                                for k, v in params.items()])
        p_f = dict(tree_flatten(fused.apply(opt_f, fused.Packed.pack(grads, p_f), p_f, grads)))
        p_p = dict(tree_flatten(opt_p.apply_gradients(grads, tree_unflatten(list(p_p.items())))))
        mx.eval(p_f, p_p, opt_f.state, opt_p.state)
    tol = 0.0 if ON_CPU else (1e-6 if dtype == "float32" else 2.0**-7)
    _assert_same(p_f, p_p, exact=ON_CPU, rtol=tol)
    _assert_same(dict(tree_flatten(opt_f.state)), dict(tree_flatten(opt_p.state)), exact=ON_CPU, rtol=tol)


@pytest.mark.parametrize("dtype", [pytest.param("float32", marks=pytest.mark.gpu), "bfloat16"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_update_equals_the_per_tensor_update(dtype, name):
    """Four trained steps, clipping off (its scale is exactly 1): parameters, moments and the step
    are the same bits. Not in the GPU subset for bfloat16: MLX's CUDA forward and backward are not
    bitwise reproducible run to run, and four Adam steps at lr 3e-2 turn a gradient that is ~0 in
    one run and -0 in the other into a whole learning-rate step (seen on an H100: 1 of 2,048)."""
    s_fused, p_fused, st_fused, n_fused = _train("on", dtype, OPTIMIZERS[name], grad_clip=0.0)
    s_plain, p_plain, st_plain, n_plain = _train("off", dtype, OPTIMIZERS[name], grad_clip=0.0)
    assert s_fused.fused and not s_plain.fused
    tol = 0.0 if ON_CPU else (1e-5 if dtype == "float32" else 2e-2)
    _assert_same(p_fused, p_plain, exact=ON_CPU, rtol=tol)
    _assert_same(st_fused, st_plain, exact=ON_CPU, rtol=tol)
    assert st_fused["step"].item() == 4
    # the reported norm sums in another order: float32 agrees to 1e-6, bfloat16 to its rounding
    np.testing.assert_allclose(n_fused, n_plain, rtol=1e-6 if dtype == "float32" else 2e-2)


@pytest.mark.gpu
def test_fused_clip_matches_clip_grad_norm_and_then_the_update_is_identical():
    model = _model("float32")
    rng = np.random.default_rng(0)
    grads = {k: mx.array(rng.standard_normal(v.shape).astype(np.float32)) for k, v in tree_flatten(model.parameters())}
    grads = tree_unflatten(list(grads.items()))
    params = dict(tree_flatten(model.parameters()))
    scale = mx.array(0.5)
    plain, norm = optim.clip_grad_norm(tree_map_scale(grads, scale), 1.0)
    packed, fnorm = fused.clip(fused.Packed.pack(grads, params), scale, 1.0)
    mx.eval(plain, norm, packed.flats(), fnorm)
    assert norm.item() > 1.0  # clipping is active
    assert abs(fnorm.item() - norm.item()) <= 1e-6 * norm.item()
    # the normalizers may differ in the last bits (they divide by the norm); given the same scale
    # (recompute the plain path's with the fused norm) the clipped gradients are identical
    normalizer = mx.minimum(1.0 / (fnorm + 1e-6), 1.0)
    same_scale = dict(tree_flatten(tree_map_scale(tree_map_scale(grads, scale), normalizer)))
    flat = fused.Packed.pack(tree_unflatten(list(same_scale.items())), params)
    _assert_same({"g": flat.flats()[0]}, {"g": packed.flats()[0]}, exact=ON_CPU, rtol=1e-6)

    # and the update of those gradients equals AdamW's per tensor
    a, b = optimizers.AdamWFloat32State(1e-2, weight_decay=0.1), optimizers.AdamWFloat32State(1e-2, weight_decay=0.1)
    new_plain = dict(tree_flatten(a.apply_gradients(tree_unflatten(list(same_scale.items())), model.parameters())))
    new_fused = dict(tree_flatten(fused.apply(b, packed, params, grads)))
    mx.eval(new_plain, new_fused, a.state, b.state)
    _assert_same(new_fused, new_plain, exact=ON_CPU, rtol=1e-6)
    _assert_same(dict(tree_flatten(b.state)), dict(tree_flatten(a.state)), exact=ON_CPU, rtol=1e-6)


def tree_map_scale(tree, s):
    return tree_map(lambda g: g * s.astype(g.dtype), tree)


@pytest.mark.gpu
def test_profiled_fused_step_equals_the_compiled_one_and_reports_phases():
    s_prof, p_prof, st_prof, n_prof = _train("on", "float32", OPTIMIZERS["adamw_f32_state"], 0.5, steps=3, profile=True)
    _, p_full, st_full, n_full = _train("on", "float32", OPTIMIZERS["adamw_f32_state"], 0.5, steps=3)
    assert set(s_prof.timings) == {"fwd_bwd", "clip", "optimizer"}
    assert n_prof[0] > 0.5  # clipping is active
    tol = 1e-6 if ON_CPU else 1e-4
    _assert_same(p_prof, p_full, exact=False, rtol=tol)
    _assert_same(st_prof, st_full, exact=False, rtol=tol)
    np.testing.assert_allclose(n_prof, n_full, rtol=tol)


def test_optimizers_without_elementwise_updates_stay_per_tensor():
    assert fused.supports(optim.AdamW(1e-3)) and fused.supports(optimizers.AdamWFloat32State(1e-3))
    for opt in (optim.Adafactor(1e-3), optim.Muon(1e-3), optim.Adam(1e-3, bias_correction=True),
                optim.MultiOptimizer([optim.Muon(1e-3), optim.AdamW(1e-3)], [lambda p, w: w.ndim == 2])):
        assert not fused.supports(opt)
        assert not Stepper(_model("float32"), opt, fused="on", compile=False).fused
    with pytest.raises(ValueError, match="fused must be"):
        Stepper(_model("float32"), optim.AdamW(1e-3), fused="yes")


def _job(small_data, out, **overrides):
    return TrainJob(data_dir=str(small_data["pretrain"]), tokenizer_dir=str(small_data["tok"]), out_dir=str(out),
                    model=micro_model(), train=quick_train(**{"steps": 10, "save_every": 5, "eval_every": 10, **overrides}))


@pytest.mark.gpu
@pytest.mark.parametrize("first, then", [("on", "on"), ("off", "on"), ("on", "off"), ("auto", "off")])
def test_resume_is_exact_within_and_across_the_fused_and_per_tensor_paths(small_data, tmp_path, first, then):
    """Train 10 steps straight; copy its step-5 checkpoint into a fresh run dir and resume there
    (with the other path for the cross cases): the same weights and optimizer.safetensors.
    Clipping is off across paths (its norm's summation order differs), on within one."""
    clip = dict(grad_clip=1.0 if first == then else 0.0)
    straight = train.run(_job(small_data, tmp_path / "a", fused_optimizer=first, **clip))
    resumed_dir = tmp_path / "b"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a/checkpoints/step-00000005", resumed_dir / "checkpoints/step-00000005")
    resumed = train.run(_job(small_data, resumed_dir, fused_optimizer=then, **clip))
    assert resumed["resumed_from"]
    a, b = tmp_path / "a/model", resumed_dir / "model"
    sa, sb = mx.load(str(a / "optimizer.safetensors")), mx.load(str(b / "optimizer.safetensors"))
    assert sa.keys() == sb.keys() and any(k.endswith(".m") for k in sa)  # the per-tensor layout either way
    if ON_CPU:
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
        assert (a / "optimizer.safetensors").read_bytes() == (b / "optimizer.safetensors").read_bytes()
        assert resumed["val_loss"] == straight["val_loss"]
    else:
        _assert_same(mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors")), exact=False, rtol=1e-3)


@pytest.mark.gpu
def test_the_flat_buffers_persist_between_steps_and_weights_set_from_outside_are_used(monkeypatch):
    """The fused path keeps its flat parameter and moment buffers from step to step (only the
    gradients are concatenated after the first steps' traces), and weights set from outside (a
    checkpoint loaded mid-run) drop them: the next step updates those weights. Each step equals the
    per-tensor path's, bit for bit on the CPU, with the same replacement at the same step."""
    concatenated = []
    cat = fused._cat
    monkeypatch.setattr(fused, "_cat", lambda xs: concatenated.append(len(xs)) or cat(xs))
    replacement = {k: v * 0.5 for k, v in tree_flatten(_model("float32").parameters())}

    def run(mode):
        model, opt = _model("float32"), OPTIMIZERS["adamw_f32_state"]()
        stepper = Stepper(model, opt, grad_clip=0.0, compile=True, fused=mode)  # clip off: its sum's order differs
        traced = []
        for i, b in enumerate(_batches(6)):
            if i == 3:
                model.update(tree_unflatten(list(replacement.items())))
            mx.eval(stepper([b]), stepper.state)
            traced.append(len(concatenated))
        return dict(tree_flatten(model.parameters())), dict(tree_flatten(opt.state)), traced, stepper

    p_fused, st_fused, traced, stepper = run("on")
    # step 1 traces with the parameters and moments concatenated (4 buffers: gradients, parameters,
    # m, v), step 2 with the kept buffers (gradients only); then the trace is reused until step 4
    # drops the buffers and traces again
    assert traced[0] == 4 and traced[1] == 5 and traced[2] == 5 and traced[3] > 5
    assert stepper.resident.buffers  # kept for the next step
    concatenated.clear()
    p_plain, st_plain, _, _ = run("off")
    _assert_same(p_fused, p_plain, exact=ON_CPU, rtol=1e-5)
    _assert_same(st_fused, st_plain, exact=ON_CPU, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda.available(), reason="CUDA only: the CPU kernel updates the tensors themselves")
def test_the_cuda_kernels_keep_flat_buffers_and_weights_set_from_outside_are_used(monkeypatch):
    """On CUDA, `auto` keeps the parameters and moments in flat buffers between compiled steps
    (one kernel a group reads them and each gradient in place); weights set from outside drop
    them. Six float32 steps stay MLX's per-tensor steps within float32 rounding. (Trained bfloat16
    runs part by a bfloat16 rounding in a weight, which the next steps' gradients then carry: the
    bfloat16 arithmetic is checked step by step in `test_adamw_kernel_is_mlx_s_adamw`, and bit for
    bit on the CPU, with the kernels' arithmetic in their place, in tests/kernels/test_cuda_source.py.)"""
    monkeypatch.setattr(multi_tensor, "KEEP_FLAT", True)
    replacement = {k: v * 0.5 for k, v in tree_flatten(_model("float32").parameters())}

    def run(mode):
        model, opt = _model("float32"), OPTIMIZERS["adamw_f32_state"]()
        stepper = Stepper(model, opt, grad_clip=0.0, compile=True, fused=mode)
        kept = []
        for i, b in enumerate(_batches(6)):
            if i == 3:
                model.update(tree_unflatten(list(replacement.items())))
            mx.eval(stepper([b]), stepper.state)
            kept.append(stepper.resident.buffers.get(0, {}).get("p"))
        return dict(tree_flatten(model.parameters())), dict(tree_flatten(opt.state)), kept, stepper

    p_auto, st_auto, kept, stepper = run("auto")
    assert stepper.one_kernel and stepper.keeps_buffers and all(k is not None for k in kept)
    p_off, st_off, _, _ = run("off")
    _assert_same(p_auto, p_off, exact=False, rtol=1e-5)
    _assert_same(st_auto, st_off, exact=False, rtol=1e-5)


class _RejectsWideBatches(Loss):
    """Draws a random number (so `mx.random.state` is traced too), and rejects 32-wide batches the
    way a loss rejects a bad batch: while `mx.compile` traces the step."""

    def __call__(self, model, inputs, *arrays):
        if inputs.shape[1] == 32:
            mx.random.uniform()
            model(inputs)
            raise ValueError("this batch is rejected")
        return super().__call__(model, inputs, *arrays)


@pytest.mark.parametrize("fused_mode", ["on", "off"])
@pytest.mark.parametrize("profile, fail_at", [(False, 0), (False, 1), (True, 1)])
def test_a_step_that_raises_while_compiling_leaves_the_model_optimizer_and_rng_usable(fused_mode, profile, fail_at):
    """MLX leaves its tracing placeholders in the compiled state when the traced function raises;
    the model, the optimizer and `mx.random` (process-wide) must stay usable, and the good steps
    after it must be the ones an untroubled run takes (a failure on the first step comes before
    the optimizer's state exists)."""
    def run(fail: bool):
        mx.random.seed(3)
        model, opt = _model("float32"), OPTIMIZERS["adamw"]()
        stepper = Stepper(model, opt, grad_clip=1.0, compile=True, fused=fused_mode, profile=profile,
                          loss=_RejectsWideBatches())
        for i, good in enumerate(_batches(3)):
            if fail and i == fail_at:
                before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
                wide = tuple(np.concatenate([x, x], axis=1) for x in good)
                with pytest.raises(ValueError, match="rejected"):
                    stepper([wide])
                assert mx.random.uniform().item() >= 0  # the global random state evaluates
                after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
                assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
            mx.eval(stepper([good]), stepper.state)
        return dict(tree_flatten(model.parameters())), dict(tree_flatten(opt.state))

    (p_fail, s_fail), (p_ok, s_ok) = run(True), run(False)
    _assert_same(p_fail, p_ok, exact=ON_CPU, rtol=1e-6)
    _assert_same(s_fail, s_ok, exact=ON_CPU, rtol=1e-6)


def _adamw_kernel_here() -> None:
    if not (kernels.available() or cuda.available()):
        pytest.skip(f"no AdamW kernel here: {kernels.status()}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adamw_kernel_is_mlx_s_adamw(dtype):
    """`kernels.adamw_step` (on the CPU one multi-threaded pass over every tensor; on CUDA a few
    multi-tensor kernels) against `optim.clip_grad_norm` + `AdamW.apply_gradients`, eager, over
    five steps of a warmup + cosine schedule with weight decay: clipping active and not, tensors
    larger than a thread's share or a CUDA block's chunk, sizes that are not a multiple of the
    vector width, and more tensors than one CUDA launch takes. Bit for bit on the CPU; on CUDA
    within float32 rounding (MLX's own CUDA ops may contract multiply-adds) and one bfloat16
    rounding of the parameters. bfloat16 parameters (AdamWFloat32State's float32 moments, and plain
    AdamW's bfloat16 ones, every operation rounded to bfloat16) run the kernel on CUDA and
    `reference_adamw_step` on the CPU, which must then be MLX's rule bit for bit."""
    _adamw_kernel_here()
    rng = np.random.default_rng(0)
    shapes = [(300, 257), (96,), (7, 13), (3,), (128, 512), (cuda.CHUNK + 1,)] + [(5, i + 1) for i in range(30)]
    wdtype = getattr(mx, dtype)
    params = {f"p{i}": mx.array(rng.standard_normal(s).astype(np.float32)).astype(wdtype) for i, s in enumerate(shapes)}
    schedule = optim.join_schedules([optim.linear_schedule(1e-3, 3e-2, 2), optim.cosine_decay(3e-2, 10)], [2])
    exact = ON_CPU
    tol = {"float32": 1e-6, "bfloat16": 2.0**-7}[dtype]
    for cls in (optim.AdamW, optimizers.AdamWFloat32State):
        opt = cls(schedule, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1)
        mdtype = mx.float32 if cls is optimizers.AdamWFloat32State else wdtype
        ours, m, v = list(params.values()), [mx.zeros(s, mdtype) for s in shapes], [mx.zeros(s, mdtype) for s in shapes]
        theirs = params
        for step, (gain, max_norm) in enumerate([(1.0, 1.0), (30.0, 1.0), (1e-3, 1.0), (5.0, float("inf")), (2.0, 0.5)]):
            grads = {k: mx.array(gain * rng.standard_normal(s).astype(np.float32)).astype(wdtype)
                     for k, s in zip(params, shapes)}
            scale = mx.array(1 / 37.0)
            clipped, norm = optim.clip_grad_norm(tree_map_scale(grads, scale), max_norm)
            theirs = opt.apply_gradients(clipped, theirs)
            normalizer = mx.minimum(max_norm / (norm + 1e-6), 1.0)
            out = kernels.adamw_step(ours, list(grads.values()), m, v, opt.learning_rate, scale, normalizer,
                                     0.9, 0.95, 1e-8, 0.1)
            n = len(shapes)
            ours, m, v = out[:n], out[n:2 * n], out[2 * n:]
            if step == 1:
                assert norm.item() > 1.0  # the clip is active here
            _assert_same(dict(zip(params, ours)), dict(theirs), exact=exact, rtol=tol)
            mtol = 1e-6 if mdtype == mx.float32 else tol
            _assert_same(dict(zip(params, m)), {k: s["m"] for k, s in opt.state.items() if k in params},
                         exact=exact, rtol=mtol)
            _assert_same(dict(zip(params, v)), {k: s["v"] for k, s in opt.state.items() if k in params},
                         exact=exact, rtol=mtol)
            ours = list(dict(theirs).values())  # the next step from the same parameters: no drift
        ref = kernels.reference_adamw_step(list(params.values()), list(grads.values()), m, v, opt.learning_rate,
                                           scale, normalizer, 0.9, 0.95, 1e-8, 0.1)
        fast = kernels.adamw_step(list(params.values()), list(grads.values()), m, v, opt.learning_rate,
                                  scale, normalizer, 0.9, 0.95, 1e-8, 0.1)
        _assert_same(dict(enumerate(fast)), dict(enumerate(ref)), exact=exact, rtol=tol)  # the fallback: the same rule


@pytest.mark.gpu
def test_the_cuda_clip_norm_is_the_float64_norm_of_the_scaled_gradients():
    """`cuda.squared_norm` (one multi-tensor reduction per launch) against float64 NumPy over the
    gradients as `g * scale.astype(g.dtype)` rounds them: float32, bfloat16 and float16 tensors
    (the last summed in float32: 300 x 300 values of 100 overflow float16), more tensors than a
    launch takes, sizes around a block's chunk."""
    if not cuda.available():
        pytest.skip("not an NVIDIA GPU")
    rng = np.random.default_rng(3)
    sizes = [1, 7, cuda.CHUNK - 1, cuda.CHUNK, cuda.CHUNK + 1, 3 * cuda.CHUNK + 5, 300 * 300] + [33] * 40
    grads, expected = [], 0.0
    scale = mx.array(1 / 3.0)
    for k, size in enumerate(sizes):
        dtype = (mx.float32, mx.bfloat16, mx.float16)[k % 3]
        g = mx.array((100.0 * rng.standard_normal(size)).astype(np.float32)).astype(dtype)
        grads.append(g)
        expected += float((np.array((g * scale.astype(dtype)).astype(mx.float32)).astype(np.float64) ** 2).sum())
    got = cuda.squared_norm(grads, scale)
    assert got.dtype == mx.float32
    np.testing.assert_allclose(got.item(), expected, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_the_default_step_runs_adamw_as_one_kernel_and_equals_mlx_s_per_tensor_step(clip):
    """`fused="auto"` on the CPU and on CUDA takes the kernel for AdamW on float32 parameters; four
    compiled steps give the same parameters, moments and step as MLX's per-tensor path ("off"):
    bit for bit on the CPU, within float32 rounding on CUDA (whose clip norm sums in another
    order)."""
    _adamw_kernel_here()
    for name in ("adamw", "adamw_f32_state"):
        s_auto, p_auto, st_auto, n_auto = _train("auto", "float32", OPTIMIZERS[name], grad_clip=clip)
        s_off, p_off, st_off, n_off = _train("off", "float32", OPTIMIZERS[name], grad_clip=clip)
        assert s_auto.one_kernel and not s_off.one_kernel and not s_auto.fused
        if clip:
            assert min(n_off) > clip  # clipped at every step
        _assert_same(p_auto, p_off, exact=ON_CPU, rtol=1e-5)
        _assert_same(st_auto, st_off, exact=ON_CPU, rtol=1e-5)
        assert st_auto["step"].item() == 4
        np.testing.assert_allclose(n_auto, n_off, rtol=0.0 if ON_CPU else 1e-5)


def test_the_adamw_kernel_is_used_only_where_it_is_the_same_rule(monkeypatch):
    here = kernels.available() or cuda.available()
    assert Stepper(_model("float32"), optim.AdamW(1e-3), compile=False).one_kernel == here
    for opt in (optim.Adam(1e-3), optim.AdamW(1e-3, bias_correction=True), optim.Lion(1e-3), optim.Adafactor(1e-3)):
        assert not Stepper(_model("float32"), opt, compile=False).one_kernel, type(opt).__name__
    # on bfloat16 parameters, AdamWFloat32State's float32 moments and AdamW's bfloat16 ones take the
    # kernels where one takes bfloat16 parameters (CUDA: bfloat16 arithmetic for the second); the
    # CPU kernel is float32 only
    for cls in (optim.AdamW, optimizers.AdamWFloat32State):
        assert Stepper(_model("bfloat16"), cls(1e-3), compile=False).one_kernel == cuda.available(), cls.__name__
    assert not Stepper(_model("float32"), optim.AdamW(1e-3), fused="off", compile=False).one_kernel
    monkeypatch.setenv("MLXFLOW_KERNELS", "off")
    assert not Stepper(_model("float32"), optim.AdamW(1e-3), compile=False).one_kernel
    assert not Stepper(_model("bfloat16"), optimizers.AdamWFloat32State(1e-3), compile=False).one_kernel
