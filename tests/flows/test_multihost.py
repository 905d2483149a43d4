"""Data parallel across "hosts": two Linux network namespaces joined by a veth pair stand in for two
machines. Each rank starts through `exec_prefix: ip netns exec {ssh}` (the code path of ssh: a
`sh` script per rank, events on rank 0's stdout, stdin as the lifeline) and the ring backend
talks over the veth addresses, so nothing crosses the namespaces but their own link.

Needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest

from mlxcore.config import DistributedConfig
from mlxcore.models import checkpoint
from mlxcore.train.callbacks import TrainingCallback
from mlxcore.train.launch import TrainingCrashed, run_in_subprocess
from mlxcore.train.loop import TrainJob

from tests.conftest import micro_model, quick_train

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not mx.distributed.is_available(), reason="mlx built without distributed")]

ADDRESSES = ("10.77.0.1", "10.77.0.2")  # only inside the namespaces created here


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    """Two namespaces `<tag>a` / `<tag>b` linked by a veth pair; yields a hostfile naming them."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` (iproute2) to create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    tag = f"mf{os.getpid() % 100000}{uuid.uuid4().hex[:3]}"  # interface names: at most 15 characters
    names = [f"{tag}a", f"{tag}b"]
    created = []

    def cleanup():
        for ns in created:
            _ip("netns", "del", ns)  # deleting a namespace deletes its end of the veth, and so the pair

    try:
        for ns in names:
            r = _ip("netns", "add", ns)
            if r.returncode:
                pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
            created.append(ns)
        steps = [("link", "add", f"{tag}x", "type", "veth", "peer", "name", f"{tag}y")]
        for ns, dev, addr in zip(names, (f"{tag}x", f"{tag}y"), ADDRESSES):
            steps += [("link", "set", dev, "netns", ns), ("-n", ns, "addr", "add", f"{addr}/24", "dev", dev),
                      ("-n", ns, "link", "set", dev, "up"), ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            r = _ip(*step)
            if r.returncode:
                pytest.skip(f"cannot set up the namespaces' link (`ip {' '.join(step)}`): {r.stderr.strip()}")
        r = subprocess.run(["ip", "netns", "exec", names[0], "true"], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"`ip netns exec` is denied here: {r.stderr.strip()}")
        hostfile = tmp_path_factory.mktemp("hosts") / "hosts.json"
        hostfile.write_text(json.dumps([{"ssh": ns, "ips": [addr]} for ns, addr in zip(names, ADDRESSES)]))
        yield hostfile
    finally:
        cleanup()


def _job(data, out, hostfile=None, **overrides):
    dist = DistributedConfig(hosts=str(hostfile), exec_prefix="ip netns exec {ssh}", threads_per_rank=1) \
        if hostfile else DistributedConfig()
    # compile off: these runs are too short to win back mx.compile's tracing
    cfg = dict(steps=10, eval_every=10, save_every=5, log_every=5, eval_batches=2, compile=False, distributed=dist)
    return TrainJob(data_dir=str(data["pretrain"]), tokenizer_dir=str(data["tok"]), out_dir=str(out),
                    model=micro_model(), train=quick_train(**{**cfg, **overrides}))


def _weights(path):
    return {k: np.array(v) for k, v in mx.load(str(path / "model.safetensors")).items()}


def _assert_close(a, b, atol):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=atol, err_msg=k)


class Record(TrainingCallback):
    def __init__(self):
        self.events = []

    def on_event(self, event, info):
        self.events.append((event, info))


class KillRankOneOnFirstCheckpoint(Record):
    """SIGKILLs the rank in the second namespace (its python: MLX_RANK=1) when rank 0 saved the first checkpoint."""

    def __init__(self, job_path):
        super().__init__()
        self.job_path, self.killed = str(job_path), []

    def on_event(self, event, info):
        super().on_event(event, info)
        if event != "checkpoint" or self.killed:
            return
        found = subprocess.run(["pgrep", "-f", self.job_path], capture_output=True, text=True)
        for pid in map(int, found.stdout.split()):
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"MLX_RANK=1" in env:
                netns = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True)
                self.killed.append((pid, netns.stdout.strip()))
                os.kill(pid, 9)


@pytest.fixture(scope="module")
def runs(two_hosts, small_data, tmp_path_factory):
    """Three independent runs at once (start-up dominates them): one rank x batch 8 here, two ranks x
    batch 4 in the namespaces, and the same two-rank job whose second rank gets SIGKILLed (own ports)."""
    root = tmp_path_factory.mktemp("multihost")
    jobs = {"one": (_job(small_data, root / "one", batch_size=8), Record()),
            "two": (_job(small_data, root / "two", two_hosts, batch_size=4, world_size=2), Record()),
            "killed": (_job(small_data, root / "killed", two_hosts, batch_size=4, world_size=2, distributed=DistributedConfig(
                hosts=str(two_hosts), exec_prefix="ip netns exec {ssh}", threads_per_rank=1, starting_port=32400)),
                KillRankOneOnFirstCheckpoint(root / "killed" / "job.json"))}

    def run(name):
        job, callback = jobs[name]
        try:
            return run_in_subprocess(job, callback)
        except Exception as e:  # noqa: BLE001  (the killed run's TrainingCrashed is checked below)
            return e

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = dict(zip(jobs, pool.map(run, jobs)))
    return root, jobs, results


def test_ranks_in_two_namespaces_train_like_one_rank_with_the_doubled_batch(runs):
    root, jobs, results = runs
    one, two = results["one"], results["two"]
    assert isinstance(one, dict) and isinstance(two, dict), results
    _assert_close(_weights(root / "one/model"), _weights(root / "two/model"), atol=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert two["tokens"] == one["tokens"] and two["step"] == 10
    # rank 0's events came back over its stdout, in order: begin (2 ranks), steps, evals, the end, the result
    events = jobs["two"][1].events
    names = [e for e, _ in events]
    assert names[0] == "begin" and events[0][1]["world_size"] == 2 and names[-2:] == ["end", "result"]
    assert [i["step"] for e, i in events if e == "checkpoint"] == [5, 10]
    assert [i["step"] for e, i in events if e == "train"] == [5, 10]
    # the ranks listened on the namespaces' addresses (mlx.launch's ring hostfile layout)
    assert json.loads((root / "two/ring_hosts.json").read_text()) == [["10.77.0.1:32323"], ["10.77.0.2:32324"]]
    assert [s for s, _ in checkpoint.list_checkpoints(root / "two/checkpoints")][-1] == 10


def test_a_killed_rank_in_one_namespace_stops_the_job_and_a_rerun_resumes_it(runs):
    root, jobs, results = runs
    job, killer = jobs["killed"]
    assert isinstance(results["killed"], TrainingCrashed) and "killed by signal 9" in str(results["killed"])
    assert len(killer.killed) == 1 and killer.killed[0][1].endswith("b")  # the second host's namespace
    assert not (root / "killed/model").exists()
    done = checkpoint.list_checkpoints(root / "killed/checkpoints")
    assert done and done[-1][0] < 10
    # no rank of the killed job is left anywhere (rank 0 was stopped through its lifeline, or failed on its own)
    left = subprocess.run(["pgrep", "-f", str(root / "killed" / "job.json")], capture_output=True, text=True)
    assert left.stdout.split() == []

    record = Record()
    resumed = run_in_subprocess(job, record)
    assert record.events[0][1]["start_step"] == done[-1][0] and record.events[0][1]["world_size"] == 2
    assert resumed["step"] == 10 and "step-" in resumed["resumed_from"]
    _assert_close(_weights(root / "two/model"), _weights(root / "killed/model"), atol=1e-6)
    assert resumed["val_loss"] == pytest.approx(results["two"]["val_loss"], rel=1e-6)


def test_a_job_dir_the_other_host_cannot_see_is_a_clear_error(two_hosts, small_data, tmp_path):
    """Each "host" gets its own mount namespace with a tmpfs over the job dir: not shared."""
    job = _job(small_data, tmp_path / "private", two_hosts, batch_size=4, world_size=2,
               distributed=DistributedConfig(hosts=str(two_hosts), threads_per_rank=1, exec_prefix=(
                   "ip netns exec {ssh} unshare --mount sh -c "
                   f"'mount -t tmpfs none {tmp_path / 'private'} && exec \"$@\"' -")))
    from mlxcore.train.launch import TrainingFailed
    with pytest.raises(TrainingFailed, match="must be on a filesystem every host shares"):
        run_in_subprocess(job)
