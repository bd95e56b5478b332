"""The core never imports an engine: every module of fedml_pfedmoap and benchmark_suite outside the engine
subpackages imports in a fresh interpreter without loading FedML, Flower, Ray or MPI (docs/install.md).

In .venv the engines are installed, so an import of one would show in ``sys.modules``; in .venv-flower FedML is absent,
so a core module importing it would fail outright. Either way the core install (no extras) keeps working.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE_PACKAGES = ("fedml_pfedmoap.fedml_plugin", "fedml_pfedmoap.flower", "benchmark_suite.ray_executor")
ENGINE_MODULES = ("fedml", "flwr", "ray", "mpi4py")

SCRIPT = r"""
import importlib, json, pkgutil, sys
skip, engines = json.loads(sys.argv[1])

def walk(name):
    # Find every module under `name` without importing the skipped engine packages (pkgutil.walk_packages would).
    pkg = importlib.import_module(name)
    found = [name]
    for info in pkgutil.iter_modules(pkg.__path__, name + "."):
        if info.name in skip:
            continue
        found += walk(info.name) if info.ispkg else [info.name]
    return found

names = walk("fedml_pfedmoap") + walk("benchmark_suite")
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in engines)
print(json.dumps({"modules": names, "engines": loaded}))
"""


def core_imports(skip=ENGINE_PACKAGES):
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([list(skip), list(ENGINE_MODULES)])],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_core_modules_import_no_engine():
    seen = core_imports()
    # the walk really covered the core: the simulator, every algorithm module, tracking and the harness's CLI
    on_disk = {p.stem for p in (ROOT / "fedml_pfedmoap" / "algorithms").glob("*.py") if p.stem != "__init__"}
    assert {f"fedml_pfedmoap.algorithms.{m}" for m in on_disk} <= set(seen["modules"])
    assert {"fedml_pfedmoap.federated.simulator", "fedml_pfedmoap.tracking", "benchmark_suite.cli",
            "fedml_pfedmoap.__main__"} <= set(seen["modules"])
    assert not any(m.startswith(ENGINE_PACKAGES) for m in seen["modules"])
    assert seen["engines"] == [], f"core modules loaded engine modules: {seen['engines'][:10]}"


@pytest.mark.fedml
def test_the_check_sees_an_engine_import():
    """The same walk with the FedML plugin included does load FedML (its adapters import it): the check can fail."""
    seen = core_imports(skip=("fedml_pfedmoap.flower",))
    assert "fedml_pfedmoap.fedml_plugin.cross_silo" in seen["modules"]
    assert "fedml" in seen["engines"]


def test_a_test_of_a_missing_extra_fails_not_skips(tmp_path):
    """tests/conftest.py: a test marked for an extra that this environment lacks errors out, naming the extra."""
    import importlib.util

    from conftest import EXTRA_MODULES

    marker = next(m for m, mod in EXTRA_MODULES.items() if importlib.util.find_spec(mod) is None)
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "pytest.ini").write_text((ROOT / "pytest.ini").read_text().replace("testpaths = tests\n", ""))
    (tmp_path / "test_marked.py").write_text(f"import pytest\n\n@pytest.mark.{marker}\ndef test_x():\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "test_marked.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1, out.stdout[-2000:]
    assert f"install the [{marker}] extra" in out.stdout and "\n1 error in" in out.stdout, out.stdout[-2000:]
    assert "skipped" not in out.stdout
