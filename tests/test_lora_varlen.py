"""MultiLoRALinear on packed batches (cu_seqlens) and its guard against a second use in one backward.

Eager backend only (the Triton path's packed batches are tested in test_kernels_multi_lora.py).
"""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mage.lora import MultiLoRALinear, set_cu_seqlens


def make_layer(d_in=12, d_out=10, seed=0):
    torch.manual_seed(seed)
    layer = MultiLoRALinear(nn.Linear(d_in, d_out), rank=2, backend="eager")
    with torch.no_grad():
        for p in layer.lora_B_groups:
            p.normal_(std=0.3)
    layer.set_trainable_groups((0, 1, 3))
    layer.track_fisher = True
    return layer


def test_packed_batch_gives_the_fisher_of_the_padded_batch():
    lengths = [3, 1, 6]
    padded_x = torch.randn(3, 6, 12)
    padded_w = torch.randn(3, 6, 10)
    valid = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    padded_x[~valid], padded_w[~valid] = 0, 0
    c = torch.tensor([1.0, 2.0, 0.5])

    padded = make_layer()
    padded.example_scale = c
    (padded(padded_x) * padded_w).sum().backward()

    packed = make_layer()
    packed.example_scale = c
    set_cu_seqlens(packed, torch.tensor([0, 3, 4, 10], dtype=torch.int32))
    x, w = padded_x[valid], padded_w[valid]  # (10, 12), (10, 10): tokens in example order
    (packed(x) * w).sum().backward()

    torch.testing.assert_close(packed.fisher_A, padded.fisher_A)
    torch.testing.assert_close(packed.fisher_B, padded.fisher_B)
    assert packed.fisher_count.item() == padded.fisher_count.item() == 3
    for a, b in zip(packed.trainable_parameters(), padded.trainable_parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    # Without the boundaries the packed tokens would be ten one-token examples: a different Fisher.
    one_token = make_layer()
    (one_token(x) * w).sum().backward()
    assert not torch.allclose(one_token.fisher_A, padded.fisher_A)


def test_module_used_twice_in_one_backward_raises():
    layer = make_layer()
    x = torch.randn(2, 4, 12)
    with pytest.raises(RuntimeError, match="more than once in one backward pass"):
        (layer(x) + layer(x)).sum().backward()
    # Twice without the Fisher is ordinary weight sharing; twice in separate backward passes is accumulation.
    layer.track_fisher = False
    (layer(x) + layer(x)).sum().backward()
    layer.track_fisher = True
    layer(x).sum().backward()
    layer(x).sum().backward()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_is_one_use(use_reentrant):
    x = torch.randn(2, 4, 12, requires_grad=True)
    plain, ckpt = make_layer(), make_layer()
    plain(x).square().sum().backward()
    checkpoint(ckpt, x, use_reentrant=use_reentrant).square().sum().backward()
    torch.testing.assert_close(ckpt.fisher_A, plain.fisher_A)
    torch.testing.assert_close(ckpt.fisher_B, plain.fisher_B)
    assert ckpt.fisher_count.item() == plain.fisher_count.item() == 2
