"""mlxcore is a library: it must never import the orchestrator."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import mlxcore

ROOT = Path(mlxcore.__file__).parent


def test_no_prefect_import_statement_in_mlxcore():
    offenders = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path}:{node.lineno}" for n in names if n.split(".")[0] == "prefect"]
    assert offenders == []


def test_importing_every_mlxcore_module_loads_no_prefect():
    modules = [m.name for m in pkgutil.walk_packages([str(ROOT)], "mlxcore.") if m.name != "mlxcore.__main__"]
    assert "mlxcore.train.loop" in modules and "mlxcore.data.loader" in modules
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + \
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, edges = work[-1]
            for w in edges:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_no_import_cycle_in_mlxcore():
    """Module-level and function-level imports both count; a package importing its own children
    does not (that is how packages expose them)."""
    from tasks.caching import module_imports

    modules = ["mlxcore"] + [m.name for m in pkgutil.walk_packages([str(ROOT)], "mlxcore.")]
    graph = {m: {t for t in module_imports(m) if t != m and not t.startswith(m + ".") and t.startswith("mlxcore")}
             for m in modules}
    assert _cycles(graph) == []
    # the check finds a cycle when there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_commands_run_without_prefect(tmp_path):
    """`python -m mlxcore ...` (and the `mlxcore` script) needs no orchestrator: a command runs
    and answers with its own name, and prefect is never imported."""
    (tmp_path / "run" / ".tmp-x~elsewhere~1~1~1").mkdir(parents=True)
    code = ("import sys; from mlxcore.cli import main; rc = main(['clean', sys.argv[1], '--dry-run']); "
            "rc2 = main(['fuse', '--adapter', sys.argv[1], '--out', sys.argv[1] + '/x']); "
            "print(rc, rc2, sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "unknown" in out.stdout and out.stdout.strip().endswith("0 2 []")
    assert f"mlxcore: error: {tmp_path / 'run'}: not an adapter dir" in out.stderr
