"""bench/kernel_profile.py sorts kernels into the categories its README table reports.

The names are real ones, from its profile of the 200mb bf16 step on an H100 (MLX-CUDA 0.32.4,
torch 2.11 compiled). On a machine without CUDA the script refuses with a clear message.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # bench/ holds scripts, not a package

import kernel_profile  # noqa: E402

KERNELS = {
    # cuDNN attention: its names contain "wgmma" and "sm90_" like the GEMMs'
    "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x1_kernel0_0": "attention",
    "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, void const*)": "attention",
    "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "GEMM",
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>": "GEMM",
    "void mlx::core::cu::rope<__nv_bfloat16, false, true>(__nv_bfloat16 const*, __nv_bfloat16*)": "RoPE",
    "void mlx::core::cu::rms_norm_vjp_small_fallback<__nv_bfloat16, true, 128, 32, 8>(__nv_bfloat16 const*)": "RMSNorm",
    "triton_per_fused__fused_rms_norm__fused_rms_norm_backward_add_view_7": "RMSNorm",
    "void mlx::core::cu::CV2ISigmoidADV2IMultiplyACEV2OMultiplyDB_VV_V2V2_6142509188972423790_contiguous<unsigned int, 8>": "SwiGLU",
    "triton_poi_fused__unsafe_view_mul_silu_silu_backward_view_3": "SwiGLU",
    "void mlx::core::cu::unary_v<mlx::core::cu::Square, __nv_bfloat16, __nv_bfloat16, unsigned int, 8>": "clip + optimizer",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::FusedOptimizerTensorListMetadata<4>>": "clip + optimizer",
    "void mlx::core::cu::logsumexp<float, float, 1024, 4>(float const*, float*, int)": "loss",
    "mlx::core::cu::custom_kernel_mlxflow_addnorm_v3_bfloat16_3_bwd(long long const*, float const*)": "RMSNorm",
    "mlx::core::cu::custom_kernel_mlxflow_addnorm_colsum_v3(long long const*, float const*)": "RMSNorm",
    "mlx::core::cu::custom_kernel_mlxflow_xent_v2_bfloat16_fwd(long long const*, __nv_bfloat16 const*)": "loss",
    "void mlx::core::cu::binary_vv<mlx::core::cu::Add, __nv_bfloat16, __nv_bfloat16, unsigned int, 8>": kernel_profile.OTHER,
    "Memset (Unknown)": kernel_profile.OTHER,
}


@pytest.mark.parametrize("name", KERNELS)
def test_each_kernel_lands_in_its_category(name):
    assert kernel_profile.category(name) == KERNELS[name]


def test_categories_sum_time_and_launches_per_step():
    rows = [(9.9, 15, "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26"),
            (10.25, 106, "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT"),
            (3.26, 105, "void cublasLt::splitKreduce_kernel<32, 16>"), (0.45, 212, "Memset (Unknown)")]
    cats = kernel_profile.by_category(rows)
    assert list(cats) == ["GEMM", "attention", kernel_profile.OTHER]  # most time first
    assert cats["GEMM"][0] == pytest.approx(13.51) and cats["GEMM"][1] == 211
    assert cats["attention"] == (9.9, 15)


def test_without_cuda_it_says_what_it_needs():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = subprocess.run([sys.executable, str(BENCH / "kernel_profile.py"), "--preset", "tiny"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "needs an NVIDIA GPU" in out.stderr
