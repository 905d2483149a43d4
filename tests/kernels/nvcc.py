"""Compile `mx.fast.cuda_kernel` sources with `nvcc` where there is no GPU (tests/kernels/test_cuda_*.py).

`mx.fast.cuda_kernel` compiles its kernel with NVRTC only when it first runs on a GPU, so a typo in
a generated source would surface on a user's NVIDIA machine, not here. `captured` records what a
builder hands to MLX; `compile_kernel` wraps it as MLX wraps a custom kernel
(`mlx/backend/cuda/custom_kernel.cpp`: the header, then a `__global__` function in `mlx::core::cu`
whose parameters are `const T* input` per input and `T* output` per output) and compiles it for
Hopper (sm_90) with `ptxas -v`. A kernel must compile with no stack frame: per-thread arrays in
registers, not local memory (the first SwiGLU kernels had one, and ran slower than MLX's own)."""

from __future__ import annotations

import shutil
import subprocess

import mlx.core as mx
import pytest

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc (CUDA toolkit)")

CUDA_TYPES = {mx.float32: "float", mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.int64: "int64_t"}


def captured(monkeypatch, build) -> dict:
    """What `build()` hands to `mx.fast.cuda_kernel`: name, inputs, outputs, source, header."""
    seen = {}

    def fake_cuda_kernel(name, input_names, output_names, source, header="", **_):
        seen.update(name=name, inputs=list(input_names), outputs=list(output_names), source=source, header=header)
        return "kernel"

    monkeypatch.setattr(mx.fast, "cuda_kernel", fake_cuda_kernel)
    assert build() == "kernel"
    return seen


def compile_kernel(tmp_path, kernel: dict, types: dict) -> None:
    """Compile `kernel` (as `captured` returns it) with `types[name]`, the C type of each array."""
    params = [f"const {types[n]}* {n}" for n in kernel["inputs"]] + [f"{types[n]}* {n}" for n in kernel["outputs"]]
    source = ("#include <cstdint>\n#include <cooperative_groups.h>\n" + kernel["header"]
              + "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
              + f"__global__ void custom_kernel_{kernel['name']}(\n    " + ",\n    ".join(params) + ") {\n"
              + kernel["source"] + "\n}\n}  // namespace mlx::core::cu\n")
    path = tmp_path / f"{kernel['name']}.cu"
    path.write_text(source)
    # device code only (`-cubin`): what NVRTC compiles; the host pass would add a gcc run per kernel
    run = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-Xptxas", "-v", "-cubin", str(path), "-o",
                          str(tmp_path / "k.cubin")], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "0 bytes stack frame" in run.stderr, run.stderr[-3000:]
