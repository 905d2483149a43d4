"""Build the C++ kernel extension on first use, cache it per user, load it.

Why lazily and not at `pip install` time: the project installs with plain `pip install -e .`
(setuptools, no compiler step) and also runs on macOS and CUDA, where the extension must not
exist at all. Building on first use needs only what MLX's own CPU JIT already needs (a C++
compiler), it can target the running CPU (`-march=native`), and a failure costs nothing but
the speed-up: every caller falls back to plain MLX ops. The trade-off is a one-time 25-40 s
build (2 cores) in the first process that asks for a kernel, and that the cache is per user.

Cache key: sha256 of the C++ sources, the mlx / nanobind / Python versions, the compiler's
`--version`, the flags and the CPU's feature flags (a home directory shared by different
machines must not load a `-march=native` build made for another CPU). Builds go to a
temporary directory and are moved into place with an atomic rename, so concurrent processes
never see a half-written library, and a file lock per cache entry makes processes that start
together (data-parallel ranks, test workers) wait for one build. A failed build leaves a
FAILED marker (with the log) so later processes do not retry it; delete the cache directory
to retry.

Environment:
  MLXFLOW_KERNELS        auto (default) | off (never use the extension) | on (raise instead
                         of falling back; for tests and benchmarks)
  MLXFLOW_KERNELS_CACHE  cache root (default $XDG_CACHE_HOME/mlxflow/kernels or
                         ~/.cache/mlxflow/kernels)
  CXX                    compiler (default: c++, g++ or clang++ from PATH)
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

MODULE_NAME = "_mlxflow_kernels"  # must match NB_MODULE(...) in csrc/bindings.cpp
SRC_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = ["cross_entropy.cpp", "attention.cpp", "swiglu.cpp", "rms_norm.cpp", "rope.cpp", "sampling.cpp", "adamw.cpp",
           "align.cpp", "bindings.cpp"]
# sources whose arithmetic must round as MLX's separate ops do (no a*b+c contracted to an FMA)
EXACT_SOURCES = {"adamw.cpp"}
KERNEL_FLAGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno"]  # no -ffast-math: see simd.h
# nanobind internals versions of releases checked by hand (for the error message only)
KNOWN_NANOBIND = {22: "3.1.0", 19: "2.12.0", 17: "2.10.2", 16: "2.9.2"}

class KernelsUnavailable(RuntimeError):
    pass


def mode() -> str:
    m = os.environ.get("MLXFLOW_KERNELS", "auto").strip().lower() or "auto"
    if m in ("0", "false", "no", "disable", "disabled"):
        return "off"
    if m in ("1", "true", "yes", "require", "required"):
        return "on"
    return m


class Extension:
    """One lazily built nanobind module: its sources, how to configure its build, its state.

    `configure()` returns the extra compile flags (`common`: every translation unit, `kflags`:
    the module's own sources), the extra link flags and what else belongs in the cache key; it
    raises KernelsUnavailable when the build cannot happen here (no headers, wrong platform).
    """

    def __init__(self, module: str, src_dir: Path, sources: list[str], what: str, configure,
                 exact: frozenset[str] = frozenset(), after_load=None):
        self.module, self.src_dir, self.sources, self.what = module, src_dir, sources, what
        self.configure, self.exact, self.after_load = configure, exact, after_load
        self._lock = threading.Lock()
        self._module = None
        self._error: str | None = None

    def load(self):
        """The extension module, or None (with `error()` saying why). Thread-safe, cached."""
        if mode() == "off":
            return None
        if self._module is None and self._error is None:
            with self._lock:
                if self._module is None and self._error is None:
                    try:
                        self._module = _load_or_build(self)
                        if self.after_load is not None:
                            self.after_load(self._module)
                    except Exception as e:  # noqa: BLE001 - any failure means "use plain MLX"
                        self._error = f"{type(e).__name__}: {e}"
                        print(f"mlxflow: {self.what} unavailable, using plain MLX ops ({self._error})",
                              file=sys.stderr)
        if self._error is not None and mode() == "on":
            raise KernelsUnavailable(self._error)
        return self._module

    def error(self) -> str | None:
        return self._error


def _cpu_configure() -> dict:
    if not sys.platform.startswith("linux"):
        raise KernelsUnavailable(f"{sys.platform}: only built for Linux CPU (MLX has "
                                 "Accelerate/Metal on macOS)")
    return dict(common=[], kflags=KERNEL_FLAGS + _arch_flags(), link=["-Wl,-s"], key=[_cpu_id()])


def _align_after_load(module) -> None:
    _align(module)


CPU = Extension(MODULE_NAME, SRC_DIR, SOURCES, "CPU kernels", _cpu_configure,
                exact=frozenset(EXACT_SOURCES), after_load=_align_after_load)
_aligned = False


def load():
    """The CPU extension module, or None (with `error()` saying why). Thread-safe, cached."""
    return CPU.load()


def _align(module) -> None:
    """64-byte aligned array data from MLX's CPU allocator (csrc/align.cpp): on Linux, with the CPU
    build of MLX (no Metal, no CUDA), unless MLXFLOW_ALIGN=off. `aligned()` says whether it took."""
    global _aligned
    import mlx.core as mx
    if os.environ.get("MLXFLOW_ALIGN", "auto").lower() in ("off", "0", "false", "no") or not sys.platform.startswith("linux"):
        return
    if mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available()):
        return
    _aligned = module.align_allocations() > 0


def aligned() -> bool:
    """True once libmlx's allocations go through the 64-byte aligning malloc / free."""
    return _aligned


def error() -> str | None:
    return CPU.error()


def cache_root() -> Path:
    if os.environ.get("MLXFLOW_KERNELS_CACHE"):
        return Path(os.environ["MLXFLOW_KERNELS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlxflow" / "kernels"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if not cxx or not shutil.which(cxx.split()[0]):
        raise KernelsUnavailable("no C++ compiler found (set CXX or install g++)")
    return cxx


def _cpu_id() -> str:
    """Feature flags of this CPU: part of the key because we compile with -march=native."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^(flags|Features)\s*:\s*(.*)$", text, re.M)
        return platform.machine() + ":" + (m.group(2) if m else "")
    except OSError:
        return platform.machine()


def _arch_flags() -> list[str]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return ["-march=native"]
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return []


def _nanobind_internals(nb_dir: Path) -> int | None:
    m = re.search(r"define\s+NB_INTERNALS_VERSION\s+(\d+)",
                  (nb_dir / "src" / "nb_internals.h").read_text())
    return int(m.group(1)) if m else None


def _mlx_internals() -> int | None:
    """nanobind internals version mlx.core was built with, read from its binary."""
    import mlx.core as mx
    data = Path(mx.__file__).read_bytes()
    m = re.search(rb"nanobind_\w*?_a\d+_v(\d+)", data)  # nanobind >= 3
    if not m:
        m = re.search(rb"\bv(\d+)_(?:system|gcc|clang|msvc|icc)", data)  # nanobind 2.x
    return int(m.group(1)) if m else None


def _nanobind():
    try:
        import nanobind
    except ImportError:
        raise KernelsUnavailable("nanobind is not installed (pip install nanobind==3.1.0 "
                                 "for mlx 0.32; it must match mlx's nanobind ABI)") from None
    return nanobind, Path(nanobind.__file__).resolve().parent


def _check_nanobind_abi(nanobind, nb_dir: Path) -> None:
    """Before spending a build: is nanobind's internals ABI the one mlx.core uses?"""
    ours, theirs = _nanobind_internals(nb_dir), _mlx_internals()
    if ours is not None and theirs is not None and ours != theirs:
        hint = KNOWN_NANOBIND.get(theirs, f"the release with NB_INTERNALS_VERSION {theirs}")
        raise KernelsUnavailable(
            f"nanobind {nanobind.__version__} has internals ABI v{ours} but mlx.core was built "
            f"with v{theirs}: pip install nanobind=={hint}")


def _build_plan(ext: Extension):
    import mlx.core as mx
    nanobind, nb_dir = _nanobind()
    cxx = _compiler()
    mlx_dir = Path(mx.__file__).resolve().parent  # `mlx` is a namespace package: no __file__
    py_inc = sysconfig.get_paths()["include"]
    conf = ext.configure()
    common = ["-std=c++20", "-fPIC", "-fvisibility=hidden", "-DNDEBUG",
              "-DNB_DOMAIN=mlx",  # mlx.core's nanobind domain: shares its array type
              "-DNB_COMPACT_ASSERTIONS", f"-I{py_inc}", f"-I{nb_dir / 'include'}",
              f"-I{nb_dir / 'ext' / 'robin_map' / 'include'}", f"-I{mlx_dir / 'include'}", *conf["common"]]
    kflags = conf["kflags"]
    # --exclude-libs: a compiler that links parts of libstdc++ statically (the lent H100's did) would
    # export them, and the loader would bind some of their references to the process's libstdc++.so.6
    # and others to the copy: the cuDNN attention crashed so at its first `ostringstream << long`.
    # Hidden, a static copy is private and self-consistent; with a shared libstdc++ nothing changes.
    link = ["-shared", f"-L{mlx_dir / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}", "-Wl,--exclude-libs,ALL",
            *conf["link"]]
    try:
        cxx_version = subprocess.run([*cxx.split(), "--version"], capture_output=True,
                                     text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelsUnavailable(f"cannot run {cxx}: {e}") from None
    h = hashlib.sha256()
    for f in sorted(ext.src_dir.rglob("*")):
        if f.suffix in (".cpp", ".h"):
            h.update(str(f.relative_to(ext.src_dir)).encode() + f.read_bytes())
    for part in (mx.__version__, nanobind.__version__, sys.version, sysconfig.get_config_var(
            "EXT_SUFFIX"), cxx, cxx_version, " ".join(common + kflags + link), sorted(ext.exact), *conf["key"]):
        h.update(str(part).encode() + b"\0")
    return dict(cxx=cxx.split(), common=common, kflags=kflags, link=link, nb_dir=nb_dir,
                nanobind=nanobind, key=h.hexdigest()[:20])


def _compile(ext: Extension, plan, out_dir: Path) -> Path:
    """Compile all translation units in parallel, then link. Returns the library path."""
    jobs = [(plan["nb_dir"] / "src" / "nb_combined.cpp", ["-O2", "-fno-strict-aliasing"])]
    jobs += [(ext.src_dir / s, plan["kflags"] + ["-Wall"] + (["-ffp-contract=off"] if s in ext.exact else []))
             for s in ext.sources]
    log = out_dir / "build.log"
    procs, objs = [], []
    with open(log, "w") as logf:
        for src, flags in jobs:
            obj = out_dir / (src.stem + ".o")
            cmd = [*plan["cxx"], *plan["common"], *flags, "-c", str(src), "-o", str(obj)]
            logf.write(" ".join(cmd) + "\n")
            logf.flush()
            procs.append(subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT))
            objs.append(str(obj))
        failed = [p.args for p in procs if p.wait() != 0]
        if failed:
            raise KernelsUnavailable("compilation failed")
        lib = out_dir / (ext.module + sysconfig.get_config_var("EXT_SUFFIX"))
        cmd = [*plan["cxx"], *objs, *plan["link"], "-o", str(lib)]
        logf.write(" ".join(cmd) + "\n")
        logf.flush()
        if subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT).returncode != 0:
            raise KernelsUnavailable("linking failed")
    return lib


def _import(name: str, path: Path):
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _probe(mod):
    import mlx.core as mx
    try:
        mod.probe(mx.zeros((1,)))
    except TypeError as e:  # nanobind could not convert mlx.core.array: ABI/domain mismatch
        raise KernelsUnavailable(f"extension cannot read mlx arrays (nanobind ABI): {e}") from None
    return mod


def _load_or_build(ext: Extension):
    if not ext.src_dir.is_dir():
        raise KernelsUnavailable(f"C++ sources not installed ({ext.src_dir})")
    plan = _build_plan(ext)
    final_dir = cache_root() / plan["key"]
    lib = final_dir / (ext.module + sysconfig.get_config_var("EXT_SUFFIX"))
    if lib.exists():
        return _probe(_import(ext.module, lib))
    _raise_if_failed(final_dir)
    _check_nanobind_abi(plan["nanobind"], plan["nb_dir"])
    final_dir.mkdir(parents=True, exist_ok=True)
    # One builder per cache entry: processes that start together (data-parallel ranks, test
    # workers) wait for the first one's build instead of each compiling the same module.
    import fcntl  # POSIX; the extensions build on Linux only

    with open(final_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the builder ends, killed or not
        if lib.exists():
            return _probe(_import(ext.module, lib))
        _raise_if_failed(final_dir)
        _build_into(ext, plan, final_dir, lib)
    return _probe(_import(ext.module, lib))


def _raise_if_failed(final_dir: Path) -> None:
    if (final_dir / "FAILED").exists():
        raise KernelsUnavailable(f"an earlier build failed, see {final_dir}/FAILED "
                                 "(delete that directory to retry)")


def _build_into(ext: Extension, plan, final_dir: Path, lib: Path) -> None:
    print(f"mlxflow: compiling {ext.what} into {final_dir} (one-time, about a minute)...",
          file=sys.stderr)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=final_dir))
    try:
        built = _compile(ext, plan, tmp)
        os.replace(built, lib)  # atomic: a reader never sees a half-written library
    except KernelsUnavailable as e:
        log = tmp / "build.log"
        if log.exists():
            shutil.copyfile(log, final_dir / "FAILED")
        else:
            (final_dir / "FAILED").write_text("build failed\n")
        raise KernelsUnavailable(f"{e}, log: {final_dir / 'FAILED'}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"mlxflow: {ext.what} built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
