"""What machine a measurement ran on: the line every benchmark result names."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ram_gib() -> float | None:
    """Total RAM in GiB (``/proc/meminfo``), or None where it cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    return None


def cores() -> int:
    return os.cpu_count() or 1


def machine_line(*, gpu_used: bool | None = None) -> str:
    """One line naming the machine and the software versions: CPU model, cores, torch's CPU
    kernels (``torch.backends.cpu.get_cpu_capability()``: training results differ between
    them), RAM, Python, torch and torchvision; ``gpu_used=False`` adds "no GPU used"."""
    import torch
    import torchvision

    ram = ram_gib()
    line = (
        f"{cpu_model()}, {cores()} CPU cores ({torch.backends.cpu.get_cpu_capability()} kernels), "
        f"{'?' if ram is None else int(ram)} GiB RAM, "
        f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}"
    )
    return line + (", no GPU used" if gpu_used is False else "")
