"""The layout keeps its shape: packages by concern with imports that go one way, small modules and
functions, Hydra's internals in one module, torch only where training needs it, and tests that
steer the code through seams rather than by replacing its globals."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "cnnlab"
TESTS = ROOT / "tests"
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS = 600, 60, 7
# What each part of cnnlab may import besides the top-level modules (config, statistics, ...).
# The top level imports no package; data flows cli -> train -> instruments, and analysis reads runs.
MAY_IMPORT = {
    "": set(),
    "instruments": set(),
    "analysis": set(),
    "train": {"instruments", "analysis"},
    "cli": {"train", "analysis", "instruments"},
}
TORCH_FREE = ("cnnlab.cli", "cnnlab.config", "cnnlab.statistics", "cnnlab.status", "cnnlab.activations",
              "cnnlab.datasets", "cnnlab.rundir", "cnnlab.train.resume", "cnnlab.train.stops")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path) -> set[str]:
    """The cnnlab modules a module imports, at its top or inside functions (not for type checking)."""
    tree = ast.parse(path.read_text())
    checking_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and ast.unparse(block.test) == "TYPE_CHECKING" for node in ast.walk(block)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in checking_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cnnlab"):
            names |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("cnnlab")}
    return names


def cnnlab_imports() -> dict[str, set[str]]:
    known = modules()
    return {name: {imported for imported in imports_of(path) if imported in known and imported != name}
            for name, path in known.items()}


def part(module: str) -> str:
    """cnnlab.train.loop -> train; cnnlab.config -> '' (the top level)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (SOURCE / parts[1]).is_dir()) else ""


def test_the_module_graph_has_no_cycle():
    graph = cnnlab_imports()
    visiting, done = [], set()

    def visit(name):
        if name in visiting:
            raise AssertionError("import circle: " + " -> ".join([*visiting[visiting.index(name):], name]))
        if name in done:
            return
        visiting.append(name)
        for imported in graph[name]:
            visit(imported)
        visiting.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_imports_go_one_way_between_the_packages():
    wrong = [f"{name} imports {imported}" for name, imported_ in cnnlab_imports().items() for imported in imported_
             if part(imported) not in {"", part(name)} | MAY_IMPORT[part(name)] and name != "cnnlab.__main__"]
    assert not wrong


def test_the_layer_rule_sees_a_wrong_import():
    assert part("cnnlab.analysis.findings") == "analysis" and part("cnnlab.config") == ""
    assert part("cnnlab.train.loop") not in {"", "analysis"} | MAY_IMPORT["analysis"]  # analysis may not import train


def test_modules_and_functions_stay_small():
    too_big = []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                parameters = [a for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg)
                              if a is not None and a.arg not in ("self", "cls")]
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES or len(parameters) > MAX_PARAMETERS:
                    too_big.append(f"{name}.{node.name}: {lines} lines, {len(parameters)} parameters")
    assert not too_big


def test_hydra_internals_are_used_in_one_module_only():
    users = [name for name, path in modules().items() if "hydra._internal" in path.read_text()
             and any(line.lstrip().startswith(("from hydra._internal", "import hydra._internal"))
                     for line in path.read_text().splitlines())]
    assert users == ["cnnlab.cli.hydra_api"]


def test_no_config_names_a_class_to_instantiate():
    offending = [str(path) for path in (ROOT / "configs").rglob("*.yaml") if "_target_" in path.read_text()]
    assert not offending


def test_the_command_line_and_the_tables_load_without_torch():
    code = (f"import sys; import {', '.join(TORCH_FREE)}; "
            "print([m for m in ('torch', 'torchvision', 'matplotlib') if m in sys.modules])")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


def _cnnlab_aliases(tree: ast.Module) -> set[str]:
    """Names a test file binds to cnnlab modules (`from cnnlab import cli`, `import cnnlab.x as y`)."""
    known, aliases = modules(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cnnlab"):
            aliases |= {alias.asname or alias.name for alias in node.names if f"{node.module}.{alias.name}" in known}
        elif isinstance(node, ast.Import):
            aliases |= {alias.asname for alias in node.names if alias.name.startswith("cnnlab") and alias.asname}
    return aliases


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda path: path.name)
def test_tests_use_seams_not_private_helpers_or_patched_globals(path):
    tree = ast.parse(path.read_text())
    aliases = _cnnlab_aliases(tree)
    wrong = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cnnlab"):
            wrong += [f"line {node.lineno}: imports {alias.name}" for alias in node.names if alias.name.startswith("_")]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            wrong.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("monkeypatch.setattr", "monkeypatch.setitem") \
                and node.args:
            target = node.args[0]
            if (isinstance(target, ast.Name) and target.id in aliases) or (
                    isinstance(target, ast.Constant) and str(target.value).startswith("cnnlab.")):
                wrong.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    assert not wrong


def test_the_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("### Extending cnnlab")]
    missing = [name for name, path in modules().items()
               if path.name != "__main__.py" and not (path.name == "__init__.py" and path.stat().st_size < 10)
               and f" {path.name} " not in layout.replace("\n", " ").replace("/", "/ ")]
    assert not missing
