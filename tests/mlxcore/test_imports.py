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
    modules = [m.name for m in pkgutil.walk_packages([str(ROOT)], "mlxcore.")]
    assert "mlxcore.train" in modules and "mlxcore.data.loader" in modules
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + \
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
