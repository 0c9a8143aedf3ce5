import subprocess
import sys

import pytest

from mgral.errors import ConfigError
from mgral.registry import Registry


def test_import_is_cheap_and_silent():
    code = "import sys, mgral; print([m for m in ('torch', 'numpy', 'torchvision', 'matplotlib') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert out.stderr == ""


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "mgral", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "convert" in out.stdout and "evaluate" in out.stdout


def test_registry_lists_valid_names_for_unknown():
    reg: Registry[int] = Registry("widget")
    reg.add("b", 2, "second")
    reg.add("a", 1, "first")
    assert reg.get("a") == 1
    assert reg.names() == ["a", "b"]
    with pytest.raises(ConfigError, match=r"unknown widget 'c'; valid widgets: a, b"):
        reg.get("c")
    strategies: Registry[int] = Registry("strategy")
    strategies.add("x", 1, "only")
    with pytest.raises(ConfigError, match=r"unknown strategy 'y'; valid strategies: x$"):
        strategies.get("y")
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 3, "dup")


def _import_graph() -> dict[str, set[str]]:
    """mgral module -> the mgral modules it imports, lazy (in-function) imports included."""
    import ast
    from pathlib import Path

    import mgral

    root = Path(mgral.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = ("mgral", *path.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mgral"):
                targets = [owner(f"{node.module}.{a.name}") for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [owner(a.name) for a in node.names if a.name.startswith("mgral")]
            else:
                continue
            graph[module].update(t for t in targets if t != module)
    return graph


def test_no_import_cycle_in_the_package():
    import graphlib

    try:
        tuple(graphlib.TopologicalSorter(_import_graph()).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_no_module_imports_another_modules_private_names():
    import ast
    from pathlib import Path

    import mgral

    found = []
    for path in Path(mgral.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mgral"):
                found += [
                    f"{path.name}: from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not found, found
