"""Data parallelism with `mx.distributed`: one process per rank, gradients summed across ranks.

Each rank reads its own slice of every global batch (the loaders' `rank`/`world`), computes
gradients of its token-loss sum, and the step all-reduces the sums and the token counts before
dividing, so W ranks with batch B train exactly like one process with batch W*B (up to
float32 summation order). Only rank 0 writes checkpoints and reports progress; every rank
resumes from the same latest checkpoint.

Ranks are started either by `mlx.launch` (any backend it supports):

    mlx.launch -n 2 --backend ring -m mlxcore.train.launch runs/x/job.json

or by `launch.run_in_subprocess` (what the pretrain/sft tasks do), which speaks the ring
backend's protocol on one machine: `MLX_RANK` per process and `MLX_HOSTFILE`, a JSON list of
one `["127.0.0.1:<port>"]` per rank, on free loopback ports.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx


def env_rank() -> int:
    return int(os.environ.get("MLX_RANK", "0") or 0)


def init(world_size: int):
    """The global group when `world_size > 1` (checked against what the launcher started), else None."""
    if world_size <= 1:
        return None
    if "MLX_RANK" not in os.environ:
        raise ValueError(f"world_size={world_size} needs one process per rank: start them with "
                         f"`mlx.launch -n {world_size} -m mlxcore.train.launch JOB.json` or through the pretrain/sft tasks")
    group = mx.distributed.init(strict=True)
    if group.size() != world_size:
        raise ValueError(f"world_size={world_size} but {group.size()} ranks were launched")
    return group


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def local_ring(world_size: int, directory: str | Path) -> list[dict[str, str]]:
    """Environment for each of `world_size` local ranks of the ring backend (hostfile written to `directory`)."""
    hostfile = Path(directory) / "ring_hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(world_size)]))
    # Ranks share the cores: give each its part so BLAS threads do not oversubscribe them.
    threads = str(max(1, (os.cpu_count() or 1) // world_size))
    return [{"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile), "MLX_WORLD_SIZE": str(world_size),
             "MKL_NUM_THREADS": threads, "OMP_NUM_THREADS": threads} for r in range(world_size)]
