"""The version seam: outside `_compat.py` no module of the package compares or parses a library's version, or
reads a library's source or signatures to find out its shape. Such knowledge goes into `_compat.py` as a small
named function (see its docstrings); everything else asks it.

Reading versions to report them (`turbotune check`, the bench header, `--version`) is not a check and passes.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "turbotune"
SEAM = PACKAGE / "_compat.py"

# Calls that parse or compare versions, read source, or probe a signature, by the called name.
VERSION_CALLS = {"Version", "parse_version", "LooseVersion", "StrictVersion", "transformers_version"}
SHAPE_CALLS = {"getsource", "getsourcelines", "signature"}
VERSION_MODULES = {"packaging.version", "distutils.version", "pkg_resources"}
VERSION_NAMES = {"__version__", "version_info"}
# (path under src/turbotune, the offending line stripped) -> why it is no library seam (pure reporting, or the
# user's own code checked as input). Keep it short.
ALLOWED: dict[tuple[str, str], str] = {
    ("training/rewards.py", "params = inspect.signature(func).parameters.values()"):
        "the user's reward function, checked before the model loads: input validation, not a library's shape",
}


def _name(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _mentions_version(node) -> bool:
    return any(_name(n) in VERSION_NAMES for n in ast.walk(node))


def violations(source: str) -> list[tuple[int, str]]:
    """(line, what) for every version comparison or parse, or source/signature probe, in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"imports {a.name}") for a in node.names
                      if a.name in VERSION_MODULES or a.name.startswith("packaging.version")]
        elif isinstance(node, ast.ImportFrom):
            names = {a.name for a in node.names}
            if node.module in VERSION_MODULES or (node.module == "packaging" and "version" in names):
                found.append((node.lineno, f"imports from {node.module}"))
            elif names & (VERSION_CALLS | SHAPE_CALLS):
                found.append((node.lineno, f"imports {sorted(names & (VERSION_CALLS | SHAPE_CALLS))}"))
        elif isinstance(node, ast.Call):
            called = _name(node.func)
            if called in VERSION_CALLS:
                found.append((node.lineno, f"calls {called}()"))
            elif called in SHAPE_CALLS:
                found.append((node.lineno, f"calls {called}() (reads a library's source or signature)"))
            elif isinstance(node.func, ast.Attribute) and _mentions_version(node.func.value):
                found.append((node.lineno, f"calls .{called}() on a version"))  # __version__.startswith(...)
        elif isinstance(node, ast.Compare):
            ops = [op for op in node.ops if not isinstance(op, (ast.Is, ast.IsNot))]
            if ops and any(_mentions_version(n) for n in [node.left, *node.comparators]):
                found.append((node.lineno, "compares a version"))
        elif isinstance(node, (ast.Name, ast.Attribute)) and _name(node) == "version_info":
            found.append((node.lineno, "reads version_info"))
        elif isinstance(node, ast.Subscript) and _mentions_version(node.value):
            found.append((node.lineno, "indexes a version"))  # __version__[0], version_info[:2]
    return sorted(set(found))


def test_no_version_checks_outside_compat():
    assert SEAM.exists()
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == SEAM:
            continue
        rel = path.relative_to(PACKAGE).as_posix()
        lines = path.read_text().splitlines()
        for line, what in violations(path.read_text()):
            if (rel, lines[line - 1].strip()) not in ALLOWED:
                problems.append(f"src/turbotune/{rel}:{line}: {what}: {lines[line - 1].strip()}")
    assert not problems, ("version or shape checks outside src/turbotune/_compat.py; move each into _compat.py as "
                          "a named function:\n" + "\n".join(problems))


def test_allowlist_entries_still_exist():
    for (rel, text), why in ALLOWED.items():
        assert why, rel
        assert text in [line.strip() for line in (PACKAGE / rel).read_text().splitlines()], (rel, text)


@pytest.mark.parametrize("source", [
    "from packaging.version import Version",
    "from packaging import version",
    "import packaging.version",
    "ok = Version(transformers.__version__) >= Version('5.0')",
    "ok = transformers.__version__ >= '5.0'",
    "ok = '5.0' < torch.__version__",
    "ok = torch.__version__.startswith('2.')",
    "major = int(torch.__version__[0])",
    "import sys\nold = sys.version_info < (3, 10)",
    "from pkg_resources import parse_version",
    "import inspect\nsrc = inspect.getsource(fn)",
    "import inspect\nps = inspect.signature(fn).parameters",
    "from inspect import getsource",
    "from ._compat import transformers_version\nnew = transformers_version().major >= 5",
])
def test_catches(source):
    assert violations(source), source


@pytest.mark.parametrize("source", [
    "versions = {'torch': torch.__version__}",  # reporting
    "print(f'turbotune {__version__}')",
    "from . import __version__",
    "v = package_version('peft') or 'not installed'",
    "'''Checked in the source with inspect.getsource, not by Version(...)'''",  # prose
    "missing = torch.__version__ is None",
])
def test_passes(source):
    assert not violations(source), source
