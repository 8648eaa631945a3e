"""MultiLoRALinear against an independent float64 reference: an explicit loop over examples."""
import itertools

import pytest
import torch
from torch import nn

from mage.lora import (MultiLoRALinear, iter_multi_lora, reset_fisher, set_example_scale,
                       set_track_fisher, set_trainable_groups, wrap_llama_lora)
from mage.lora_function import dropout_mask

ALL_SUBSETS = [s for k in range(5) for s in itertools.combinations(range(4), k)]


def make_layer(d_in, d_out, rank=3, dropout=0.0, bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = MultiLoRALinear(nn.Linear(d_in, d_out, bias=bias).to(dtype), rank=rank, dropout=dropout)
    with torch.no_grad():  # B = 0 at init would make every A-gradient zero: test with a live B
        for p in layer.lora_B_groups:
            p.normal_(std=0.2)
    return layer


def reference(layer, x, w, c, mask):
    """Per-example gradients by a Python loop over examples, float64: the sum and the c-scaled squares."""
    A = layer.lora_A.detach().double().clone().requires_grad_()
    B = layer.lora_B.detach().double().clone().requires_grad_()
    W, b = layer.base.weight.double(), layer.base.bias
    b = None if b is None else b.double()
    gA, gB = torch.zeros_like(A), torch.zeros_like(B)
    fA, fB = torch.zeros_like(A), torch.zeros_like(B)
    x = x.detach().double().requires_grad_()
    dx = torch.zeros_like(x)
    for n in range(x.shape[0]):
        xn = x[n]
        y = nn.functional.linear(xn, W, b) + layer.scaling * ((xn * mask[n]) @ A.t()) @ B.t()
        a, bb, d = torch.autograd.grad((y * w[n]).sum(), (A, B, x))
        gA += a
        gB += bb
        dx += d
        fA += (c[n] * a) ** 2
        fB += (c[n] * bb) ** 2
    return gA, gB, fA, fB, dx


def run_layer(layer, x, w, c):
    layer.train()
    layer.track_fisher = True
    layer.example_scale = c
    layer.reset_fisher()
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * w).sum().backward()
    return y, x.grad


@pytest.mark.parametrize("shape", [(3, 5, 13, 11), (1, 7, 9, 17), (4, 1, 10, 6), (2, 3, 1, 5)])
@pytest.mark.parametrize("groups", [(0, 1, 2, 3), (0, 2), (1,), (0, 1, 3)])
def test_gradients_and_fisher_match_per_example_loop(shape, groups):
    B_, T, d_in, d_out = shape
    layer = make_layer(d_in, d_out)
    layer.set_trainable_groups(groups)
    x = torch.randn(B_, T, d_in, dtype=torch.float64)
    w = torch.randn(B_, T, d_out, dtype=torch.float64)
    c = torch.rand(B_, dtype=torch.float64) * 3 + 0.5  # c_n != 1 and different per example
    _, dx = run_layer(layer, x, w, c)
    gA, gB, fA, fB, dx_ref = reference(layer, x, w, c, torch.ones_like(x))
    torch.testing.assert_close(dx, dx_ref)
    r = layer.rank
    for g in range(4):
        rows = slice(g * r, (g + 1) * r)
        if g in groups:
            torch.testing.assert_close(layer.lora_A_groups[g].grad, gA[rows])
            torch.testing.assert_close(layer.lora_B_groups[g].grad, gB[:, rows])
            torch.testing.assert_close(layer.fisher_A[rows].double(), fA[rows], rtol=1e-5, atol=0)
            torch.testing.assert_close(layer.fisher_B[:, rows].double(), fB[:, rows], rtol=1e-5, atol=0)
        else:
            assert layer.lora_A_groups[g].grad is None and layer.lora_B_groups[g].grad is None
            assert not layer.fisher_A[rows].any() and not layer.fisher_B[:, rows].any()
    assert layer.fisher_count.item() == B_


def test_fisher_is_not_the_squared_batch_gradient():
    layer = make_layer(8, 6)
    x, w = torch.randn(4, 5, 8, dtype=torch.float64), torch.randn(4, 5, 6, dtype=torch.float64)
    run_layer(layer, x, w, None)
    batch_sq = torch.cat([p.grad for p in layer.lora_A_groups]) ** 2
    assert not torch.allclose(layer.fisher_A.double(), batch_sq, rtol=1e-3)
    _, _, fA, _, _ = reference(layer, x, w, torch.ones(4, dtype=torch.float64), torch.ones_like(x))
    torch.testing.assert_close(layer.fisher_A.double(), fA, rtol=1e-5, atol=0)


@pytest.mark.parametrize("groups", ALL_SUBSETS)
def test_every_subset_of_groups(groups):
    layer = make_layer(7, 5, rank=2)
    layer.set_trainable_groups(groups)
    x, w = torch.randn(2, 3, 7, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    c = torch.tensor([2.0, 0.5], dtype=torch.float64)
    _, dx = run_layer(layer, x, w, c)
    gA, gB, fA, fB, dx_ref = reference(layer, x, w, c, torch.ones_like(x))
    torch.testing.assert_close(dx, dx_ref)
    trained = torch.zeros(8, dtype=torch.bool)
    for g in groups:
        trained[g * 2:(g + 1) * 2] = True
        torch.testing.assert_close(layer.lora_A_groups[g].grad, gA[g * 2:(g + 1) * 2])
    torch.testing.assert_close(layer.fisher_A.double()[trained], fA[trained], rtol=1e-5, atol=0)
    torch.testing.assert_close(layer.fisher_B.double()[:, trained], fB[:, trained], rtol=1e-5, atol=0)
    assert not layer.fisher_A[~trained].any() and not layer.fisher_B[:, ~trained].any()


def test_dropout_shares_one_mask_and_matches_reference():
    layer = make_layer(12, 9, dropout=0.3)
    x, w = torch.randn(3, 4, 12, dtype=torch.float64), torch.randn(3, 4, 9, dtype=torch.float64)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # the draw the layer's forward makes
    torch.manual_seed(123)
    _, dx = run_layer(layer, x, w, None)
    mask = dropout_mask(x.shape, 0.3, seed, x.device, x.dtype)
    assert (mask == 0).any() and (mask != 0).any()
    gA, gB, fA, _, dx_ref = reference(layer, x, w, torch.ones(3, dtype=torch.float64), mask)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(torch.cat([p.grad for p in layer.lora_A_groups]), gA)
    torch.testing.assert_close(layer.fisher_A.double(), fA, rtol=1e-5, atol=0)


def test_eval_mode_has_no_dropout_and_two_dim_input_is_one_token_examples():
    layer = make_layer(6, 4, dropout=0.5).eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = layer.base(x) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    layer.dropout = 0.0
    layer.track_fisher = True
    w = torch.randn(5, 4, dtype=torch.float64)
    (layer(x) * w).sum().backward()
    _, _, fA, _, _ = reference(layer, x.unsqueeze(1), w.unsqueeze(1), torch.ones(5, dtype=torch.float64),
                               torch.ones(5, 1, 6, dtype=torch.float64))
    torch.testing.assert_close(layer.fisher_A.double(), fA, rtol=1e-5, atol=0)


def test_padding_examples_with_zero_scale_are_not_counted():
    layer = make_layer(5, 4)
    x, w = torch.randn(3, 2, 5, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)
    run_layer(layer, x, w, torch.tensor([3.0, 0.0, 3.0], dtype=torch.float64))
    assert layer.fisher_count.item() == 2


def test_fisher_accumulates_over_micro_batches_and_resets():
    layer = make_layer(6, 5)
    layer.track_fisher = True
    xs = [torch.randn(2, 3, 6, dtype=torch.float64) for _ in range(2)]
    ws = [torch.randn(2, 3, 5, dtype=torch.float64) for _ in range(2)]
    for x, w in zip(xs, ws):
        (layer(x) * w).sum().backward()
    expected = sum(reference(layer, x, w, torch.ones(2, dtype=torch.float64), torch.ones_like(x))[2]
                   for x, w in zip(xs, ws))
    torch.testing.assert_close(layer.fisher_A.double(), expected, rtol=1e-5, atol=0)
    assert layer.fisher_count.item() == 4
    layer.reset_fisher()
    assert not layer.fisher_A.any() and layer.fisher_count.item() == 0


def test_no_fisher_without_tracking_or_under_no_grad():
    layer = make_layer(6, 5)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    layer(x).sum().backward()
    assert not layer.fisher_A.any() and layer.fisher_count.item() == 0
    layer.track_fisher = True
    with torch.no_grad():
        layer(x)
    assert layer.fisher_count.item() == 0


def test_frozen_groups_bit_identical_and_absent_from_optimizer():
    layer = make_layer(10, 8, dtype=torch.float32)
    layer.set_trainable_groups(["text_in", "image_out"])
    frozen = [layer.lora_A_groups[g].detach().clone() for g in (1, 2)] + \
             [layer.lora_B_groups[g].detach().clone() for g in (1, 2)]
    params = [p for p in layer.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in layer.trainable_parameters()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(2, 3, 10)).pow(2).mean().backward()
        opt.step()
    now = [layer.lora_A_groups[g] for g in (1, 2)] + [layer.lora_B_groups[g] for g in (1, 2)]
    for before, after in zip(frozen, now):
        assert torch.equal(before, after)
    # The trained groups did move (B started at 0), so the test would notice a no-op optimizer.
    assert layer.lora_B_groups[0].detach().abs().sum() > 0 and layer.lora_B_groups[3].detach().abs().sum() > 0


def test_stacked_views_and_init():
    base = nn.Linear(16, 12)
    layer = MultiLoRALinear(base, rank=8)
    assert layer.lora_A.shape == (32, 16) and layer.lora_B.shape == (12, 32)
    assert layer.scaling == 1.0 and not layer.lora_B.any()
    assert 0.005 < layer.lora_A.std().item() < 0.02
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer(x), layer.base(x))  # B = 0: the adapter starts as the identity


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown LoRA group"):
        MultiLoRALinear(nn.Linear(4, 4)).set_trainable_groups(["audio_in"])
    with pytest.raises(ValueError, match="out of range"):
        MultiLoRALinear(nn.Linear(4, 4)).set_trainable_groups([4])
    with pytest.raises(ValueError, match="backend"):
        MultiLoRALinear(nn.Linear(4, 4), backend="cuda")
    with pytest.raises(TypeError, match="nn.Linear"):
        MultiLoRALinear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="shape"):
        MultiLoRALinear(nn.Linear(4, 4))(torch.randn(1, 2, 3, 4))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def test_wrap_llama_targets_every_projection_and_keeps_outputs_at_init():
    llm = tiny_llama()
    ids = torch.randint(0, 50, (2, 7))
    before = llm(ids).logits
    names = wrap_llama_lora(llm, dropout=0.0)
    assert len(names) == 2 * 7
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                    "up_proj", "down_proj"}
    torch.testing.assert_close(llm(ids).logits, before)  # B = 0: the adapters start as the identity
    with pytest.raises(ValueError, match="no nn.Linear"):
        wrap_llama_lora(nn.Sequential(nn.ReLU()))


def test_fisher_through_a_whole_llama_matches_a_loop_over_examples():
    """Through a whole LLaMA: the batched Fisher equals the squares of gradients of each example's own
    loss, computed one example at a time (batch of one) in float64."""
    llm = tiny_llama().double()
    wrap_llama_lora(llm, dropout=0.0)
    for _, m in iter_multi_lora(llm):
        with torch.no_grad():
            for p in m.lora_B_groups:
                p.normal_(std=0.1)
    set_trainable_groups(llm, ["text_in", "text_out"])
    ids = torch.randint(0, 50, (3, 6))
    labels = ids.clone()
    labels[1, :3] = -100  # examples with different numbers of supervised tokens

    def per_example_losses(ids, labels):
        logits = llm(ids).logits[:, :-1]
        tgt = labels[:, 1:]
        ce = nn.functional.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none")
        return ce.sum(1) / (tgt != -100).sum(1)

    # Our path: the mean of the per-example losses, with c_n = batch size.
    set_track_fisher(llm, True)
    set_example_scale(llm, torch.full((3,), 3.0, dtype=torch.float64))
    reset_fisher(llm)
    per_example_losses(ids, labels).mean().backward()
    set_track_fisher(llm, False)
    set_example_scale(llm, None)

    layers = list(iter_multi_lora(llm))
    expected = {name: [torch.zeros_like(m.fisher_A, dtype=torch.float64),
                       torch.zeros_like(m.fisher_B, dtype=torch.float64)] for name, m in layers}
    for n in range(3):
        llm.zero_grad()
        per_example_losses(ids[n:n + 1], labels[n:n + 1]).sum().backward()
        for name, m in layers:
            expected[name][0] += torch.cat([p.grad if p.grad is not None else torch.zeros_like(p)
                                            for p in m.lora_A_groups]) ** 2
            expected[name][1] += torch.cat([p.grad if p.grad is not None else torch.zeros_like(p)
                                            for p in m.lora_B_groups], dim=1) ** 2
    for name, m in layers:
        torch.testing.assert_close(m.fisher_A.double(), expected[name][0], rtol=1e-5, atol=1e-30)
        torch.testing.assert_close(m.fisher_B.double(), expected[name][1], rtol=1e-5, atol=1e-30)
        assert m.fisher_count.item() == 3
        assert m.fisher_A[8:16].abs().sum() == 0 and m.fisher_A[0:8].abs().sum() > 0
