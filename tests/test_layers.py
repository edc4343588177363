"""The library stands alone: no module of lregions_core imports Prefect or the application
(flows, tasks), and the library's commands work where Prefect cannot even be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Makes prefect, flows and tasks (and their submodules) unimportable in a fresh interpreter.
BLOCK = r"""
import importlib.abc, sys
BLOCKED = ("prefect", "flows", "tasks")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the library must not import it")
sys.meta_path.insert(0, Block())
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code, *args], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=600)


def test_every_library_module_imports_without_prefect_or_the_application():
    done = _python(r"""
import importlib, json, pkgutil
import lregions_core
names = [m.name for m in pkgutil.walk_packages(lregions_core.__path__, "lregions_core.")]
failed = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"modules": names, "failed": failed,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
""")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["modules"]) >= 25  # every module was found, models/ included
    assert report["failed"] == {} and report["loaded"] == []


def test_no_library_source_names_prefect_or_the_application_even_inside_functions():
    """Lazy imports (inside a function) do not run when a module is imported: read them all."""
    import ast

    found = []
    for path in sorted((ROOT / "lregions_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "heavy_import":
                names = [a.value for a in node.args if isinstance(a, ast.Constant)]
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name in names
                      if str(name).split(".")[0] in ("prefect", "flows", "tasks")]
    assert found == []


def test_library_commands_run_without_prefect(tmp_path):
    out = tmp_path / "one"
    done = _python(r"""
import sys
from lregions_core.cli import main
assert main(["presets"]) == 0
code = main(["edit-image", "skimage:chelsea", "a red hat", "--preset", "tiny", "--set",
             "num_anchors=2", "--set", "iterations=1", "--out", sys.argv[1]])
sys.exit(code)
""", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "oracle:" in done.stdout  # the preset listing
    assert (out / "final.png").is_file() and (out / "result.json").is_file()


def test_the_lregions_command_imports_prefect_only_for_batch_commands():
    code = ("import sys; from flows.cli import main; code = main(['presets']);"
            " print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect')); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
