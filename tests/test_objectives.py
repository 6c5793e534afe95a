import math

import pytest
import torch

from src.models.objectives import bpo, dpo, implicit_rewards


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


POLICY = torch.tensor([[-10.0, -12.0, -15.0], [-20.0, -18.0, -19.0]])
REFERENCE = torch.tensor([[-11.0, -11.0, -14.0], [-20.0, -20.0, -20.0]])


def test_implicit_rewards_by_hand():
    r = implicit_rewards(POLICY, REFERENCE, beta=0.1)
    expected = torch.tensor([[0.1, -0.1, -0.1], [0.0, 0.2, 0.1]])
    assert torch.allclose(r, expected, atol=1e-6)


def test_dpo_by_hand():
    out = dpo(POLICY[:, :2], REFERENCE[:, :2], beta=0.1)
    # example 0: r_w - r_l = 0.1 - (-0.1) = 0.2 ; example 1: 0.0 - 0.2 = -0.2
    expected = torch.tensor([-logsig(0.2), -logsig(-0.2)])
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out.loss[0].item() == pytest.approx(0.598139, abs=1e-6)
    assert not out.rewards.requires_grad


def test_bpo_is_dpo_term_plus_blind_term():
    out = bpo(POLICY, REFERENCE, beta=0.1)
    # blind term: r_w - r_b = 0.1 - (-0.1) = 0.2 ; 0.0 - 0.1 = -0.1
    expected = torch.tensor([-logsig(0.2) - logsig(0.2), -logsig(-0.2) - logsig(-0.1)])
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out.loss[1].item() == pytest.approx(0.798139 + 0.744397, abs=1e-5)
    assert torch.allclose(
        out.loss,
        dpo(POLICY, REFERENCE, 0.1).loss - torch.nn.functional.logsigmoid(out.rewards[:, 0] - out.rewards[:, 2]),
        atol=1e-6,
    )


def test_bpo_blind_weight_and_gradient_direction():
    policy = POLICY.clone().requires_grad_(True)
    out = bpo(policy, REFERENCE, beta=0.1, blind_weight=0.0)
    assert torch.allclose(out.loss, dpo(POLICY, REFERENCE, 0.1).loss, atol=1e-6)
    bpo(policy, REFERENCE, beta=0.1).loss.sum().backward()
    # lowering the loss raises chosen and lowers rejected and blind log-probs
    assert (policy.grad[:, 0] < 0).all() and (policy.grad[:, 1] > 0).all() and (policy.grad[:, 2] > 0).all()


def test_bpo_needs_three_answers():
    with pytest.raises(ValueError, match="three answers"):
        bpo(POLICY[:, :2], REFERENCE[:, :2])
