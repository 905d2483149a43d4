"""Fast BLAS is loaded before mlx.core on Linux CPU, and can be turned off or diagnosed."""

import platform
import subprocess
import sys

import numpy as np
import pytest

import mlxcore
import mlx.core as mx

linux_x86 = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"), reason="MKL is Linux x86-64 only"
)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


@linux_x86
def test_mkl_is_loaded_into_this_process():
    assert mlxcore.BLAS.name == "mkl", mlxcore.BLAS
    maps = open("/proc/self/maps").read()
    assert "libmkl_rt" in maps


def test_matmul_is_correct_with_the_loaded_blas():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((300, 200), dtype=np.float32), rng.standard_normal((200, 100), dtype=np.float32)
    np.testing.assert_allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, rtol=1e-4, atol=1e-4)


def test_reference_blas_can_be_forced():
    out = _python("import mlxcore, sys; print(mlxcore.BLAS.name); print('libmkl_rt' in open('/proc/self/maps').read())",
                  MLXFLOW_BLAS="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "False"]


def test_unknown_blas_choice_is_a_clear_error():
    out = _python("import mlxcore", MLXFLOW_BLAS="fastest-please")
    assert out.returncode != 0
    assert "MLXFLOW_BLAS='fastest-please'" in out.stderr


@linux_x86
def test_importing_mlx_first_warns_with_the_fix():
    out = _python("import mlx.core; import mlxcore; print(mlxcore.BLAS.name)")
    assert out.stdout.strip() == "unchanged"
    assert "import mlxcore first" in out.stderr


def test_doctor_reports_device_backend_blas_and_rate():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "doctor"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    fields = dict(line.split(None, 1) for line in out.stdout.strip().splitlines())
    assert fields["backend"] in {"cpu", "metal", "cuda"}
    assert fields["blas"] == mlxcore.BLAS.name
    assert float(fields["cpu_sgemm_gflops"]) > 0
    assert fields["kernels"].startswith(("mlxflow CPU kernels", "plain MLX ops", "CUDA: mlxflow kernels"))


@pytest.mark.skipif(sys.platform == "darwin", reason="Metal keeps its own default")
def test_mlxcore_bounds_what_cuda_graphs_hold_in_flight_unless_the_user_chose():
    """MLX_MAX_MB_PER_BUFFER is read when MLX makes its first CUDA stream: importing mlxcore sets
    mlxcore's default before mlx.core loads (the CPU ignores it; bench/activation_memory.py
    measures it on a GPU), and never overrides a value in the environment."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "MLX_MAX_MB_PER_BUFFER"}
    code = "import os, mlxcore, mlx.core; print(os.environ.get('MLX_MAX_MB_PER_BUFFER'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [mlxcore.CUDA_GRAPH_MB]
    out = _python(code, MLX_MAX_MB_PER_BUFFER="25")
    assert out.stdout.split() == ["25"], out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU only")
def test_mlxcore_makes_openmp_teams_wait_passively_unless_the_user_chose():
    """OMP_WAIT_POLICY is read when an OpenMP runtime loads: importing mlxcore sets passive before
    MKL (and its runtime) loads, so MKL's team that served a GEMM sleeps instead of spinning
    through the next kernel. Where MKL runs on Intel's OpenMP (no PyTorch in the process, as in
    the trainer) the runtime itself reports it: block time 0 (it spins for ever with `active`).
    A value in the environment is never overridden."""
    import os

    from mlxcore.perf import _blas

    code = ("import ctypes, os, mlxcore, mlx.core as mx; a = mx.ones((256, 256)); mx.eval(a @ a); "
            "iomp = [l.split()[-1] for l in open('/proc/self/maps') if 'libiomp5' in l]; "
            "print(os.environ.get('OMP_WAIT_POLICY'), ctypes.CDLL(iomp[0]).kmp_get_blocktime() if iomp else '-')")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    policy, blocktime = out.stdout.split()
    assert policy == _blas.OMP_WAIT_POLICY == "passive" and blocktime in ("0", "-")
    out = _python(code, OMP_WAIT_POLICY="active")
    policy, blocktime = out.stdout.split()
    assert policy == "active" and blocktime in (str(2**31 - 1), "-"), out.stderr
    if _blas.ensure_fast_blas().name == "mkl" and platform.machine() in ("x86_64", "AMD64"):
        assert blocktime != "-"  # MKL on x86-64 runs on Intel's OpenMP here: the check above ran
