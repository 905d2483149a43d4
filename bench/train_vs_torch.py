"""Training throughput of mlxcore's MLX step vs the same model trained by PyTorch, in one run.

    python bench/train_vs_torch.py --preset tiny --batch 8 --seq 256
    python bench/train_vs_torch.py --preset 200mb --batch 4 --seq 512 --steps 3 --warmup 1
    python bench/train_vs_torch.py --preset custom --hidden 512 --layers 8 --heads 8 \
        --kv-heads 4 --intermediate 1408 --dtype bfloat16 --json result.json

What is compared: mlxcore's `make_step(model, AdamW, grad_clip=1.0, compile=True)` on
mlx-lm's llama model vs `bench/torch_llama.py` (the same architecture in plain PyTorch) with
the same config, dtype, initial weights (copied MLX -> torch, then checked to give the same
loss), the same fixed random batch, the same loss (mean cross-entropy over masked tokens),
global-norm clipping to 1.0 and AdamW (betas 0.9/0.95, weight decay 0.01, MLX's update rule).
Every step is synchronised (`mx.eval` of model, optimizer state and outputs; on CUDA
`torch.cuda.synchronize`). After --warmup untimed steps each, the frameworks take turns over
--steps timed steps (in --rounds blocks; default one step each in turn), so a load change on
a shared machine hits all of them alike. A row's step time is the median of its timed steps;
tok/s = batch * seq / that median; ratio = ours / pytorch tok/s, so > 1 means MLX is faster
(a second ratio from each side's fastest step is printed too: on a busy machine it is the
least disturbed). Peak memory: MLX's allocator and torch's CUDA allocator; n/a on torch CPU.
MLX runs on its default device, torch on CUDA if present, else CPU with one thread per core.
`--compile auto` compiles torch on CUDA; on CPU it times eager and compiled and compares
against the faster (both rows are printed, the one used is starred).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlxcore  # first: it loads a fast BLAS (MKL) before mlx.core binds one
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import torch

from mlxcore.perf import stats
from mlxcore.config import ModelConfig
from mlxcore.models.model import from_config, hf_config, num_params
from mlxcore.train.step import make_step

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
import torch_llama  # noqa: E402

LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 1e-3, (0.9, 0.95), 0.01, 1.0
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 2e-2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=["tiny", "200mb", "custom"], default="tiny")
    shape = p.add_argument_group("model shape", "override the preset; all but --head-dim are required for custom")
    for flag, what in (("hidden", "hidden size"), ("layers", "layers"), ("heads", "attention heads"),
                       ("kv-heads", "key/value heads (GQA)"), ("head-dim", "default hidden/heads"),
                       ("intermediate", "SwiGLU inner width")):
        shape.add_argument(f"--{flag}", type=int, help=what)
    p.add_argument("--vocab", type=int, default=6400, help="vocabulary size (MiniMind's tokenizer: 6400)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(LOSS_RTOL), default="float32")
    p.add_argument("--steps", type=int, default=10, help="timed steps per framework")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--rounds", type=int, help="blocks the frameworks' timed steps alternate in (default: "
                   "--steps, i.e. one step of each in turn)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile for torch; auto: on for CUDA, on CPU time both and use the faster")
    p.add_argument("--peak-tflops", type=float, help="the device peak for MFU (default: a measured torch matmul "
                   "in the training dtype, the same denominator for both frameworks)")
    p.add_argument("--fused-optimizer", choices=["auto", "on", "off"], default="auto",
                   help="our clip + AdamW as a few ops over concatenated buffers (mlxcore.train.fused)")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def torch_matmul_peak(device: torch.device, dtype: str) -> float:
    """Best FLOP/s of a large torch matmul in `dtype` on `device` (the MFU denominator)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    best = float("inf")
    for i in range(12):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def model_config(args) -> ModelConfig:
    sizes = {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads,
             "num_kv_heads": args.kv_heads, "head_dim": args.head_dim, "intermediate_size": args.intermediate}
    try:
        return ModelConfig(preset=args.preset, dtype=args.dtype, **{k: v for k, v in sizes.items() if v is not None})
    except ValueError as e:  # pydantic's ValidationError: keep only its messages
        msgs = [err["msg"].removeprefix("Value error, ") for err in e.errors()] if hasattr(e, "errors") else [str(e)]
        raise SystemExit(f"train_vs_torch: bad model shape: {'; '.join(msgs)}") from None


def mlx_runner(model, batch, fused: str = "auto") -> dict:
    optimizer = optim.AdamW(LR, betas=list(BETAS), weight_decay=WEIGHT_DECAY)
    step, state = make_step(model, optimizer, grad_clip=GRAD_CLIP, compile=True, fused=fused)

    def once():
        loss, n, norm = step([batch])
        mx.eval(state, loss, n, norm)  # the step is done when weights and optimizer state are
        return loss, n

    return {"framework": "mlx fused step" if step.fused else "mlx", "once": once, "loss": lambda out: out[0].item() / max(out[1].item(), 1.0),
            "peak": mx.get_peak_memory}


def torch_runner(config, init_state, batch, device, compiled: bool) -> dict:
    model = torch_llama.Llama(config, device)  # a copy per mode: each starts from the same weights
    model.load_state_dict(init_state)
    step = torch_llama.make_train_step(
        model, torch_llama.make_optimizer(model, LR, BETAS, WEIGHT_DECAY), GRAD_CLIP, compile=compiled)
    cuda = device.type == "cuda"

    def once():
        loss, _ = step(*batch)
        if cuda:
            torch.cuda.synchronize()  # CUDA kernels are asynchronous: wait for the whole step
        return loss

    return {"framework": f"pytorch {'compiled' if compiled else 'eager'}", "once": once, "loss": float,
            # torch's CPU allocator keeps no count; on CUDA only one torch mode runs (see main)
            "peak": torch.cuda.max_memory_allocated if cuda else lambda: None}


def measure(runners: list[dict], warmup: int, steps: int, rounds: int) -> list[dict]:
    """Warm each runner up, then time `steps` synchronous steps of each, in interleaved rounds.

    Rounds spread each framework's timed steps over the whole run, so a change in the load of
    a shared machine falls on all of them alike rather than on whichever ran at that moment.
    """
    mx.reset_peak_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for r in runners:
        t0 = time.perf_counter()
        for _ in range(warmup):
            r["once"]()
        r["warmup_s"], r["times"] = time.perf_counter() - t0, []
    for i in range(rounds):
        for r in runners:
            for _ in range(steps // rounds + (i < steps % rounds)):
                t0 = time.perf_counter()
                out = r["once"]()
                r["times"].append(time.perf_counter() - t0)
                r["final_loss"] = r["loss"](out)  # read after the clock stops
    return [{"framework": r["framework"], "warmup_s": r["warmup_s"], "final_loss": r["final_loss"],
             "peak_mem_bytes": r["peak"](), "times": r["times"]} for r in runners]


def match_tf32(device: torch.device) -> str:
    """Give torch's float32 matmuls the precision MLX's CUDA backend uses; describe it."""
    if device.type != "cuda" or mx.default_device().type != mx.DeviceType.gpu:
        return "full fp32"
    # MLX's CUDA backend runs float32 matmuls in TF32 unless MLX_ENABLE_TF32=0; torch's default
    # is full fp32, which would time a different (slower) computation.
    tf32 = os.environ.get("MLX_ENABLE_TF32", "1") != "0"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return "TF32 on both (MLX_ENABLE_TF32 default)" if tf32 else "full fp32 (MLX_ENABLE_TF32=0)"


def check_same_loss(mlx_model, torch_model, batch_np, batch_t, dtype: str) -> dict:
    x, y, m = (mx.array(a) for a in batch_np)
    logits = mlx_model(x).astype(mx.float32)  # the masked mean CE of mlxcore's training loss
    ours = ((nn.losses.cross_entropy(logits, y, reduction="none") * m).sum() / m.sum()).item()
    with torch.no_grad():
        theirs = torch_llama.masked_mean_loss(torch_model, *batch_t).item()
    rel = abs(ours - theirs) / abs(ours)
    print(f"initial loss: mlx {ours:.6f}  pytorch {theirs:.6f}  (rel diff {rel:.1e}, limit {LOSS_RTOL[dtype]:.0e})")
    if not rel < LOSS_RTOL[dtype]:
        raise SystemExit("train_vs_torch: the two models disagree before training; not comparing speeds"
                         " (on CUDA, MLX_ENABLE_TF32=0 makes MLX's float32 matmuls exact)")
    return {"mlx": ours, "pytorch": theirs, "rel_diff": rel}


def print_table(rows: list[dict], chosen: str) -> None:
    print(f"\n{'framework':<20} {'step ms':>9} {'min ms':>9} {'tok/s':>9} {'MFU':>6} {'peak mem':>11} {'warmup s':>9} {'loss@end':>9}")
    for r in rows:
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f} MiB" if r["peak_mem_bytes"] else "n/a"
        mark = " *" if r["framework"] == chosen else ""
        print(f"{r['framework'] + mark:<20} {r['step_ms']:>9.1f} {min(r['step_times_ms']):>9.1f} "
              f"{r['tok_per_s']:>9.0f} {r['mfu']:>6.1%} {mem:>11} {r['warmup_s']:>9.1f} {r['final_loss']:>9.4f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.rounds = min(args.rounds or args.steps, args.steps)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise SystemExit("train_vs_torch: --steps and --rounds must be >= 1, --warmup >= 0")
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compile_modes = {"on": [True], "off": [False],
                     "auto": [True] if device.type == "cuda" else [False, True]}[args.compile]

    cfg = model_config(args)
    config = hf_config(cfg, args.vocab)
    mlx_model = from_config(config, seed=0)
    torch_model = torch_llama.Llama(config, device)
    torch_llama.load_from_mlx(torch_model, mlx_model)
    init_state = {k: v.detach().cpu().clone() for k, v in torch_model.state_dict().items()}

    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)
    batch_np = (rng.integers(0, args.vocab, (B, T)), rng.integers(0, args.vocab, (B, T)), np.ones((B, T), np.float32))
    batch_t = tuple(torch.from_numpy(a).to(device) for a in batch_np)

    torch_where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    load = "load avg %.1f %.1f %.1f" % os.getloadavg()
    print(f"mlx {mx.__version__} on {mx.default_device()} (CPU BLAS: {mlxcore.BLAS.name}) | "
          f"torch {torch.__version__} on {torch_where} | os.cpu_count() {cores} | {load}")
    print(f"model: {args.preset}: hidden {cfg.hidden_size}, layers {cfg.num_layers}, heads {cfg.num_heads} "
          f"({cfg.num_kv_heads} kv), head_dim {cfg.resolved_head_dim}, ffn {cfg.intermediate_size}, "
          f"vocab {args.vocab}, {num_params(mlx_model) / 1e6:.1f}M params, {args.dtype}")
    print(f"step: batch {B} x seq {T} = {B * T} tokens, AdamW(lr {LR}, betas {BETAS}, wd {WEIGHT_DECAY}), "
          f"clip {GRAD_CLIP}; {args.warmup} warmup + {args.steps} timed steps each "
          f"(in {args.rounds} interleaved rounds), median")
    initial = check_same_loss(mlx_model, torch_model, batch_np, batch_t, args.dtype)  # torch in full fp32
    del torch_model
    matmul = match_tf32(device) if args.dtype == "float32" else args.dtype
    print(f"matmul precision: {matmul}")

    runners = [mlx_runner(mlx_model, batch_np, args.fused_optimizer)]
    runners += [torch_runner(config, init_state, batch_t, device, compiled) for compiled in compile_modes]
    rows = measure(runners, args.warmup, args.steps, args.rounds)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else torch_matmul_peak(device, args.dtype)
    flops_per_token = stats.flops_per_token(config, T)["train"]
    for r in rows:
        r["step_times_ms"] = [t * 1e3 for t in r.pop("times")]
        r["step_ms"] = statistics.median(r["step_times_ms"])
        r["tok_per_s"] = B * T / (r["step_ms"] / 1e3)
        r["mfu"] = stats.mfu(r["tok_per_s"], flops_per_token, peak)
    print(f"MFU: {flops_per_token / 1e6:.1f} MFLOP/token (mlxcore.perf.stats: 6N + 12*L*T*heads*head_dim) over a peak of "
          f"{peak / 1e12:.1f} TFLOP/s ({'given' if args.peak_tflops else f'measured torch {args.dtype} matmul'})")
    fastest = max(rows[1:], key=lambda r: r["tok_per_s"])
    ratio = rows[0]["tok_per_s"] / fastest["tok_per_s"]
    # the fastest step is the one least disturbed by other load: a second opinion on a busy box
    ratio_min = min(fastest["step_times_ms"]) / min(rows[0]["step_times_ms"])

    print_table(rows, fastest["framework"] if len(rows) > 2 else "")
    why = ", the faster torch mode here" if len(rows) > 2 else ""
    print(f"\nratio ours/pytorch tok/s: {ratio:.2f}x  (mlx vs {fastest['framework']}{why}; "
          f"by fastest steps: {ratio_min:.2f}x)")
    print("load avg after: %.1f %.1f %.1f" % os.getloadavg())

    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "config": config, "params": num_params(mlx_model), "tokens_per_step": B * T,
              "mlx": {"version": mx.__version__, "device": str(mx.default_device()), "blas": mlxcore.BLAS.name},
              "torch": {"version": torch.__version__, "device": str(device), "threads": torch.get_num_threads()},
              "matmul_precision": matmul,
              "initial_loss": initial, "rows": rows, "peak_flops": peak, "flops_per_token": flops_per_token, "pytorch_row": fastest["framework"], "ratio": ratio,
              "ratio_fastest_steps": ratio_min}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
