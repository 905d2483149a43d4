"""Peak memory of one training step, per knob, against PyTorch's for the same model and batch.

    python bench/activation_memory.py --preset 200mb --dtype bfloat16 --batch 32 --seq 1024   # a GPU
    python bench/activation_memory.py --preset tiny --batch 8 --seq 256                      # this CPU

Each measurement runs in a fresh process (so one knob's cached kernels and buffers do not count
against the next): the step of bench/train_vs_torch.py (mlxcore's `make_step`, AdamW, clipping to
1.0, compiled) on a fixed random batch, two warm-up steps, then the peak over three more and their
median time. The knobs:

- `plain`: MLX's autodiff everywhere (`MLXFLOW_LEAN=off`), what mlx-lm's trainer keeps;
- `lean`: `mlxcore.kernels.lean_swiglu`'s backward (keeps gate and up only; `MLXFLOW_LEAN=on`,
  the default on the CPU only);
- `lean+ckpt1` / `lean+ckpt4`: also `train.grad_checkpoint` of every layer / every 4 layers.

Any knob takes suffixes that change what MLX's CUDA backend keeps in flight (each a `+`):
`mb<N>` sets `MLX_MAX_MB_PER_BUFFER=N` (how many MB of inputs one CUDA graph gathers before it is
launched; 1000 on an H100 by default), `ops<N>` sets `MLX_MAX_OPS_PER_BUFFER=N` (100 on an H100),
and `lim<G>` calls `mx.set_memory_limit(G GiB)` (an evaluation over the limit waits for launched
graphs to finish, which frees what they held). E.g. `plain+mb100`, `lean+lim16`.

Each is also run with half the layers, so the table shows the activations one layer keeps per
token (the difference, less the layer's weights, gradients and AdamW moments). PyTorch's row
(`bench/torch_llama.py`, `torch.compile`) comes from `torch.cuda.max_memory_allocated`: on the
CPU torch keeps no count, so only MLX's rows are printed there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KNOBS = {"plain": ({"MLXFLOW_LEAN": "off"}, 0), "lean": ({"MLXFLOW_LEAN": "on"}, 0),
         "lean+ckpt1": ({"MLXFLOW_LEAN": "on"}, 1), "lean+ckpt4": ({"MLXFLOW_LEAN": "on"}, 4)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--knobs", default="plain,lean,lean+ckpt1", help=f"comma-separated, of {', '.join(KNOBS)}")
    p.add_argument("--torch", choices=["auto", "on", "off"], default="auto", help="auto: on when CUDA is there")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child: "mlx:<knob>:<layers>" or "torch:<layers>"
    p.add_argument("--no-half", action="store_true", help="skip the half-depth runs (no per-layer figure)")
    args = p.parse_args(argv)
    bad = [k for k in args.knobs.split(",") if knob(k) is None]
    if bad:
        p.error(f"unknown knob(s) {bad}; choose from {list(KNOBS)}, each with optional +mb<N>, +ops<N>, +lim<GiB>")
    return args


def knob(name: str) -> tuple[dict, int, float] | None:
    """(environment, checkpoint interval, memory limit in GiB or 0) for a knob name, None if unknown."""
    parts = name.split("+")
    for cut in range(len(parts), 0, -1):  # the longest base name first: "lean+ckpt1+mb100"
        base = "+".join(parts[:cut])
        if base in KNOBS:
            break
    else:
        return None
    env, ckpt = dict(KNOBS[base][0]), KNOBS[base][1]
    limit = 0.0
    for suffix in parts[cut:]:
        m = re.fullmatch(r"(mb|ops|lim)(\d+(?:\.\d+)?)", suffix)
        if not m:
            return None
        if m[1] == "lim":
            limit = float(m[2])
        else:
            env["MLX_MAX_MB_PER_BUFFER" if m[1] == "mb" else "MLX_MAX_OPS_PER_BUFFER"] = str(int(float(m[2])))
    return env, ckpt, limit


def _config(args, layers: int | None) -> dict:
    from mlxcore.config import ModelConfig
    from mlxcore.models.model import hf_config

    cfg = ModelConfig(preset=args.preset, dtype=args.dtype, **({"num_layers": layers} if layers else {}))
    return hf_config(cfg, 6400)


def _batch(args):
    import numpy as np

    rng = np.random.default_rng(0)
    return (rng.integers(0, 6400, (args.batch, args.seq)), rng.integers(0, 6400, (args.batch, args.seq)),
            np.ones((args.batch, args.seq), np.float32))


def _time(once, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return times


def child_mlx(args, name: str, layers: int) -> dict:
    import mlxcore  # noqa: F401  (MKL before mlx.core)
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from mlxcore.models import remat
    from mlxcore.models.model import from_config
    from mlxcore.train.step import make_step

    _, ckpt, limit = knob(name)
    if limit:
        mx.set_memory_limit(int(limit * 2**30))
    model = from_config(_config(args, layers), seed=0)
    if ckpt:
        remat.checkpoint_layers(model, ckpt)
    step, state = make_step(model, optim.AdamW(1e-3, betas=[0.9, 0.95], weight_decay=0.01), grad_clip=1.0)
    batch = _batch(args)

    def once():
        loss, n, norm = step([batch])
        mx.eval(state, loss, n, norm)

    _time(once, 2)
    mx.reset_peak_memory()
    times = _time(once, args.steps)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    return {"peak": mx.get_peak_memory(), "step_ms": statistics.median(times) * 1e3, "params": n_params,
            "device": str(mx.default_device())}


def child_torch(args, layers: int) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import torch_llama

    device = torch.device("cuda")
    model = torch_llama.Llama(_config(args, layers), device)
    step = torch_llama.make_train_step(model, torch_llama.make_optimizer(model, 1e-3, (0.9, 0.95), 0.01), 1.0, compile=True)
    batch = tuple(torch.from_numpy(a).to(device) for a in _batch(args))

    def once():
        step(*batch)
        torch.cuda.synchronize()

    _time(once, 2)
    torch.cuda.reset_peak_memory_stats()
    times = _time(once, args.steps)
    return {"peak": torch.cuda.max_memory_allocated(), "step_ms": statistics.median(times) * 1e3,
            "params": sum(p.numel() for p in model.parameters()), "device": torch.cuda.get_device_name(device)}


def run_child(argv: list[str], one: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--one", one], env={**os.environ, **env},
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"activation_memory: {one} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.one:
        kind, *rest = args.one.split(":")
        print(json.dumps(child_mlx(args, rest[0], int(rest[1])) if kind == "mlx" else child_torch(args, int(rest[0]))))
        return {}
    layers = _config(args, None)["num_hidden_layers"]
    half = max(1, layers // 2)
    use_torch = args.torch == "on"
    if args.torch == "auto":
        try:
            import torch
            use_torch = torch.cuda.is_available()
        except ImportError:
            use_torch = False
    rows = []
    for name in (["pytorch compiled"] if use_torch else []) + args.knobs.split(","):
        one = (lambda n: f"torch:{n}") if name.startswith("pytorch") else (lambda n, k=name: f"mlx:{k}:{n}")
        env = {} if name.startswith("pytorch") else knob(name)[0]
        full = run_child(argv, one(layers), env)
        per_token = float("nan")
        if layers > half and not args.no_half:
            part = run_child(argv, one(half), env)
            per_layer_params = (full["params"] - part["params"]) / (layers - half)
            state_bytes = per_layer_params * 4 * (2 if args.dtype == "bfloat16" else 4)  # weight, grad, AdamW's 2 moments
            per_token = ((full["peak"] - part["peak"]) / (layers - half) - state_bytes) / (args.batch * args.seq)
        rows.append({"knob": name, "peak_bytes": full["peak"], "step_ms": full["step_ms"], "device": full["device"],
                     "activation_bytes_per_token_layer": per_token})
        print(f"{name:<18} peak {full['peak'] / 2**20:>9.0f} MiB  step {full['step_ms']:>8.1f} ms  "
              f"~{per_token / 1024:.1f} KiB of activations per token and layer", flush=True)
    ref = rows[0] if use_torch else None
    print(f"\n{args.preset} {args.dtype} B{args.batch}xT{args.seq}, {layers} layers ({half} for the per-layer figure), on {rows[-1]['device']}")
    print(f"{'knob':<18} {'peak MiB':>10} {'÷ torch':>8} {'step ms':>9} {'tok/s ÷ torch':>14} {'KiB/token/layer':>16}")
    for r in rows:
        mem = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x" if ref else "n/a"
        speed = f"{ref['step_ms'] / r['step_ms']:.2f}x" if ref else "n/a"
        print(f"{r['knob']:<18} {r['peak_bytes'] / 2**20:>10.0f} {mem:>8} {r['step_ms']:>9.1f} {speed:>14} "
              f"{r['activation_bytes_per_token_layer'] / 1024:>16.1f}")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "layers": layers, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
