"""Content-based cache keys and output dirs for stage tasks.

A stage's key hashes: the stage name, the stage's code version (below), the *digests* of its
input dirs' manifests (never their paths: same path with new data is a new key), its config
values, and the run dir it writes to (the same inputs written to two run dirs are two results,
each with its files). The stage writes to `<run_dir>/<stage>-<key[:12]>`, so a key always names
one output dir. If that dir was deleted while Prefect still holds a cached result for the key,
the key function forces a re-run instead of handing out a path to nothing. The converse holds
too: each stage's body returns a complete output dir's result from disk (its manifest) without
redoing the work, so a fresh Prefect result store (another PREFECT_HOME, server or worker)
costs nothing. Before its body a stage sweeps the run dir of temp files left by writers that
were killed.

Code version, per stage: a `Stage` remembers the module that created it (`tasks.train` for
`pretrain`, ...). Its code version hashes the source of that module's *import closure* within
`mlxcore` and `tasks` (`module_closure`), plus the mlx and mlx-lm versions. The closure is found
statically with `ast`, like a dependency scanner: every `import x.y` / `from x import y`
anywhere in a file (module level, inside functions, under `if TYPE_CHECKING`), relative
imports resolved, and the `__init__.py` of every package on the way (importing `a.b.c` runs
`a` and `a.b` first). A package's non-Python sources outside its subpackages (the C++ kernels
under `mlxcore/kernels/csrc`) count as part of that package. It is computed once per process
(lru_cache). So editing `mlxcore/distill/generate.py` re-runs the distill stages only, and a
file that no stage imports re-runs nothing.

Known limits: it over-approximates — a module counts as a whole even when only one class of it
is used (which is why the distill configs live apart from the prompt templates, the HTTP client
and the answer parser, in `mlxcore.distill.schema`: every stage reads `mlxcore.config`) — and it
cannot see what is not a literal import: a module named in a string (`importlib.import_module`,
`__import__`, `python -m ...`; e.g. the job module the child process of `mlxcore.train.launch` imports
by name) counts only because the stage module also imports it directly (tasks.train imports
mlxcore.train.loop, tasks.distill mlxcore.distill.student, tasks.rl mlxcore.rl.iteration). Data files
read at run time (other than package sources as above) and third-party code other than mlx /
mlx-lm are not hashed. Code versions are computed once per process: a long-lived worker does
not see source edits made after its first key. `code_version()` without a module hashes every
source file (the old, coarse key).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import inspect
import logging
import sys
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.exceptions import MissingContextError
from pydantic import BaseModel

from mlxcore.io import clean_stale_tmp, is_complete, path_digest, sha256_json
from tasks.runlog import HOOKS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mlxcore", "tasks")
# Non-Python files that are sources (hashed with their package); docs (*.md) are not.
SOURCE_SUFFIXES = (".c", ".cc", ".cpp", ".h", ".hpp", ".json", ".jinja", ".j2", ".yaml", ".yml")
LIBRARIES = ("mlx", "mlx-lm")


def _module_file(name: str, root: Path) -> Path | None:
    """The file that defines module `name` under `root` (a package's `__init__.py`), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _imports(name: str, path: Path, root: Path) -> set[str]:
    """Modules of PACKAGES that `path` (module `name`) imports anywhere, with their parents."""
    st = path.stat()
    return set(_parsed_imports(name, path, root, st.st_mtime_ns, st.st_size))


def module_imports(name: str, root: Path = ROOT) -> set[str]:
    """Modules of PACKAGES that module `name` imports anywhere in its file (with their parents)."""
    path = _module_file(name, root)
    if path is None:
        raise ModuleNotFoundError(f"{name}: no such module under {root}")
    return _imports(name, path, root)


@lru_cache(maxsize=None)
def _parsed_imports(name: str, path: Path, root: Path, mtime_ns: int, size: int) -> frozenset[str]:
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from ..y import z`
                parts = package.split(".")
                anchor = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{anchor}.{node.module}" if node.module else anchor
            else:
                target = node.module or ""
            found.add(target)
            # `from pkg import sub` imports the submodule when `sub` is one
            found.update(f"{target}.{alias.name}" for alias in node.names
                         if alias.name != "*" and _module_file(f"{target}.{alias.name}", root))
    return frozenset(p for m in found for p in _with_parents(m) if _module_file(p, root))


@lru_cache(maxsize=None)
def module_closure(*modules: str, root: Path = ROOT) -> tuple[str, ...]:
    """`modules` and every module of PACKAGES they import, transitively (sorted names)."""
    seen: set[str] = set()
    todo = [p for m in modules for p in _with_parents(m)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name, root)
        if path is None:
            raise ModuleNotFoundError(f"{name}: no such module under {root}/{{{','.join(PACKAGES)}}}")
        seen.add(name)
        todo.extend(_imports(name, path, root) - seen)
    return tuple(sorted(seen))


def _package_sources(pkg_dir: Path) -> list[Path]:
    """Non-Python sources of a package outside its subpackages (e.g. mlxcore/kernels/csrc/*.cpp)."""
    out = []
    for path in sorted(pkg_dir.rglob("*")):
        rel = path.relative_to(pkg_dir)
        if (path.is_file() and path.suffix in SOURCE_SUFFIXES and "__pycache__" not in rel.parts
                and not any(pkg_dir.joinpath(*rel.parts[:i], "__init__.py").is_file()
                            for i in range(1, len(rel.parts)))):
            out.append(path)
    return out


def code_files(*modules: str, root: Path = ROOT) -> list[Path]:
    """The files a code version hashes: `modules`' closure, or every source file when none is named."""
    if not modules:
        return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*")
                      if p.is_file() and (p.suffix == ".py" or p.suffix in SOURCE_SUFFIXES)
                      and "__pycache__" not in p.parts)
    files = []
    for name in module_closure(*modules, root=root):
        path = _module_file(name, root)
        files.append(path)
        if path.name == "__init__.py":
            files += _package_sources(path.parent)
    return sorted(files)


@lru_cache(maxsize=None)
def code_version(*modules: str, root: Path = ROOT) -> str:
    """Hash of the source `modules` run (see the module doc) and of the mlx / mlx-lm versions.

    Without `modules`: every source file of mlxcore and tasks.
    """
    h = hashlib.sha256()
    for path in code_files(*modules, root=root):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    for dist in LIBRARIES:
        try:
            h.update(f"{dist}={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            pass
    return h.hexdigest()[:16]


def _value(v: Any) -> Any:
    return v.model_dump(mode="json") if isinstance(v, BaseModel) else v


def _digest(value: Any) -> Any:
    """Content digests of an input: a dir or file path, or lists / dicts of them."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _digest(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_digest(v) for v in value]
    return path_digest(value)


def stage_key(stage: str, params: dict[str, Any], inputs: tuple[str, ...], extra=None,
              module: str | None = None) -> str:
    """Key from input dirs' content digests + the other parameters + code version.

    An input dir is digested by its manifest, or file by file when it has none (a model
    downloaded elsewhere). `extra(params)` adds content a parameter only points at. The code
    version is `module`'s (the stage's task module; see the module doc), or of all the code
    when None.
    """
    body = {"stage": stage, "code": code_version(module) if module else code_version()}
    if extra is not None:
        body["extra"] = extra(params)
    for name, value in sorted(params.items()):
        if name in inputs:
            body[name] = _digest(value)
        elif name == "run_dir":
            body[name] = str(Path(value).resolve())
        else:
            body[name] = _value(value)
    return sha256_json(body)


class Stage:
    """A stage's name, which parameters are input dirs, and where its finished product lies.

    `product` is the subdir whose manifest marks the stage done ("" = the stage dir itself).
    `module` is the task module whose import closure versions the stage's code: by default the
    module that creates the Stage (outside mlxcore / tasks, e.g. a test: all the code).
    """

    def __init__(self, name: str, inputs: tuple[str, ...] = (), product: str = "", extra=None,
                 module: str | None = None):
        self.name, self.inputs, self.product, self.extra = name, inputs, product, extra
        if module is None:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            module = caller if _module_file(caller, ROOT) else None
        self.module = module

    def key(self, params: dict[str, Any]) -> str:
        return stage_key(self.name, params, self.inputs, self.extra, self.module)

    def dir(self, params: dict[str, Any], key: str | None = None) -> Path:
        key = key or self.key(params)
        return Path(params["run_dir"]) / f"{self.name}-{key[:12]}"

    def done(self, out: Path) -> bool:
        return is_complete(out / self.product)

    def task(self, **kwargs):
        """prefect.task with this stage's cache policy and JSON results (paths + small dicts)."""
        def key_fn(context, params: dict[str, Any]) -> str:
            key = self.key(params)
            if not self.done(self.dir(params, key)) and context.result_store.exists(key):
                return f"{key}-rebuild-{uuid.uuid4().hex}"  # cached result points at a deleted dir
            return key

        def decorate(fn):
            @functools.wraps(fn)
            def swept(*args, **kw):
                sweep(inspect.signature(fn).bind(*args, **kw).arguments["run_dir"])
                return fn(*args, **kw)

            return task(name=self.name, cache_policy=CachePolicy.from_cache_key_fn(key_fn),
                        persist_result=True, result_serializer="json", **(HOOKS | kwargs))(swept)

        return decorate


def sweep(run_dir: str | Path) -> list[Path]:
    """Remove what writers killed mid-write left in a run dir (`.tmp-*` of dead processes only:
    a live writer's temp, e.g. a concurrent stage's, stays). Every stage calls it first."""
    removed = clean_stale_tmp(run_dir, recursive=True)
    if removed:
        try:
            logger = get_run_logger()
        except MissingContextError:  # called outside a flow run
            logger = logging.getLogger("mlxflow")
        logger.info("removed %d stale temp file(s) left by killed writers: %s", len(removed),
                              ", ".join(str(p.relative_to(run_dir)) for p in removed[:5]))
    return removed
