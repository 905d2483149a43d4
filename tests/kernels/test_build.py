"""How the C++ extensions are built: one builder per cache entry, and link flags that keep a
statically linked libstdc++ private.

The lent H100's compiler put parts of libstdc++ into the cuDNN attention module and exported
them; the loader bound some of their references to the process's libstdc++.so.6 and others to
the copy, and the module crashed at its first `ostringstream << long`. Here the same clash is made
on purpose (`-static-libstdc++`) in a process that has loaded MLX (and so libstdc++.so.6) first:
without `_build`'s link flags the stream silently writes nothing (the control), with them it
works."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from mlxcore.kernels import _build

SOURCE = r"""
#include <sstream>
extern "C" __attribute__((visibility("default"))) int key_length(long x) {
  std::ostringstream os;
  os << "fwd|" << x << ',' << 2.5;
  return static_cast<int>(os.str().size());
}
"""
WANT = len("fwd|12345,2.5")


def _module(tmp_path, plan, link, name):
    src, so = tmp_path / "m.cpp", tmp_path / f"{name}.so"
    src.write_text(SOURCE)
    r = subprocess.run([*plan["cxx"], "-fPIC", "-O2", "-fvisibility=hidden", str(src), "-static-libstdc++", *link,
                        "-o", str(so)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"no static libstdc++ to link here: {r.stderr[-300:]}")
    return so


def _key_length(so) -> int:
    """key_length(12345) in a fresh process that has loaded MLX (and its libstdc++.so.6) first."""
    code = f"import ctypes, mlx.core as mx; mx.eval(mx.ones(2)); print(ctypes.CDLL({str(so)!r}).key_length(12345))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


def test_a_static_libstdcxx_stays_private_under_the_extensions_link_flags(tmp_path):
    try:
        plan = _build._build_plan(_build.CPU)
    except _build.KernelsUnavailable as e:
        pytest.skip(str(e))
    ours = plan["link"]
    control = [f for f in ours if not f.startswith("-Wl,--exclude-libs")]
    if _key_length(_module(tmp_path, plan, control, "control")) == WANT:
        pytest.skip("this toolchain's static libstdc++ does not clash with the process's here")
    assert _key_length(_module(tmp_path, plan, ours, "ours")) == WANT


def test_processes_that_start_together_wait_for_one_build(tmp_path, monkeypatch):
    """Two loaders of an entry that is not built yet (data-parallel ranks, test workers): one compiles,
    the other waits on the entry's lock and loads that build; neither sees a half-written library."""
    monkeypatch.setenv("MLXFLOW_KERNELS_CACHE", str(tmp_path / "cache"))
    compiled, loaded = [], []

    def slow_compile(ext, plan, out_dir):
        compiled.append(threading.current_thread().name)
        time.sleep(1.0)  # long enough for the other loader to arrive while this one builds
        built = out_dir / "lib.so"
        built.write_bytes(b"a complete library")
        return built

    def load(name, path):
        loaded.append(path.read_bytes())
        return "module"

    monkeypatch.setattr(_build, "_compile", slow_compile)
    monkeypatch.setattr(_build, "_import", load)
    monkeypatch.setattr(_build, "_probe", lambda mod: mod)
    monkeypatch.setattr(_build, "_check_nanobind_abi", lambda *a: None)
    got = {}
    threads = [threading.Thread(target=lambda n=n: got.setdefault(n, _build._load_or_build(_build.CPU)), name=f"rank{n}")
               for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == {0: "module", 1: "module"}
    assert len(compiled) == 1 and loaded == [b"a complete library"] * 2
