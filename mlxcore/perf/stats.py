"""Model size, training FLOPs per token, the device's peak FLOP/s, and model FLOPs utilisation.

FLOPs per token (the PaLM / nanoGPT convention, so MFU figures compare across projects):

    N    = matmul parameters per token: per layer  h*d*(2*n_heads + 2*n_kv_heads)   (q, k, v, o)
                                                 + 3*h*i                          (SwiGLU)
           plus the output head V*h (counted even when tied to the embedding; the embedding
           lookup itself costs no FLOPs)
    attn = 2 * 2 * L * T * n_heads * d    (QK^T and AV over all T keys; the causal mask's
                                            saving is not subtracted, as in PaLM)
    forward = 2*N + attn;   full training = 3 * forward = 6N + 12*L*T*n_heads*d
    adapters (LoRA/DoRA/QLoRA): 2 * forward, since the frozen base gets no weight gradients

MFU = tokens/s * FLOPs per token / peak FLOP/s. The peak is measured (the best of repeated
large matmuls in the training dtype) on CPUs and CUDA GPUs, and taken from Apple's published GPU
figures on the Apple chips that have them; `peak_tflops` overrides either.
"""

from __future__ import annotations

import platform
import time

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx

# Apple GPU float32 TFLOP/s as Apple published them, for the largest GPU of each chip (the GPUs
# run fp16/bf16 FMAs at the same rate). Chips not listed (M3, M4, ...) get a measured peak.
APPLE_GPU_TFLOPS = {
    "M1": 2.6, "M1 Pro": 5.2, "M1 Max": 10.4, "M1 Ultra": 21.0,
    "M2": 3.6, "M2 Pro": 6.8, "M2 Max": 13.6, "M2 Ultra": 27.2,
}


def shape(config: dict) -> dict:
    """The dimensions FLOPs depend on, from an HF-style config.json dict."""
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    return {
        "hidden": h,
        "layers": config["num_hidden_layers"],
        "heads": heads,
        "kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or h // heads,
        "intermediate": config["intermediate_size"],
        "vocab": config["vocab_size"],
    }


def matmul_params(config: dict) -> int:
    s = shape(config)
    attn = s["hidden"] * s["head_dim"] * (2 * s["heads"] + 2 * s["kv_heads"])
    mlp = 3 * s["hidden"] * s["intermediate"]
    return s["layers"] * (attn + mlp) + s["vocab"] * s["hidden"]


def flops_per_token(config: dict, seq_len: int, adapters: bool = False) -> dict:
    """Forward and training FLOPs per token (see the module docstring for the formula)."""
    s = shape(config)
    n = matmul_params(config)
    attn = 4 * s["layers"] * seq_len * s["heads"] * s["head_dim"]
    forward = 2 * n + attn
    return {"matmul_params": n, "forward": forward, "train": (2 if adapters else 3) * forward,
            "formula": "2N+attn per forward; training 3x forward (2x with frozen base)"}


def apple_chip() -> str | None:
    if platform.system() != "Darwin" or not mx.metal.is_available():
        return None
    name = mx.metal.device_info().get("device_name", "")
    return name.removeprefix("Apple ").strip() or None


def measured_matmul_flops(dtype: mx.Dtype = mx.float32, n: int | None = None, seconds: float = 1.0,
                          device: mx.Device | None = None) -> float:
    """Best sustained FLOP/s of an n x n @ n x n matmul over about `seconds`."""
    device = device or mx.default_device()
    n = n or (8192 if device.type == mx.gpu else 2048)
    with mx.stream(device):
        a = mx.random.normal((n, n)).astype(dtype)
        b = mx.random.normal((n, n)).astype(dtype)
        mx.eval(a, b, a @ b)
        best, spent = float("inf"), 0.0
        while spent < seconds:
            t0 = time.perf_counter()
            mx.eval(a @ b)
            dt = time.perf_counter() - t0
            best, spent = min(best, dt), spent + dt
    return 2 * n**3 / best


def peak_flops(dtype: mx.Dtype = mx.float32) -> dict:
    """{'flops': peak FLOP/s, 'source': how it was obtained, 'device': ...} for the default device."""
    chip = apple_chip()
    if chip in APPLE_GPU_TFLOPS:
        return {"flops": APPLE_GPU_TFLOPS[chip] * 1e12, "source": f"Apple {chip} published GPU peak", "device": chip}
    device = mx.default_device()
    flops = measured_matmul_flops(dtype, device=device)
    return {"flops": flops, "source": f"measured {dtype} matmul", "device": str(device)}


def mfu(tok_per_s: float, flops_per_tok: float, peak: float) -> float:
    return tok_per_s * flops_per_tok / peak


def report(config: dict, seq_len: int, dtype: str = "float32", tok_per_s: float | None = None,
           adapters: bool = False, peak: dict | None = None, params: int | None = None) -> dict:
    f = flops_per_token(config, seq_len, adapters)
    peak = peak or peak_flops(getattr(mx, dtype))
    out = {"params": params, "matmul_params": f["matmul_params"], "seq_len": seq_len,
           "flops_per_token_forward": f["forward"], "flops_per_token_train": f["train"],
           "formula": f["formula"], "peak_flops": peak["flops"], "peak_source": peak["source"], "device": peak["device"]}
    if tok_per_s:
        out |= {"tok_per_s": tok_per_s, "mfu": mfu(tok_per_s, f["train"], peak["flops"])}
    return out
