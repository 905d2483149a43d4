"""The extensions' link flags keep a statically linked libstdc++ private.

The lent H100's compiler put parts of libstdc++ into the cuDNN attention module and exported
them; the loader bound some of their references to the process's libstdc++.so.6 and others to
the copy, and the module crashed at its first `ostringstream << long`. Here the same clash is made
on purpose (`-static-libstdc++`) in a process that has loaded MLX (and so libstdc++.so.6) first:
without `_build`'s link flags the stream silently writes nothing (the control), with them it
works."""

from __future__ import annotations

import subprocess
import sys

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
