"""GPU tests: `@pytest.mark.gpu` needs one CUDA GPU, `@pytest.mark.gpu(n)` needs n of them.

CPU runs deselect them (pyproject's addopts: -m 'not gpu'). On a GPU machine, `pytest -m gpu`
runs them; one that needs more GPUs than the machine has is skipped with that reason instead of
starting ranks that would wait for devices that do not exist.
"""

import pytest
import torch


def gpus_needed(item: pytest.Item) -> int:
    marker = item.get_closest_marker("gpu")
    if marker is None:
        return 0
    return int(marker.args[0]) if marker.args else 1


def pytest_runtest_setup(item: pytest.Item) -> None:
    needed = gpus_needed(item)
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if needed > available:
        pytest.skip(f"needs {needed} CUDA GPU(s); this machine has {available}")


pytest_plugins = ["pytester"]  # tests/test_gpu_marker.py runs pytest on a small test file
