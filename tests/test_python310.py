"""The project claims ``requires-python >= 3.10`` (ComfyUI supports 3.10), so nothing it imports may exist only in
Python 3.11+ unless guarded with a declared fallback (issue 20, defect 6: ``training/config.py`` imported
``tomllib``, new in 3.11). Checked three ways: the standard-library modules the code imports unguarded, against
the module list of a real Python 3.10 interpreter when this machine has one; a ``--config`` TOML file read by
the trainer in a fresh process where ``tomllib`` is absent, as on 3.10; and pyproject's dependencies, which on
3.10 must bring the fallback (tomli)."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "tdm_core", "nodes", "benchmarks")


def pyproject() -> dict:
    from training.config import tomllib  # tomli on Python 3.10

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def python310() -> str | None:
    for candidate in (shutil.which("python3.10"), *sorted(Path.home().glob(".pyenv/versions/3.10*/bin/python3.10"))):
        if candidate and subprocess.run([str(candidate), "-c", "pass"], capture_output=True).returncode == 0:
            return str(candidate)
    return None


def unguarded_imports(path: Path) -> set[str]:
    """Top-level module names imported outside a ``try: ... except ImportError/ModuleNotFoundError``."""
    tree = ast.parse(path.read_text(), str(path))
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    names = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_requires_python_admits_310():
    from packaging.specifiers import SpecifierSet

    assert "3.10" in SpecifierSet(pyproject()["project"]["requires-python"])


def test_no_unguarded_import_of_a_module_python_310_lacks():
    interpreter = python310()
    if interpreter is None:
        pytest.skip("no Python 3.10 interpreter on this machine to read its standard-library list from")
    theirs = set(json.loads(subprocess.run([interpreter, "-c", "import sys, json; print(json.dumps(sorted(sys.stdlib_module_names)))"],
                                           capture_output=True, text=True, check=True).stdout))
    newer = set(sys.stdlib_module_names) - theirs  # in this Python's standard library, not in 3.10's
    assert "tomllib" in newer  # the check can see the module of issue 20
    files = [ROOT / "__init__.py", *(f for package in PACKAGES for f in (ROOT / package).rglob("*.py"))]
    offending = {str(f.relative_to(ROOT)): sorted(unguarded_imports(f) & newer) for f in files}
    offending = {k: v for k, v in offending.items() if v}
    assert not offending, f"modules Python 3.10 lacks, imported without a fallback (requires-python >= 3.10): {offending}"


def test_a_toml_config_is_read_where_tomllib_does_not_exist(tmp_path):
    """A fresh process of the venv with tomllib made unimportable (Python 3.10) reads ``--config run.toml``."""
    config = tmp_path / "run.toml"
    config.write_text('model = "teacher"\nprompts = "prompts.txt"\noutput = "out.safetensors"\nmax_train_steps = 7\ncfg = 4.5\n')
    probe = ("import sys; sys.modules['tomllib'] = None\n"  # what `import tomllib` meets on Python 3.10
             "from training.config import read_config_file\n"
             f"print(sorted(read_config_file({str(config)!r}).items()))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    assert "('max_train_steps', 7)" in process.stdout and "('cfg', 4.5)" in process.stdout


def test_on_python_310_the_train_extra_installs_the_toml_fallback():
    from packaging.requirements import Requirement

    py310 = {"python_version": "3.10", "python_full_version": "3.10.13"}
    train = [Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["train"]]
    installed_on_310 = {r.name for r in train if r.marker is None or r.marker.evaluate(py310)}
    installed_on_311 = {r.name for r in train if r.marker is None or r.marker.evaluate({"python_version": "3.11"})}
    assert "tomli" in installed_on_310 and "tomli" not in installed_on_311
