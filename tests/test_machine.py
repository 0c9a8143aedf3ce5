"""The machine line every benchmark result names."""

import torch

from mgral._machine import machine_line


def test_the_machine_line_names_the_cpu_kernels_and_versions():
    line = machine_line(gpu_used=False)
    # training results differ between CPU kernels (AVX2 or not): the line must say which ran
    assert f"({torch.backends.cpu.get_cpu_capability()} kernels)" in line
    assert f"torch {torch.__version__}" in line and line.endswith(", no GPU used")
    assert not machine_line().endswith("no GPU used")
