"""PEMA reference (mage.pema) on hand-computed cases and edge cases."""
import pytest
import torch

from mage.pema import PEMA_MODES, pema_beta, pema_update_


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_paper_rule_hand_computed():
    # lam = 0.5 makes beta land inside (0, 1): (g+1) / (delta * (F^2 + lam))
    ema, param = t(0.0, 0.0), t(4.0, 2.0)
    grad, fisher = t(0.0, 1.0), t(1.0, 0.0)
    # entry 0: delta 4, H = 1.5 -> beta = 1/6 ; entry 1: delta 2, H = 0.5 -> beta = 2/1 -> clamp 1
    pema_update_(ema, param, grad, fisher, lam=0.5)
    torch.testing.assert_close(ema, t((1 - 1 / 6) * 4.0, 0.0))


def test_taylor_rule_hand_computed():
    ema, param = t(1.0), t(3.0)
    pema_update_(ema, param, t(0.5), t(0.25), lam=0.25, mode="taylor")  # beta = 0.5 / (2 * 0.5) = 0.5
    torch.testing.assert_close(ema, t(2.0))


def test_fixed_rule():
    ema, param = t(1.0, -2.0), t(3.0, 2.0)
    pema_update_(ema, param, t(9.0, 9.0), t(9.0, 9.0), mode="fixed", fixed_beta=0.75)
    torch.testing.assert_close(ema, t(1.5, -1.0))


def test_fisher_rule_hand_computed():
    ema, param = t(0.0, 0.0, 0.0), t(1.0, 1.0, 1.0)
    prev, fisher = t(3.0, 0.0, 0.0), t(1.0, 2.0, 0.0)
    # w = 3/4, 0, 0 (both zero -> 0); beta = 0.5 + 0.5 w
    pema_update_(ema, param, t(0, 0, 0), fisher, mode="fisher", fixed_beta=0.5, fisher_prev=prev)
    torch.testing.assert_close(ema, t(1 - 0.875, 0.5, 0.5))


def test_delta_zero_keeps_ema_in_every_mode():
    for mode in ("paper", "taylor"):
        ema = t(0.3, -0.7)
        pema_update_(ema, ema.clone(), t(0.0, -1.0), t(0.0, 0.0), mode=mode)
        torch.testing.assert_close(ema, t(0.3, -0.7), rtol=0, atol=0)


def test_sign_gate_with_tiny_fisher():
    """With F ~ 0 the paper's rule freezes entries with delta > 0 and copies theta where delta < 0."""
    ema = t(0.0, 0.0)
    pema_update_(ema, t(1e-3, -1e-3), t(1e-5, 1e-5), t(1e-9, 1e-9))
    torch.testing.assert_close(ema, t(0.0, -1e-3), rtol=0, atol=0)


def test_non_finite_beta_goes_to_beta_max_and_clamps_apply():
    delta = t(0.0, 0.0, 1.0, -1.0)
    beta = pema_beta(delta, t(-1.0, 1.0, 0.0, 5.0), t(0.0, 0.0, 0.0, 0.0), beta_min=0.1, beta_max=0.9)
    # 0/0 -> nan -> beta_max; 1/0 -> inf -> beta_max; 1/1e-5 -> clamp 0.9; negative -> clamp 0.1
    torch.testing.assert_close(beta, t(0.9, 0.9, 0.9, 0.1))


@pytest.mark.parametrize("mode", PEMA_MODES)
def test_bfloat16_params_and_empty_tensors(mode):
    kw = dict(mode=mode, fisher_prev=torch.rand(5) if mode == "fisher" else None)
    ema = torch.randn(5)
    p = torch.randn(5).bfloat16()
    expected = ema.clone()
    pema_update_(expected, p.float(), torch.zeros(5), torch.full((5,), 0.1), **kw)
    pema_update_(ema, p, torch.zeros(5, dtype=torch.bfloat16), torch.full((5,), 0.1), **kw)
    torch.testing.assert_close(ema, expected, rtol=0, atol=0)
    empty = torch.empty(0)
    pema_update_(empty, empty, empty, empty, mode=mode, fisher_prev=empty if mode == "fisher" else None)


def test_bad_inputs():
    with pytest.raises(TypeError, match="float32"):
        pema_update_(torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="grad has shape"):
        pema_update_(torch.zeros(2), torch.zeros(2), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="unknown PEMA mode"):
        pema_update_(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), mode="adam")
    with pytest.raises(ValueError, match="fisher_prev"):
        pema_update_(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), mode="fisher")
