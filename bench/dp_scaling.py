"""Data-parallel scaling of the training step: tok/s of W ranks vs W x the tok/s of one.

    # 2 GPUs of one host (nccl, one rank per GPU): the README's scaling table
    python bench/dp_scaling.py --backend nccl --ranks 1,2 --preset 200mb --dtype bfloat16 --batch 32 --seq 1024
    python bench/dp_scaling.py --backend nccl --ranks 1,2 --preset custom --hidden 1536 --layers 20 --heads 24 \\
        --kv-heads 4 --intermediate 4096 --dtype bfloat16 --batch 16 --seq 1024
    # on CPU (ring over loopback), e.g. to check the script
    python bench/dp_scaling.py --backend ring --ranks 1,2 --preset tiny --batch 4 --seq 128 --steps 3 --warmup 1

For each W in --ranks it starts W processes of this script (the environment `run_in_subprocess`
gives ranks: `mlxcore.train.distributed.local_ring` / `nccl_envs`), each timing the real
training step (`make_step` with the group: gradients all-reduced) on its own random batch of
--batch x --seq after --warmup untimed steps, like `mlxflow speed`. A step's time is the median
over --steps; global tok/s = W x batch x seq / that time (the all-reduce makes every rank wait
for the slowest). Efficiency = tok/s(W) / (W x tok/s(1)); 1.0 is perfect scaling. --json writes
the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def worker(args) -> None:
    import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
    import mlx.core as mx

    from mlxcore.models.model import num_params
    from mlxcore.perf.speed import SpeedConfig, _batch, _model
    from mlxcore.train import distributed, optimizers
    from mlxcore.train.losses import Loss
    from mlxcore.train.step import make_step

    world = int(os.environ.get("MLX_WORLD_SIZE", "1"))
    group = distributed.init(world)
    rank = group.rank() if group is not None else 0
    shapes = {k: v for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
              if (v := getattr(args, k)) is not None}
    cfg = SpeedConfig(preset=args.preset, model=shapes, dtype=args.dtype, batch_size=args.batch, seq_len=args.seq,
                      steps=args.steps, warmup=args.warmup, seed=rank)
    model, config = _model(cfg.model_copy(update={"seed": 0}))  # the same weights on every rank
    tcfg = cfg.train_config()
    step, state = make_step(model, optimizers.build(tcfg), tcfg.grad_clip, tcfg.compile, Loss(), group=group)
    batch = _batch(cfg, config["vocab_size"])  # each rank its own rows (seed = rank)
    mx.eval(model.parameters())
    for _ in range(args.warmup):
        mx.eval(state, step([batch]))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        mx.eval(state, step([batch]))
        times.append(time.perf_counter() - t0)
    if rank == 0:
        step_s = median(times)
        Path(args.out).write_text(json.dumps({
            "ranks": world, "backend": args.backend, "batch_per_rank": args.batch, "seq_len": args.seq,
            "dtype": args.dtype, "params": num_params(model), "step_ms": 1e3 * step_s,
            "tok_per_s": world * args.batch * args.seq / step_s,
            "device": str(mx.default_device())}))


def run(args, world: int, tmp: Path) -> dict:
    from mlxcore.train import distributed

    out = tmp / f"w{world}.json"
    if world == 1:
        envs = [{}]
    elif args.backend == "ring":
        envs = distributed.local_ring(world, tmp)
    else:
        envs = distributed.nccl_envs(world, "127.0.0.1", args.nccl_port, range(world))
    argv = [sys.executable, __file__, *sys.argv[1:], "--worker", "--out", str(out)]
    procs = [subprocess.Popen(argv, env={**os.environ, **env, "MLX_WORLD_SIZE": str(world),
                                         distributed.BACKEND_ENV: args.backend}) for env in envs]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{world} ranks: exit codes {codes}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=["ring", "nccl"], default="ring")
    p.add_argument("--ranks", default="1,2", help="comma list of world sizes; the first should be 1")
    p.add_argument("--preset", default="tiny", choices=["tiny", "200mb", "tiny-moe", "200mb-moe", "custom"])
    for flag, dest in (("hidden", "hidden_size"), ("layers", "num_layers"), ("heads", "num_heads"),
                       ("kv-heads", "num_kv_heads"), ("intermediate", "intermediate_size")):
        p.add_argument(f"--{flag}", dest=dest, type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=8, help="rows per rank")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--nccl-port", type=int, default=12345)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in map(int, args.ranks.split(",")):
            rows.append(run(args, world, Path(tmp)))
    base = next((r["tok_per_s"] for r in rows if r["ranks"] == 1), None)
    print(f"{'ranks':>5} {'step ms':>9} {'tok/s':>12} {'efficiency':>10}   ({rows[0]['params']:,} params, "
          f"{args.batch} x {args.seq} per rank, {args.dtype}, {rows[0]['device']}, {args.backend})")
    for r in rows:
        r["efficiency"] = r["tok_per_s"] / (r["ranks"] * base) if base else None
        eff = f"{r['efficiency']:.2f}" if base else "n/a"
        print(f"{r['ranks']:>5} {r['step_ms']:>9.1f} {r['tok_per_s']:>12,.0f} {eff:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
