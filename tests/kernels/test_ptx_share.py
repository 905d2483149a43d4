"""The GPU subset on a cold MLX-CUDA kernel cache: tests/ptx_share.py (workers take in each other's
finished kernels, never a half-written one), and the longest compile chains scheduled first.

The cache layout is MLX-CUDA's (mlx/backend/cuda/jit_module.cpp): NAME.ptx, NAME.txt, NAME.cu, and
a name over 245 characters split into folders. Run on the CPU with files written as MLX writes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import ptx_share


def kernel(folder, rel, age=30.0, parts=(".ptx", ".txt", ".cu"), txt="k\t_Z1kv\n", body=b"ptx"):
    stem = folder / rel
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix in parts:
        path = stem.with_suffix(suffix)
        path.write_bytes(txt.encode() if suffix == ".txt" else body + suffix.encode())
        os.utime(path, (time.time() - age, time.time() - age))
    return stem


def contents(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def cache(tmp_path):
    own, peer, other = (tmp_path / g for g in ("gw0", "gw1", "gw2"))
    own.mkdir()
    kernel(peer, "gather_float32_int32_1")
    kernel(other, "x" * 245 + "/tail_of_a_long_name", body=b"long")  # how MLX splits a long name
    kernel(peer, "no_source_yet", parts=(".ptx", ".txt"))  # MLX still writing: no .cu
    kernel(peer, "just_written", age=0.0)  # within the settling time
    kernel(peer, "half_written_names", txt="k\t_Z1")  # the .txt cut mid-line
    kernel(own, "mine", body=b"own")
    kernel(peer, "mine", body=b"peer's")
    return own, [own, peer, other]


def test_pull_takes_exactly_the_finished_kernels_and_keeps_its_own(cache):
    own, peers = cache
    before = contents(own)
    assert ptx_share.pull(own, peers, settle=1.0) == 2
    after = contents(own)
    taken = {k: v for k, v in after.items() if k not in before}
    assert sorted(taken) == sorted([f"gather_float32_int32_1{s}" for s in (".ptx", ".txt", ".cu")]
                                   + [f"{'x' * 245}/tail_of_a_long_name{s}" for s in (".ptx", ".txt", ".cu")])
    for name, data in taken.items():  # byte for byte what the peer wrote
        source = next(p for p in peers[1:] if (p / name).exists())
        assert data == (source / name).read_bytes()
    assert {k: after[k] for k in before} == before  # its own "mine" is not replaced by the peer's
    assert not [k for k in after if k.endswith(".tmp")]
    assert ptx_share.pull(own, peers, settle=1.0) == 0  # nothing new: nothing copied again


def test_a_kernel_is_published_with_its_ptx_last(cache, monkeypatch):
    own, peers = cache
    renamed = []
    real_replace = os.replace

    def replace(src, dst):
        renamed.append(os.path.basename(dst))
        assert not os.path.exists(str(dst)[: -len(".xxx")] + ".ptx"), "the .ptx was there before its .txt / .cu"
        real_replace(src, dst)

    monkeypatch.setattr(ptx_share.os, "replace", replace)
    ptx_share.pull(own, peers, settle=1.0)
    gather = [n for n in renamed if n.startswith("gather")]
    assert gather == ["gather_float32_int32_1.txt", "gather_float32_int32_1.cu", "gather_float32_int32_1.ptx"]


def test_a_file_that_changes_while_it_is_copied_is_not_published(cache, monkeypatch):
    own, peers = cache
    real_copy = ptx_share.shutil.copyfile

    def copy_then_peer_rewrites(src, dst):
        real_copy(src, dst)
        if str(src).endswith(".ptx"):
            with open(src, "ab") as f:  # the peer's MLX writes it again meanwhile
                f.write(b"more")

    monkeypatch.setattr(ptx_share.shutil, "copyfile", copy_then_peer_rewrites)
    ptx_share.pull(own, peers, settle=1.0)
    assert not (own / "gather_float32_int32_1.ptx").exists()  # MLX would compile it itself
    assert not [p for p in own.rglob("*") if p.name.endswith(".tmp")]


def test_the_worker_thread_takes_in_a_kernel_a_peer_finishes_later(tmp_path):
    own, stop = tmp_path / "gw0", threading.Event()
    thread = ptx_share.start(own, interval=0.05, settle=0.2, stop=stop)
    kernel(tmp_path / "gw1", "compiled_later", age=0.0)
    deadline = time.time() + 10
    while not (own / "compiled_later.ptx").exists() and time.time() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert (own / "compiled_later.ptx").read_bytes() == b"ptx.ptx"
    assert (own / "compiled_later.txt").read_text() == "k\t_Z1kv\n"


def _collected(*args):
    files = ["tests/mlxcore/test_optimizers.py", "tests/mlxcore/test_adapters.py", "tests/mlxcore/test_gpu_subset.py"]
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args, *files],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    return [line for line in out.stdout.splitlines() if "::" in line]


def test_the_gpu_subset_starts_the_quantized_tests_first_and_other_runs_keep_the_collection_order():
    gpu, everything = _collected("-m", "gpu"), _collected()
    first = {"test_quantized_layers_match_their_dequantized_weights_in_value_and_input_gradient[4-32]",
             "test_quantized_layers_match_their_dequantized_weights_in_value_and_input_gradient[8-64]",
             "test_adapters_train_with_the_expected_trainable_parameters[qlora4]",
             "test_adapters_train_with_the_expected_trainable_parameters[qlora8]"}
    assert {t.split("::")[-1] for t in gpu[:4]} == first
    assert len(gpu) > 8 and not first & {t.split("::")[-1] for t in gpu[4:]}
    assert gpu[4:] == [t for t in everything if t in gpu[4:]]  # the rest as collected
    assert everything[0].startswith("tests/mlxcore/test_optimizers.py")  # without -m gpu: nothing moves


_SCHEDULED = """
import json, os, time
import pytest

def _log(name):
    with open(os.environ["SCHEDULE_LOG"], "a") as f:
        f.write(json.dumps([name, os.environ["PYTEST_XDIST_WORKER"]]) + "\\n")

@pytest.mark.parametrize("i", range(40))
def test_cpu_only(i):  # deselected by -m gpu: the chunks must be laid out over what is left
    pass

@pytest.mark.gpu
@pytest.mark.parametrize("i", range(30))
def test_short(i):
    _log(f"short{i}")
    time.sleep(0.02)

@pytest.mark.gpu(first=True)  # collected last: without the ordering they would start last
@pytest.mark.parametrize("i", range(3))
def test_long(i):
    _log(f"long{i}")
    time.sleep(2.0)
"""


def test_under_xdist_each_first_test_starts_at_once_on_a_worker_of_its_own(tmp_path):
    """Real pytest-xdist load scheduling over a suite ordered by tests/conftest.py's hook, with
    tests that `-m gpu` deselects collected first."""
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from tests.conftest import GpuSubsetOrder\n\n"
        "def pytest_configure(config):\n    config.addinivalue_line('markers', 'gpu: the GPU subset')\n"
        "    config.pluginmanager.register(GpuSubsetOrder())\n")
    (tmp_path / "test_scheduled.py").write_text(_SCHEDULED)
    log = tmp_path / "log.jsonl"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-n", "4", "-p", "no:cacheprovider",
                          str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "SCHEDULE_LOG": str(log)}, timeout=300)
    assert "33 passed" in out.stdout, out.stdout + out.stderr
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    by_worker: dict = {}
    for name, worker in runs:
        by_worker.setdefault(worker, []).append(name)
    longs = {name: worker for name, worker in runs if name.startswith("long")}
    assert len(set(longs.values())) == 3  # three workers, one long test each
    # each its worker's first test, so none waited behind another (xdist's first chunks are all
    # sent before any test runs: this is the schedule, not a timing)
    assert all(by_worker[w][0] == name for name, w in longs.items())
