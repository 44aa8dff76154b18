"""The version seam: the ranges pyproject allows, the window the tests ran on, constraints.txt and CI agree."""
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from turbotune import _compat

from turbotune.health import check as health
ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def test_constraints_inside_the_tested_window():
    pins = _pins()
    for name, (low, high) in _compat.TESTED_VERSIONS.items():
        if name == "torch":  # pinned on the command line, not in the file
            assert "torch" not in pins
            continue
        minor = _compat._minor(pins[name])
        assert _compat._minor(low) <= minor <= _compat._minor(high), (name, pins[name])


def test_pyproject_ranges_are_the_supported_ranges():
    seen = set()
    for req in _requirements():
        if req.name in _compat.TESTED_RANGES:
            low, high = _compat.TESTED_RANGES[req.name]
            bounds = {(s.operator, Version(s.version)) for s in req.specifier}
            assert bounds == {(">=", Version(low)), ("<", Version(high))}, req
            seen.add(req.name)
    assert seen == set(_compat.TESTED_RANGES)


def test_every_pin_satisfies_pyproject():
    pins = _pins()
    for req in _requirements():
        if req.name.lower() in pins:
            assert req.specifier.contains(pins[req.name.lower()], prereleases=True), (req, pins[req.name.lower()])


def test_untested_version_warns_but_passes(monkeypatch):
    real = _compat.package_version
    monkeypatch.setattr(_compat, "package_version", lambda n: "5.99.1" if n == "transformers" else real(n))
    assert ("transformers", "5.99.1", "5.17", "5.25") in _compat.untested()
    found = health.check_versions()
    (w,) = [f for f in found if f.name == "version-untested"]
    assert w.kind == "warning" and "transformers 5.99.1" in w.message and "'transformers>=5.17,<5.26'" in w.fix
    assert not [f for f in found if f.kind == "problem"]


@pytest.mark.parametrize("version", ["5.17.0", "5.25.3", "5.25.0.dev0"])
def test_tested_versions_do_not_warn(monkeypatch, version):
    monkeypatch.setattr(_compat, "package_version", lambda n: version if n == "transformers" else None)
    assert _compat.untested() == []


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    readme = (ROOT / "README.md").read_text()
    quick = re.search(r"^## Quick start\n(.*?)^## ", readme, re.M | re.S).group(1)
    block = re.search(r"```bash\n(.*?)```", quick, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2 and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
    assert "python3 -m venv" in ci and ci.index("python3 -m venv") < ci.index(commands[1])
    assert all("-c constraints.txt" in c for c in commands)
