"""MultiLoRALinear gives the same outputs, gradients and Fisher with the fused and the eager backend.

On CPU the fused backend runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET).
"""
import os

import pytest
import torch
from torch import nn

from mage.lora import MultiLoRALinear

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton interpreter must be on before triton is imported; covered by "
           "tests/test_kernels_multi_lora.py::test_kernel_suite_in_fresh_process")


def run(backend, groups, x, w, c, dtype):
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(x.shape[-1], w.shape[-1]).to(dtype), rank=4, backend=backend)
    with torch.no_grad():
        for p in layer.lora_B_groups:
            p.normal_(std=0.2)
    layer.set_trainable_groups(groups)
    layer.track_fisher = True
    layer.example_scale = c
    x = x.clone().requires_grad_()
    (layer(x) * w).sum().backward()
    grads = [p.grad for p in layer.trainable_parameters()]
    return x.grad, grads, layer.fisher_A.clone(), layer.fisher_B.clone(), layer.fisher_count.item()


@pytest.mark.parametrize("groups", [(0, 1, 2, 3), (0, 3), (2,)])
def test_triton_backend_matches_eager(groups):
    x, w = torch.randn(3, 5, 19), torch.randn(3, 5, 13)
    c = torch.tensor([3.0, 0.0, 1.5])
    eager = run("eager", groups, x, w, c, torch.float32)
    fused = run("triton", groups, x, w, c, torch.float32)
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(fused[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused[2], eager[2], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(fused[3], eager[3], rtol=1e-4, atol=1e-9)
    assert fused[4] == eager[4] == 2
