"""Test-wide setup: Triton runs in its CPU interpreter where no GPU is present, and `gpu` tests skip."""
import os
import shutil

# Must happen before triton is first imported anywhere: without a GPU the kernels run interpreted.
if shutil.which("nvidia-smi") is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; the reason names the GPU test that covers it")
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(
                reason=f"needs a CUDA GPU: run `pytest -m gpu {item.nodeid}` on a GPU machine"))
