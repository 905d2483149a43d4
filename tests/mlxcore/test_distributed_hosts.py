"""How ranks on other hosts are started (mlxcore.train.distributed.plan): hostfiles, environments and
commands per backend, following mlx.launch's conventions. The ring path runs for real in
tests/flows/test_multihost.py (network namespaces); nccl, jaccl and mpi cannot run here (no GPU,
no RDMA, no mpirun), so for them only the construction is checked."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

from mlxcore.config import ConfigError, DistributedConfig, PipelineConfig, load_config
from mlxcore.train import distributed


def _hostfile(tmp_path, hosts, name="hosts.json"):
    path = tmp_path / name
    path.write_text(json.dumps(hosts))
    return str(path)


def _script(cmd):  # the sh script a RankCommand runs (its last argument, or the ssh string's)
    last = cmd.argv[-1]
    return shlex.split(last)[-1] if cmd.argv[0] == "ssh" else last


def test_ring_over_ssh_follows_mlx_launch(tmp_path):
    hosts = _hostfile(tmp_path, [{"ssh": "m1", "ips": ["10.0.0.1", "10.0.1.1"]}, {"ssh": "m2", "ips": ["10.0.0.2"]}])
    dist = DistributedConfig(hosts=hosts, ranks_per_host=2)
    cmds = distributed.plan(tmp_path / "job.json", 4, dist, tmp_path)
    # per rank: every address of its host; ports from 32323, +1 per rank and address
    assert json.loads((tmp_path / "ring_hosts.json").read_text()) == [
        ["10.0.0.1:32323", "10.0.1.1:32324"], ["10.0.0.1:32325", "10.0.1.1:32326"],
        ["10.0.0.2:32327"], ["10.0.0.2:32328"]]
    assert [c.argv[:4] for c in cmds] == [["ssh", "-o", "BatchMode=yes", h] for h in ("m1", "m1", "m2", "m2")]
    assert all(c.remote for c in cmds)
    token = (tmp_path / ".launch-id").read_text()
    for r, c in enumerate(cmds):
        assert shlex.split(c.argv[-1])[:2] == ["sh", "-c"]  # ssh gets one string: sh -c 'SCRIPT'
        script = _script(c)
        assert f"MLX_RANK={r}" in script and f"MLX_HOSTFILE={tmp_path / 'ring_hosts.json'}" in script
        assert "MLXFLOW_DIST_BACKEND=ring" in script and "MLX_WORLD_SIZE=4" in script and token in script
        assert f"cd {os.getcwd()}" in script and f"{sys.executable} -m mlxcore.train.launch {tmp_path / 'job.json'}" in script
        assert "/ 2 ))" in script  # BLAS threads: the host's cores / its 2 ranks
        assert ("MLXFLOW_EVENTS_FD=stdout" in script) == (r == 0)  # rank 0's events on its stdout
        assert ("exec 1>&2" in script) == (r != 0)


def test_a_prefix_gets_the_script_as_arguments_and_its_fields_filled(tmp_path):
    hosts = [{"ssh": "nsA", "ips": ["10.77.0.1"]}, {"ssh": "nsB", "ips": ["10.77.0.2"]}]
    dist = DistributedConfig(hosts=hosts, exec_prefix="ip netns exec {ssh} env R={rank} L={local_rank} A={ip}",
                             threads_per_rank=3, starting_port=4000)
    cmds = distributed.plan(tmp_path / "job.json", 2, dist, tmp_path)
    assert [c.argv[:8] for c in cmds] == [["ip", "netns", "exec", "nsA", "env", "R=0", "L=0", "A=10.77.0.1"],
                                         ["ip", "netns", "exec", "nsB", "env", "R=1", "L=0", "A=10.77.0.2"]]
    assert [c.argv[8:10] for c in cmds] == [["sh", "-c"]] * 2
    assert "t=3" in cmds[0].argv[-1]
    assert json.loads((tmp_path / "ring_hosts.json").read_text()) == [["10.77.0.1:4000"], ["10.77.0.2:4001"]]


def test_the_rank_script_refuses_a_job_dir_its_host_does_not_share(tmp_path):
    """Run for real on this machine (host 127.0.0.1: no ssh): a stale .launch-id reads as not shared."""
    dist = DistributedConfig(hosts=[{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}])
    cmd, = distributed.plan(tmp_path / "job.json", 1, dist, tmp_path)
    assert cmd.argv[:2] == ["sh", "-c"]
    (tmp_path / ".launch-id").write_text("another launch")
    r = subprocess.run(cmd.argv, capture_output=True, text=True)
    assert r.returncode == distributed.SETUP_FAILED
    assert "the job dir must be on a filesystem every host shares" in r.stderr and "127.0.0.1" in r.stderr


def test_a_killed_rank_reports_its_signal_through_the_script(tmp_path):
    """The script does not exec its python: a SIGKILL comes back as 137 (through ssh as well), read as -9."""
    killer = tmp_path / "python"  # stands in for a python that the OOM killer takes
    killer.write_text("#!/bin/sh\nkill -9 $$\n")
    killer.chmod(stat.S_IRWXU)
    (tmp_path / ".launch-id").write_text("t")
    script = distributed.rank_script(cwd=str(tmp_path), job_path=str(tmp_path / "job.json"), token="t", host="h",
                                     env={}, python=str(killer), ranks_on_host=1, threads=1, stdout_to_stderr=False)
    assert subprocess.run(["sh", "-c", script]).returncode == 128 + 9
    from mlxcore.train.launch import _signal_of
    assert _signal_of(137, remote=True) == -9 and _signal_of(1, remote=True) == 1 and _signal_of(137, remote=False) == 137


def test_nccl_one_rank_per_gpu_as_mlx_launch_sets_it(tmp_path):
    """Not run on a GPU here (none was lent): the environment of each rank only."""
    local = distributed.plan(tmp_path / "job.json", 2, DistributedConfig(backend="nccl"), tmp_path)
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in local] == ["0", "1"]
    assert [c.env["MLX_RANK"] for c in local] == ["0", "1"]
    assert {c.env["NCCL_HOST_IP"] for c in local} == {"127.0.0.1"} and {c.env["NCCL_PORT"] for c in local} == {"12345"}
    assert all(c.env["MLX_WORLD_SIZE"] == "2" and c.env["MLXFLOW_DIST_BACKEND"] == "nccl" and not c.remote for c in local)
    hosts = [{"ssh": "g1", "ips": ["10.1.0.1"]}, {"ssh": "g2", "ips": ["10.1.0.2"]}]
    cmds = distributed.plan(tmp_path / "job.json", 4, DistributedConfig(backend="nccl", hosts=hosts, ranks_per_host=2,
                                                                        nccl_port=2222), tmp_path)
    scripts = [_script(c) for c in cmds]
    assert [next(w for w in s.split() if w.startswith("CUDA_VISIBLE_DEVICES=")) for s in scripts] == \
        [f"CUDA_VISIBLE_DEVICES={g}" for g in (0, 1, 0, 1)]
    assert all("NCCL_HOST_IP=10.1.0.1" in s and "NCCL_PORT=2222" in s and "MLXFLOW_DIST_BACKEND=nccl" in s for s in scripts)
    assert [c.argv[3] for c in cmds] == ["g1", "g1", "g2", "g2"]


def test_jaccl_needs_rdma_devices_and_gets_a_coordinator(tmp_path):
    hosts = [{"ssh": "m1", "ips": ["10.0.0.1"], "rdma": [None, "rdma_en2"]},
             {"ssh": "m2", "ips": ["10.0.0.2"], "rdma": ["rdma_en2", None]}]
    cmds = distributed.plan(tmp_path / "job.json", 2, DistributedConfig(backend="jaccl", hosts=hosts), tmp_path)
    assert all("MLX_JACCL_COORDINATOR=10.0.0.1:32323" in _script(c) for c in cmds)
    assert json.loads((tmp_path / "ibv_devices.json").read_text()) == [[None, "rdma_en2"], ["rdma_en2", None]]
    hosts[1]["rdma"] = ["rdma_en2"]
    with pytest.raises(ValueError, match="host 'm2' needs rdma"):
        distributed.plan(tmp_path / "job.json", 2, DistributedConfig(backend="jaccl", hosts=hosts), tmp_path)


def test_mpi_starts_every_rank_through_one_mpirun(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(ValueError, match="needs `mpirun` on PATH"):
        distributed.plan(tmp_path / "job.json", 2, DistributedConfig(backend="mpi"), tmp_path)
    # a stand-in mpirun, only so that it is found: the command is checked, never run (no MPI here)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/mpirun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin/mpirun").chmod(stat.S_IRWXU)
    hosts = _hostfile(tmp_path, [{"ssh": "m1", "ips": []}, {"ssh": "m2", "ips": []}])
    cmd, = distributed.plan(tmp_path / "job.json", 4, DistributedConfig(backend="mpi", hosts=hosts, ranks_per_host=2),
                            tmp_path)
    assert (tmp_path / "mpi_hosts.txt").read_text() == "m1 slots=2\nm2 slots=2\n"
    a = cmd.argv
    assert a[0] == str(tmp_path / "bin/mpirun") and a[a.index("--hostfile") + 1] == str(tmp_path / "mpi_hosts.txt")
    assert a[a.index("-np") + 1] == "4" and a[a.index("--") + 1:] == [
        sys.executable, "-m", "mlxcore.train.launch", str(tmp_path / "job.json")]
    assert "MLXFLOW_DIST_BACKEND=mpi" in a and "MLXFLOW_EVENTS_FD=stdout" in a and cmd.remote


def test_bad_hosts_are_clear_errors(tmp_path):
    job = tmp_path / "job.json"
    with pytest.raises(ValueError, match="hostfile .*nope.json does not exist"):
        distributed.plan(job, 2, DistributedConfig(hosts=str(tmp_path / "nope.json")), tmp_path)
    (tmp_path / "bad.json").write_text('[{"ssh": "a",\n "ips": [}]')
    with pytest.raises(ValueError, match=r"bad.json:2: not JSON"):
        distributed.plan(job, 2, DistributedConfig(hosts=str(tmp_path / "bad.json")), tmp_path)
    with pytest.raises(ValueError, match=r"hosts\[1\]\[ssh\]"):
        distributed.plan(job, 2, DistributedConfig(hosts=_hostfile(tmp_path, [{"ssh": "a"}, {"ips": []}])), tmp_path)
    with pytest.raises(ValueError, match="world_size=3 but .* 2 host\\(s\\) x ranks_per_host=1 = 2 ranks"):
        distributed.plan(job, 3, DistributedConfig(hosts=[{"ssh": "a", "ips": ["1.2.3.4"]}, {"ssh": "b", "ips": ["1.2.3.5"]}]),
                         tmp_path)
    with pytest.raises(ValueError, match="host 'b' has no ips"):
        distributed.plan(job, 2, DistributedConfig(hosts=[{"ssh": "a", "ips": ["1.2.3.4"]}, {"ssh": "b"}]), tmp_path)
    assert not (tmp_path / "ring_hosts.json").exists()


def test_mlx_distributed_config_hostfile_with_envs_and_backend(tmp_path):
    """The dict form mlx.launch reads ({backend, envs, hosts}); its envs reach every rank."""
    path = _hostfile(tmp_path, {"backend": "ring", "envs": ["MLX_METAL_FAST_SYNCH=1"],
                                "hosts": [{"ssh": "a", "ips": ["10.0.0.1"], "rdma": []}, {"ssh": "b", "ips": ["10.0.0.2"]}]})
    cmds = distributed.plan(tmp_path / "job.json", 2, DistributedConfig(hosts=path), tmp_path)
    assert all("MLX_METAL_FAST_SYNCH=1" in _script(c) for c in cmds)


def test_the_config_key_resolves_from_yaml_and_set(tmp_path):
    cfg = load_config(None, ["pretrain.world_size=2", "pretrain.distributed.hosts=hosts.json",
                             "pretrain.distributed.exec_prefix=ip netns exec {ssh}"], cls=PipelineConfig)
    assert cfg.pretrain.distributed.hosts == "hosts.json" and cfg.pretrain.distributed.backend == "ring"
    assert cfg.sft.distributed.hosts == []  # one stage's placement only
    with pytest.raises(ConfigError, match="exec_prefix"):
        load_config(None, ["sft.distributed.exec_prefix=ssh {host}"], cls=PipelineConfig)
    with pytest.raises(ConfigError, match="backend"):
        load_config(None, ["sft.distributed.backend=gloo"], cls=PipelineConfig)


def test_closing_a_remote_ranks_stdin_stops_it():
    """The lifeline: a rank whose stdin closes (launcher stopped the job, died, or lost ssh) gets SIGTERM,
    even while its main thread is busy; a rank that ends by itself leaves no watcher behind."""
    code = ("import sys, time; from mlxcore.train.launch import _lifeline; _lifeline(); print('ready', flush=True); "
            "time.sleep(120 if sys.argv[1] == 'wait' else 0)")
    busy = subprocess.Popen([sys.executable, "-c", code, "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert busy.stdout.readline() == "ready\n"
    busy.stdin.close()
    assert busy.wait(timeout=30) == -15
    done = subprocess.Popen([sys.executable, "-c", code, "end"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert done.wait(timeout=60) == 0
    # its watcher (`python -c ... <pid>`) was killed at exit (atexit), not left waiting on the still-open stdin
    assert [pid for pid, argv in _processes() if argv[-1:] == [str(done.pid)] and "parent = int" in " ".join(argv)] == []
    done.stdin.close()


def _processes():
    for d in os.listdir("/proc"):
        try:
            yield int(d), open(f"/proc/{d}/cmdline", "rb").read().decode(errors="replace").split("\0")[:-1]
        except (ValueError, OSError):
            continue
