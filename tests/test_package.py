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
