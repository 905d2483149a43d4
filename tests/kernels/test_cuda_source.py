"""The CUDA kernels of `mlxcore.kernels.cuda` without a GPU: their sources compile, and the host
side hands each launch the right tensors and puts the results back in order.

`mx.fast.cuda_kernel` compiles its kernel with NVRTC only when it first runs on a GPU, so a typo
in the generated source would surface on a user's NVIDIA machine, not here. These tests capture
the sources `cuda.py` hands to MLX and compile them with `nvcc` for Hopper (sm_90), wrapped as
MLX wraps them (`mlx/backend/cuda/custom_kernel.cpp`: the header, then a `__global__` function in
`mlx::core::cu` whose parameters are `const T* input` per input and `T* output` per output, T
from the array's dtype). Skipped where there is no `nvcc`. On a GPU the kernels' results are
checked by the GPU subset (tests/mlxcore/test_fused_optimizer.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxcore.kernels import cuda

from tests.kernels.nvcc import CUDA_TYPES, needs_nvcc
from tests.kernels.nvcc import captured as _captured
from tests.kernels.nvcc import compile_kernel as _compile


@needs_nvcc
@pytest.mark.parametrize("p, g, m", [(mx.bfloat16, mx.bfloat16, mx.float32), (mx.float16, mx.float32, mx.float32),
                                     (mx.float16, mx.float16, mx.float16)],
                         ids=["bfloat16", "float16-float32-grads", "float16-moments"])
def test_the_adamw_kernel_source_compiles(monkeypatch, tmp_path, p, g, m):
    n = 3
    kernel = _captured(monkeypatch, lambda: cuda._adamw_kernel.__wrapped__(p, g, m, n))
    assert kernel["inputs"][:2] == ["meta", "hyp"] and len(kernel["inputs"]) == 2 + 4 * n
    assert len(kernel["outputs"]) == 3 * n
    types = {"meta": "int64_t", "hyp": "float"}
    for k in range(n):
        types |= {f"p{k}": CUDA_TYPES[p], f"po{k}": CUDA_TYPES[p], f"g{k}": CUDA_TYPES[g]}
        types |= {f"{x}{k}": CUDA_TYPES[m] for x in ("m", "v", "mo", "vo")}
    _compile(tmp_path, kernel, types)


@needs_nvcc
@pytest.mark.parametrize("g", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_the_squared_norm_kernel_source_compiles(monkeypatch, tmp_path, g):
    n = 2
    kernel = _captured(monkeypatch, lambda: cuda._norm_kernel.__wrapped__(g, n))
    assert kernel["inputs"] == ["meta", "hyp", "g0", "g1"] and kernel["outputs"] == ["out"]
    types = {"meta": "int64_t", "hyp": "float", "out": "float", "g0": CUDA_TYPES[g], "g1": CUDA_TYPES[g]}
    _compile(tmp_path, kernel, types)


def test_kernel_names_carry_everything_their_source_depends_on():
    """MLX caches a compiled kernel by its name, in the process and on disk: two sources under one
    name would run the first one's code."""
    names = {cuda._name("adamw", p, g, m, n=n) for p in (mx.float32, mx.bfloat16) for g in (mx.float32, mx.bfloat16)
             for m in (mx.float32, mx.bfloat16) for n in (1, 32)}
    assert len(names) == 16
    assert all(f"_{cuda.CHUNK}_{cuda.BLOCK}_{cuda.ILP}_" in name for name in names)
    assert cuda._name("sumsq", mx.float32, n=3) != cuda._name("adamw", mx.float32, n=3)


def test_launches_group_by_dtype_keep_order_and_hold_at_most_max_tensors():
    keys = ["a"] * (cuda.MAX_TENSORS + 3) + ["b", "a", "b"]
    launches = cuda._launches(keys)
    assert sorted(i for ids in launches for i in ids) == list(range(len(keys)))
    assert all(len(ids) <= cuda.MAX_TENSORS and len({keys[i] for i in ids}) == 1 for ids in launches)
    assert all(ids == sorted(ids) for ids in launches)
    meta, blocks = cuda._meta((1, cuda.CHUNK, cuda.CHUNK + 1))
    assert meta.tolist() == [0, 1, 2, 4, 1, cuda.CHUNK, cuda.CHUNK + 1] and blocks == 4


def _fake_adamw_kernel(p_dtype, g_dtype, m_dtype, n):
    """What the AdamW kernel computes, as MLX ops on the CPU, reading its inputs exactly as the CUDA
    source does (the table, then `hyp`'s nine floats, each but the two scales rounded to the
    moments' dtype) and checking the launch it is given: every operation in the moments' dtype."""
    def run(inputs, output_shapes, output_dtypes, grid, threadgroup):
        meta, hyp = inputs[0].tolist(), inputs[1]
        ps, gs, ms, vs = (inputs[2 + k * n:2 + (k + 1) * n] for k in range(4))
        assert meta[n + 1:] == [p.size for p in ps] and meta[0] == 0
        assert grid == (meta[n] * cuda.BLOCK, 1, 1) and threadgroup == (cuda.BLOCK, 1, 1)
        assert all(p.dtype == p_dtype for p in ps) and all(g.dtype == g_dtype for g in gs)
        assert all(x.dtype == m_dtype for x in (*ms, *vs)) and cuda.moments_supported(p_dtype, g_dtype, m_dtype)
        assert output_shapes == [p.shape for p in ps] * 3
        assert output_dtypes == [p_dtype] * n + [m_dtype] * (2 * n)
        lr, scale, nz, b1, c1, b2, c2, eps, wd = (hyp[k] for k in range(9))
        lr, b1, c1, b2, c2, eps, wd = (x.astype(m_dtype) for x in (lr, b1, c1, b2, c2, eps, wd))
        new_p, new_m, new_v = [], [], []
        for p, g, m, v in zip(ps, gs, ms, vs):
            g = ((g.astype(mx.float32) * scale).astype(g_dtype).astype(mx.float32) * nz).astype(g_dtype)
            g = g.astype(m_dtype)
            m = b1 * m + c1 * g
            v = b2 * v + c2 * (g * g)
            new_p.append((p.astype(m_dtype) * (1 - lr * wd) - (lr * m) / (mx.sqrt(v) + eps)).astype(p_dtype))
            new_m.append(m)
            new_v.append(v)
        return new_p + new_m + new_v
    return run


def test_the_host_side_hands_each_launch_its_tensors_and_puts_the_results_back_in_order(monkeypatch):
    """`cuda.adamw_step`'s plumbing on the CPU, with the kernel replaced by its arithmetic in MLX
    ops: tensors of three dtype pairs interleaved, float32 moments and (plain AdamW) moments in the
    parameters' bfloat16 / float16, more than one launch holds, an empty tensor. The result must be
    `reference_adamw_step`'s, bit for bit, in the caller's order."""
    from mlxcore import kernels

    monkeypatch.setattr(cuda, "_adamw_kernel", _fake_adamw_kernel)
    rng = np.random.default_rng(0)
    dtypes = [mx.float32, mx.bfloat16, mx.float16]
    shapes = [(3, 5), (cuda.CHUNK + 7,), (0,), (2, 2, 2)] + [(i + 1,) for i in range(cuda.MAX_TENSORS + 5)]
    params = [mx.array(rng.standard_normal(s).astype(np.float32)).astype(dtypes[k % 3]) for k, s in enumerate(shapes)]
    grads = [mx.array(rng.standard_normal(s).astype(np.float32)).astype(p.dtype) for p, s in zip(params, shapes)]
    m_dtypes = [p.dtype if k % 2 else mx.float32 for k, p in enumerate(params)]
    m = [mx.array(rng.standard_normal(s).astype(np.float32)).astype(d) for s, d in zip(shapes, m_dtypes)]
    v = [mx.array(rng.random(s).astype(np.float32)).astype(d) for s, d in zip(shapes, m_dtypes)]
    args = (mx.array(3e-3), mx.array(1 / 37), mx.array(0.61), 0.9, 0.95, 1e-8, 0.1)
    assert len({(p.dtype, d) for p, d in zip(params, m_dtypes)}) == 5  # f32/f32, and bf16, f16 with each
    ours = cuda.adamw_step(params, grads, m, v, *args)
    ref = kernels.reference_adamw_step(params, grads, m, v, *args)
    assert len(ours) == len(ref) == 3 * len(shapes)
    for k, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert np.array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))), k


def _fake_norm_kernel(g_dtype, n):
    """What the squared-norm kernel computes, per launch, as MLX ops: the launch's total in its
    first block's slot (the others 0), after checking the table and the grid it is given."""
    def run(inputs, output_shapes, output_dtypes, grid, threadgroup):
        meta, scale, gs = inputs[0].tolist(), inputs[1][0], inputs[2:]
        assert len(gs) == n and meta[n + 1:] == [g.size for g in gs] and all(g.dtype == g_dtype for g in gs)
        assert output_shapes == [(meta[n],)] and output_dtypes == [mx.float32] and grid == (meta[n] * cuda.BLOCK, 1, 1)
        total = sum(((g.astype(mx.float32) * scale).astype(g_dtype).astype(mx.float32) ** 2).sum() for g in gs)
        return [mx.concatenate([total.reshape(1), mx.zeros((meta[n] - 1,))])]
    return run


def test_the_host_side_of_the_squared_norm_adds_every_launch(monkeypatch):
    monkeypatch.setattr(cuda, "_norm_kernel", _fake_norm_kernel)
    rng = np.random.default_rng(1)
    sizes = [0, 5, cuda.CHUNK + 1] + [3] * (cuda.MAX_FLAT + 2)
    grads = [mx.array(rng.standard_normal(s).astype(np.float32)).astype((mx.float32, mx.bfloat16)[k % 2])
             for k, s in enumerate(sizes)]
    scale = mx.array(0.25)
    expected = sum(float((np.array((g * scale.astype(g.dtype)).astype(mx.float32), dtype=np.float64) ** 2).sum())
                   for g in grads)
    assert cuda.squared_norm([mx.zeros((0,))], scale).item() == 0.0  # no launch for empty tensors alone
    np.testing.assert_allclose(cuda.squared_norm(grads, scale).item(), expected, rtol=1e-5)  # float32 sums


def test_the_kernel_benchmark_runs_its_rows(monkeypatch, capsys):
    """bench/cuda_optimizer_kernels.py with the kernels replaced by their arithmetic (it needs a GPU
    to measure anything): every row and column is timed and printed. Where MLX's default device
    is not CUDA, the real script stops with a message saying so."""
    import functools

    from bench import cuda_optimizer_kernels as bench

    if not cuda.available():
        with pytest.raises(SystemExit, match="needs MLX's CUDA backend"):
            bench.main(["--preset", "tiny", "--reps", "1"])
    monkeypatch.setattr(cuda, "available", lambda: True)
    monkeypatch.setattr(cuda, "_adamw_kernel", functools.lru_cache(maxsize=None)(_fake_adamw_kernel))
    monkeypatch.setattr(cuda, "_norm_kernel", functools.lru_cache(maxsize=None)(_fake_norm_kernel))
    monkeypatch.setattr(cuda, "_adamw_flat_kernel", functools.lru_cache(maxsize=None)(_fake_flat_kernel))
    out = bench.main(["--preset", "tiny", "--reps", "1"])
    assert list(out) == [f"kernels {cuda.CHUNK}/{cuda.ILP}", "mlx compiled"]
    assert list(out[f"kernels {cuda.CHUNK}/{cuda.ILP}"]) == ["adamw_tensors", "adamw_flat", "adamw_kept", "norm_tensors", "norm_flat"]
    assert list(out["mlx compiled"]) == ["adamw_tensors", "adamw_flat", "norm_tensors", "norm_flat"]
    for row in out.values():
        assert all(median >= best > 0 for median, best in row.values())
    printed = capsys.readouterr().out
    assert "38 tensors" in printed and "mlx compiled" in printed and "float32 moments" in printed
    out = bench.main(["--preset", "tiny", "--reps", "1", "--moments", "param"])  # plain AdamW's moments
    assert all(median >= best > 0 for row in out.values() for median, best in row.values())
    assert "bfloat16 moments" in capsys.readouterr().out


@needs_nvcc
@pytest.mark.parametrize("p, g, m", [(mx.bfloat16, mx.bfloat16, mx.float32), (mx.float32, mx.float32, mx.float32),
                                     (mx.bfloat16, mx.bfloat16, mx.bfloat16)],
                         ids=["bfloat16", "float32", "bfloat16-moments"])
def test_the_flat_adamw_kernel_source_compiles(monkeypatch, tmp_path, p, g, m):
    n = 3
    kernel = _captured(monkeypatch, lambda: cuda._adamw_flat_kernel.__wrapped__(p, g, m, n))
    assert kernel["inputs"] == ["meta", "hyp", "p", "m", "v", "g0", "g1", "g2"]
    assert kernel["outputs"] == ["po", "mo", "vo"]
    types = {"meta": "int64_t", "hyp": "float", "p": CUDA_TYPES[p], "po": CUDA_TYPES[p]}
    types |= {x: CUDA_TYPES[m] for x in ("m", "v", "mo", "vo")} | {f"g{k}": CUDA_TYPES[g] for k in range(n)}
    _compile(tmp_path, kernel, types)


def _fake_flat_kernel(p_dtype, g_dtype, m_dtype, n):
    """What the flat AdamW kernel computes, as MLX ops: each tensor's slice of the flat buffers,
    found from the table as the CUDA source finds it (block starts, sizes, then offsets)."""
    per_tensor = _fake_adamw_kernel(p_dtype, g_dtype, m_dtype, n)

    def run(inputs, output_shapes, output_dtypes, grid, threadgroup):
        meta, hyp, p, m, v, gs = inputs[0].tolist(), inputs[1], *inputs[2:5], inputs[5:]
        assert len(gs) == n and len(meta) == 3 * n + 1
        sizes, offsets = meta[n + 1:2 * n + 1], meta[2 * n + 1:]
        assert sizes == [g.size for g in gs] and offsets == [sum(sizes[:k]) for k in range(n)]
        assert output_shapes == [(p.size,)] * 3 and output_dtypes == [p_dtype, m_dtype, m_dtype]
        views = [[x[o:o + s].reshape(g.shape) for o, s, g in zip(offsets, sizes, gs)] for x in (p, m, v)]
        out = per_tensor([mx.array(meta[:2 * n + 1]), hyp, *views[0], *gs, *views[1], *views[2]],
                         [g.shape for g in gs] * 3, [p_dtype] * n + [m_dtype] * (2 * n), grid, threadgroup)
        return [mx.concatenate([x.reshape(-1) for x in out[k * n:(k + 1) * n]]) for k in range(3)]
    return run


def test_the_flat_host_side_matches_the_reference_and_checks_its_buffers(monkeypatch):
    from mlxcore import kernels

    monkeypatch.setattr(cuda, "_adamw_flat_kernel", _fake_flat_kernel)
    rng = np.random.default_rng(3)
    shapes = [(3, 5), (cuda.CHUNK + 7,), (0,), (2, 2, 2), (1,)]
    params = [mx.array(rng.standard_normal(s).astype(np.float32)).astype(mx.bfloat16) for s in shapes]
    grads = [mx.array(rng.standard_normal(s).astype(np.float32)).astype(mx.bfloat16) for s in shapes]
    m = [mx.array(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    v = [mx.array(rng.random(s).astype(np.float32)) for s in shapes]
    args = (mx.array(3e-3), mx.array(1 / 37), mx.array(0.61), 0.9, 0.95, 1e-8, 0.1)
    flat = [mx.concatenate([x.reshape(-1) for x in xs]) for xs in (params, m, v)]
    ours = cuda.adamw_flat_step(*flat, grads, *args)
    ref = kernels.reference_adamw_step(params, grads, m, v, *args)
    n = len(shapes)
    for k, got in enumerate(ours):
        want = mx.concatenate([x.reshape(-1) for x in ref[k * n:(k + 1) * n]])
        assert got.dtype == want.dtype and np.array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)))
    with pytest.raises(ValueError, match="flat buffers of"):
        cuda.adamw_flat_step(flat[0][1:], flat[1], flat[2], grads, *args)
    with pytest.raises(ValueError, match="1 to"):
        cuda.adamw_flat_step(*flat, [], *args)


@pytest.mark.parametrize("dtype, opt_name", [("float32", "adamw_f32_state"), ("bfloat16", "adamw_f32_state"),
                                             ("bfloat16", "adamw")])
def test_the_cuda_step_keeps_flat_buffers_and_equals_the_per_tensor_step(monkeypatch, dtype, opt_name):
    """The training step on CUDA, here with the kernels replaced by their arithmetic (and not
    compiled: the stand-ins read their tables on the host): the flat parameter and moment buffers
    are built once, kept from step to step, rebuilt when weights are set from outside (a
    checkpoint loaded mid-run), and every step equals MLX's per-tensor step, bit for bit: with
    float32 moments, and with plain AdamW's bfloat16 ones (every operation rounded to bfloat16)."""
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_unflatten

    from mlxcore.models.model import from_config, hf_config
    from mlxcore.train import multi_tensor, optimizers
    from mlxcore.train.step import Stepper
    from tests.conftest import micro_model

    vocab = 64
    model_of = lambda: from_config(hf_config(micro_model().model_copy(update={"dtype": dtype}), vocab), seed=0)  # noqa: E731
    opt_cls = optimizers.AdamWFloat32State if opt_name == "adamw_f32_state" else optim.AdamW
    opt_of = lambda: opt_cls(optim.cosine_decay(3e-2, 10), betas=[0.9, 0.95], weight_decay=0.1)  # noqa: E731
    replacement = {k: v * 0.5 for k, v in tree_flatten(model_of().parameters())}
    rng = np.random.default_rng(4)
    batches = [(rng.integers(0, vocab, (2, 8)), rng.integers(0, vocab, (2, 8)), np.ones((2, 8), np.float32))
               for _ in range(6)]

    def run(mode):
        model, opt = model_of(), opt_of()
        stepper = Stepper(model, opt, grad_clip=0.0, compile=False, fused=mode)
        built = []
        for i, b in enumerate(batches):
            if i == 3:
                model.update(tree_unflatten(list(replacement.items())))
            mx.eval(stepper([b]), stepper.state)
            built.append(len(flats))
        return dict(tree_flatten(model.parameters())), dict(tree_flatten(opt.state)), built, stepper

    flats: list = []
    flat = multi_tensor._flat
    monkeypatch.setattr(multi_tensor, "_flat", lambda xs: flats.append(len(xs)) or flat(xs))
    p_off, st_off, built, _ = run("off")
    assert built == [0] * 6
    monkeypatch.setattr(cuda, "available", lambda: True)
    monkeypatch.setattr(multi_tensor, "KEEP_FLAT", True)
    monkeypatch.setattr(cuda, "_adamw_flat_kernel", _fake_flat_kernel)
    monkeypatch.setattr(cuda, "_norm_kernel", _fake_norm_kernel)
    p_cuda, st_cuda, built, stepper = run("auto")
    assert stepper.one_kernel and stepper.keeps_buffers
    assert built == [3, 3, 3, 6, 6, 6]  # parameters, m, v flattened at step 1, and again after the replacement
    kept = stepper.resident.buffers[0]
    assert kept["p"].size == sum(p.size for p in p_cuda.values())
    assert p_cuda.keys() == p_off.keys() and st_cuda.keys() == st_off.keys()
    for got, want in ((p_cuda, p_off), (st_cuda, st_off)):
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
            assert np.array_equal(np.array(got[k].astype(mx.float32)), np.array(want[k].astype(mx.float32))), k
