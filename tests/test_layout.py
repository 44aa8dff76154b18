"""The package layout is the architecture: every import between turbotune's layers runs one way, and no two
modules import each other at module level.

    cli ─┬─> bench ─┬─> health ─> (facade: fast_model, inference) ─┬─> training ─> planner ─> model ─> data ─> base
         └──────────┴──────────────────────────────────> export ───┘
`base` is `_compat` and `errors`. A layer may import its own modules and the layers listed for it in ALLOWED
(function-level imports count too). README's "Layout" section draws the same picture.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "turbotune"
BASE = {"_compat", "errors"}
FACADE = {"fast_model", "inference", "__init__", "__main__"}
ALLOWED = {
    "base": {"base"},
    "data": {"base"},
    "model": {"base", "data"},
    "planner": {"base", "model"},
    "training": {"base", "data", "model", "planner"},
    "export": {"base", "data", "model", "training"},
    "facade": {"base", "data", "model", "training", "planner", "export"},
    "health": {"base", "data", "model", "planner", "training", "facade"},
    "bench": {"base", "data", "model", "planner", "training", "facade", "export"},
    "cli": {"base", "data", "model", "planner", "training", "facade", "export", "health", "bench"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "facade"  # the package itself
    if parts[1] in ALLOWED:
        return parts[1]
    if parts[1] == "__main__":
        return "cli"  # `python -m turbotune`
    return "base" if parts[1] in BASE else "facade" if parts[1] in FACADE else parts[1]


def imports(path: Path, module_level_only: bool = False) -> set[str]:
    """The turbotune modules `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "turbotune"}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] != "turbotune":
                continue
            for a in node.names:  # `from turbotune.x import y`: y may be a module of its own
                sub = f"{target}.{a.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (PACKAGE.parent / Path(*sub.split("."))).is_dir()
                found.add(sub if is_module else target)
    return found


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_known_layer():
    unknown = {module_name(p) for p in sources() if layer(module_name(p)) not in ALLOWED}
    assert not unknown, f"modules outside the layers of tests/test_layout.py: {sorted(unknown)}"


def test_imports_run_one_way():
    bad = []
    for path in sources():
        here = module_name(path)
        for target in imports(path):
            if layer(target) != layer(here) and layer(target) not in ALLOWED[layer(here)]:
                bad.append(f"{here} ({layer(here)}) imports {target} ({layer(target)})")
    assert not bad, "\n".join(bad)


def test_no_import_circles_at_module_level():
    graph = {module_name(p): {t for t in imports(p, module_level_only=True)} for p in sources()}
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert not cycles, " | ".join(" -> ".join(c) for c in cycles)


def test_planner_shapes_is_a_leaf():
    """The planner's shapes (and the presets the bench builds from them) import nothing of turbotune's but errors."""
    assert imports(PACKAGE / "planner" / "shapes.py") <= {"turbotune.errors"}


def test_the_layer_test_sees_a_violation(tmp_path, monkeypatch):
    """The checker itself: a model-layer module importing the trainer is reported."""
    fake = tmp_path / "turbotune" / "model" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from turbotune.training import trainer\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "turbotune")
    assert layer(module_name(fake)) == "model" and "turbotune.training" in " ".join(imports(fake))


def test_modules_and_functions_stay_small():
    """No module over 500 lines, no function over 80: split by concern before that."""
    big = []
    for path in sources():
        text = path.read_text()
        if text.count("\n") > 500:
            big.append(f"{module_name(path)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                big.append(f"{module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not big, "\n".join(big)
