"""Data parallelism with `mx.distributed`: one process per rank, gradients summed across ranks.

Each rank reads its own slice of every global batch (the loaders' `rank`/`world`), computes
gradients of its token-loss sum, and the step all-reduces the sums and the token counts before
dividing, so W ranks with batch B train exactly like one process with batch W*B (up to
float32 summation order). Only rank 0 writes checkpoints and reports progress; every rank
resumes from the same latest checkpoint.

Ranks are started either by `mlx.launch` (any backend it supports):

    mlx.launch -n 2 --backend ring -m mlxcore.train.launch runs/x/job.json

or by `launch.run_in_subprocess` (what the pretrain/sft tasks do). With no
`train.distributed.hosts` it speaks the ring backend's protocol on one machine: `MLX_RANK` per
process and `MLX_HOSTFILE`, a JSON list of one `["127.0.0.1:<port>"]` per rank, on free
loopback ports. With hosts (an `mlx.launch` hostfile) it follows mlx.launch's conventions:

  ring   one list of `ip:port` per rank (every address of its host, ports from `starting_port`,
         +1 per rank and address) in `<job dir>/ring_hosts.json`, `MLX_RANK`
  nccl   `MLX_RANK`, `MLX_WORLD_SIZE`, `NCCL_HOST_IP` (the first host's first address),
         `NCCL_PORT`, `CUDA_VISIBLE_DEVICES` = the rank's index on its host
  jaccl  `MLX_RANK`, `MLX_JACCL_COORDINATOR` (first address : `starting_port`), `MLX_IBV_DEVICES`
  mpi    one `mpirun --hostfile` (lines `host slots=N`) that starts every rank

and starts each rank through `exec_prefix` (by default `ssh -o BatchMode=yes {ssh}`) with a
small `sh` script (`rank_script`): cd to the launcher's working dir, check that the job dir is
the one the launcher wrote (`.launch-id`: the job dir must be on a filesystem every host
shares), export the environment, run `python -m mlxcore.train.launch JOB.json` and exit with its
status (128+N when a signal N killed it, so a SIGKILL reads the same through ssh).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import socket
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx


BACKEND_ENV = "MLXFLOW_DIST_BACKEND"  # set by run_in_subprocess; mlx.launch'd ranks try every backend
MPI_RANK_ENVS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def env_rank() -> int:
    for name in ("MLX_RANK", *MPI_RANK_ENVS):
        if os.environ.get(name):
            return int(os.environ[name])
    return 0


def init(world_size: int):
    """The global group when `world_size > 1` (checked against what the launcher started), else None."""
    if world_size <= 1:
        return None
    if not any(name in os.environ for name in ("MLX_RANK", *MPI_RANK_ENVS)):
        raise ValueError(f"world_size={world_size} needs one process per rank: start them with "
                         f"`mlx.launch -n {world_size} -m mlxcore.train.launch JOB.json` or through the pretrain/sft tasks")
    group = mx.distributed.init(strict=True, backend=os.environ.get(BACKEND_ENV) or "any")
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


# --------------------------------------------------------------------------- ranks on other hosts

SETUP_FAILED = 3  # a rank's script exits with this when its host cannot run the job (cwd, job dir not shared)
SSH_PREFIX = "ssh -o BatchMode=yes {ssh}"
LOCAL_HOSTS = ("127.0.0.1", "localhost")  # as mlx.launch: with no exec_prefix, started here without ssh


@dataclass
class RankCommand:
    """How one process of a job starts: `argv` (with `env` on top of ours); `remote`: through a prefix /
    ssh / mpirun, so it gets the lifeline on stdin and rank 0 sends its events on stdout."""

    rank: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    remote: bool = False
    host: str = "127.0.0.1"


@dataclass
class Hosts:
    hosts: list  # HostConfig, one per host entry (mlx.launch: one per rank)
    envs: list[str] = field(default_factory=list)
    backend: str = ""


def load_hosts(spec, where: str = "train.distributed.hosts") -> Hosts:
    """`hosts` of the config: a hostfile path (mlx.launch's JSON, a list or {hosts, envs, backend}) or a list."""
    from mlxcore.config import HostConfig

    if not isinstance(spec, str):
        return Hosts(list(spec))
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"{where}: hostfile {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    envs, backend = [], ""
    if isinstance(data, dict):
        envs, backend, data = data.get("envs", []), data.get("backend", ""), data.get("hosts")
    try:
        hosts = TypeAdapter(list[HostConfig]).validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise ValueError(f"{path}: hosts[{']['.join(map(str, first['loc']))}]: {first['msg']} "
                         "(expected a list of {\"ssh\": NAME, \"ips\": [ADDRESS, ...]})") from None
    if not hosts:
        raise ValueError(f"{path}: no hosts")
    bad = [e for e in envs if "=" not in e or not e.split("=", 1)[0].isidentifier()]
    if bad:
        raise ValueError(f"{path}: envs: {bad[0]!r} is not NAME=VALUE")
    return Hosts(hosts, list(envs), backend)


def _expand(hosts: Hosts, ranks_per_host: int) -> list[tuple[object, int]]:
    """(host, local rank) per rank: each entry `ranks_per_host` times; a name listed twice counts on."""
    seen: Counter = Counter()
    out = []
    for h in hosts.hosts:
        for _ in range(ranks_per_host):
            out.append((h, seen[h.ssh]))
            seen[h.ssh] += 1
    return out


def ring_hostfile(ranks: list[tuple[object, int]], starting_port: int) -> list[list[str]]:
    """mlx.launch's ring hostfile: per rank, every address of its host, ports +1 per rank and address."""
    port, out = starting_port, []
    for h, _ in ranks:
        if not h.ips:
            raise ValueError(f"train.distributed.hosts: host {h.ssh!r} has no ips; the ring backend needs the "
                             "addresses the ranks listen on (mlx.distributed_config writes them)")
        out.append([f"{ip}:{port + i}" for i, ip in enumerate(h.ips)])
        port += len(h.ips)
    return out


def rank_script(*, cwd: str, job_path: str, token: str, host: str, env: dict[str, str], python: str,
                ranks_on_host: int, threads: int, stdout_to_stderr: bool) -> str:
    """The `sh` script that runs one rank on its host (see the module doc)."""
    q = shlex.quote
    launch_id = str(Path(job_path).parent / ".launch-id")
    no_cwd = (f"mlxflow: {host}: cannot cd to {cwd} (the launcher runs from it; relative paths of the job "
              "resolve from it): every host needs it at the same path")
    not_shared = (f"mlxflow: {host}: {launch_id} is missing or stale: the job dir must be on a filesystem every "
                  "host shares (NFS, ...) at the same path")
    lines = [
        f"cd {q(cwd)} 2>/dev/null || {{ echo {q(no_cwd)} >&2; exit {SETUP_FAILED}; }}",
        f"[ \"$(cat {q(launch_id)} 2>/dev/null)\" = {q(token)} ] || {{ echo {q(not_shared)} >&2; exit {SETUP_FAILED}; }}",
    ]
    if threads:
        lines.append(f"t={threads}")
    else:  # the host's cores, shared by its ranks (getconf works on Linux and macOS)
        lines.append(f"t=$(( $(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1) / {ranks_on_host} )); [ \"$t\" -ge 1 ] || t=1")
    env = {**env, "OMP_NUM_THREADS": "$t", "MKL_NUM_THREADS": "$t", "OPENBLAS_NUM_THREADS": "$t"}
    lines.append("export " + " ".join(f"{k}=\"$t\"" if v == "$t" else f"{k}={q(v)}" for k, v in env.items()))
    if stdout_to_stderr:
        lines.append("exec 1>&2")
    lines.append(f"{q(python)} -m mlxcore.train.launch {q(job_path)}")
    lines.append("exit $?")  # not exec: a signal's 128+N reaches the launcher through ssh too
    return "\n".join(lines)


def wrap(prefix: str, script: str, *, ssh: str, ip: str, rank: int, local_rank: int) -> list[str]:
    """argv that runs `script` through `prefix` (ssh: one quoted string for the remote shell)."""
    if not prefix and ssh in LOCAL_HOSTS:
        return ["sh", "-c", script]
    argv = shlex.split((prefix or SSH_PREFIX).format(ssh=ssh, ip=ip, rank=rank, local_rank=local_rank))
    if Path(argv[0]).name == "ssh":
        return [*argv, shlex.join(["sh", "-c", script])]
    return [*argv, "sh", "-c", script]


def plan(job_path: str | Path, world: int, dist, out: str | Path) -> list[RankCommand]:
    """The processes that run `job_path` on `world` ranks placed by `dist` (a DistributedConfig).

    No hosts: today's local ranks (ring on loopback, nccl one per GPU, mpi through mpirun -np).
    With hosts: one `sh` script per rank through `exec_prefix` / ssh (mpi: one mpirun). Writes the
    hostfiles and `.launch-id` into `out`, the job dir.
    """
    out, job_path = Path(out).resolve(), str(Path(job_path).resolve())
    backend = dist.backend
    local = [sys.executable, "-m", "mlxcore.train.launch", job_path]
    if dist.backend == "mpi":
        return [mpi_command(job_path, world, dist, out)]
    if not dist.hosts:
        if world <= 1:
            return [RankCommand(0, local)]
        if backend == "ring":
            return [RankCommand(r, local, env) for r, env in enumerate(local_ring(world, out))]
        if backend == "nccl":
            return [RankCommand(r, local, {**env, "CUDA_VISIBLE_DEVICES": str(r)})
                    for r, env in enumerate(nccl_envs(world, "127.0.0.1", dist.nccl_port, local_ranks=range(world)))]
        raise ValueError(f"train.distributed.backend={backend} needs train.distributed.hosts (with their RDMA devices)")
    hosts = load_hosts(dist.hosts)
    ranks = _expand(hosts, dist.ranks_per_host)
    if len(ranks) != world:
        raise ValueError(f"train.world_size={world} but train.distributed.hosts lists {len(hosts.hosts)} host(s) x "
                         f"ranks_per_host={dist.ranks_per_host} = {len(ranks)} ranks: make them agree")
    base = {"PYTHONUNBUFFERED": "1", BACKEND_ENV: backend, "MLX_WORLD_SIZE": str(world), "MLXFLOW_LIFELINE": "stdin"}
    base.update(e.split("=", 1) for e in hosts.envs)
    if backend == "ring":
        ring = out / "ring_hosts.json"
        _write(ring, json.dumps(ring_hostfile(ranks, dist.starting_port)))
        envs = [{**base, "MLX_HOSTFILE": str(ring)} for _ in ranks]
    elif backend == "nccl":
        first = hosts.hosts[0]
        if not first.ips:
            raise ValueError(f"train.distributed.hosts: the first host ({first.ssh}) needs an ip every rank reaches (nccl's coordinator)")
        envs = [{**base, **env, "CUDA_VISIBLE_DEVICES": str(lr)}
                for env, (_, lr) in zip(nccl_envs(world, first.ips[0], dist.nccl_port, [lr for _, lr in ranks]), ranks)]
    else:  # jaccl: one rank per host, RDMA devices from the hostfile (as mlx.launch checks them)
        envs = [{**base, **env} for env in jaccl_envs(ranks, dist.starting_port, out)]
    token = secrets.token_hex(8)
    _write(out / ".launch-id", token)
    per_host = Counter(h.ssh for h, _ in ranks)
    cmds = []
    for r, ((h, lr), env) in enumerate(zip(ranks, envs)):
        env = {**env, "MLX_RANK": str(r), **({"MLXFLOW_EVENTS_FD": "stdout"} if r == 0 else {})}
        script = rank_script(cwd=os.getcwd(), job_path=job_path, token=token, host=h.ssh, env=env,
                             python=dist.python or sys.executable, ranks_on_host=per_host[h.ssh],
                             threads=dist.threads_per_rank, stdout_to_stderr=r != 0)
        argv = wrap(dist.exec_prefix, script, ssh=h.ssh, ip=h.ips[0] if h.ips else "", rank=r, local_rank=lr)
        cmds.append(RankCommand(r, argv, {}, remote=True, host=h.ssh))
    return cmds


def nccl_envs(world: int, host_ip: str, port: int, local_ranks) -> list[dict[str, str]]:
    return [{"MLX_RANK": str(r), "MLX_WORLD_SIZE": str(world), "NCCL_HOST_IP": host_ip, "NCCL_PORT": str(port),
             BACKEND_ENV: "nccl", "CUDA_VISIBLE_DEVICES": str(lr)} for r, lr in enumerate(local_ranks)]


def jaccl_envs(ranks, port: int, out: Path) -> list[dict[str, str]]:
    hosts = [h for h, _ in ranks]
    n = len(hosts)
    if any(lr for _, lr in ranks):
        raise ValueError("train.distributed: jaccl runs one rank per host (ranks_per_host: 1, each host listed once)")
    if not hosts[0].ips:
        raise ValueError(f"train.distributed.hosts: the first host ({hosts[0].ssh}) needs an ip (jaccl's coordinator)")
    for i, h in enumerate(hosts):
        if len(h.rdma) != n or h.rdma[i] is not None or any(d is None for j, d in enumerate(h.rdma) if j != i):
            raise ValueError(f"train.distributed.hosts: host {h.ssh!r} needs rdma: one device per host, null for itself "
                             f"({n} entries; mlx.distributed_config writes them)")
    devices = out / "ibv_devices.json"
    _write(devices, json.dumps([h.rdma for h in hosts]))
    return [{"MLX_JACCL_COORDINATOR": f"{hosts[0].ips[0]}:{port}", "MLX_IBV_DEVICES": str(devices)} for _ in hosts]


def mpi_command(job_path: str, world: int, dist, out: Path) -> RankCommand:
    """One `mpirun` for every rank: `host slots=N` lines, -x for the environment, rank 0's stdout = events."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise ValueError("train.distributed.backend=mpi needs `mpirun` on PATH (Open MPI: apt install openmpi-bin, "
                         "brew install open-mpi); or use backend: ring, which needs nothing")
    env = {"PYTHONUNBUFFERED": "1", BACKEND_ENV: "mpi", "MLXFLOW_EVENTS_FD": "stdout", "MLX_WORLD_SIZE": str(world),
           "MLXFLOW_LIFELINE": "stdin"}
    where: list[str] = ["-np", str(world)]
    if dist.hosts:
        hosts = load_hosts(dist.hosts)
        slots = Counter()
        for h, _ in _expand(hosts, dist.ranks_per_host):
            slots[h.ssh] += 1
        if sum(slots.values()) != world:
            raise ValueError(f"train.world_size={world} but train.distributed.hosts x ranks_per_host = {sum(slots.values())} ranks")
        _write(out / "mpi_hosts.txt", "".join(f"{h} slots={n}\n" for h, n in slots.items()))
        where += ["--hostfile", str(out / "mpi_hosts.txt")]
        env.update(e.split("=", 1) for e in hosts.envs)
    if dist.threads_per_rank:
        env.update(OMP_NUM_THREADS=str(dist.threads_per_rank), MKL_NUM_THREADS=str(dist.threads_per_rank))
    argv = [mpirun, *where, "-wdir", os.getcwd(), *[a for k, v in env.items() for a in ("-x", f"{k}={v}")],
            "--", dist.python or sys.executable, "-m", "mlxcore.train.launch", job_path]
    return RankCommand(0, argv, {}, remote=True, host="mpirun")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)
