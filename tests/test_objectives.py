import math

import pytest
import torch

from src.models.objectives import bpo, dpo, implicit_rewards, resolve_answers, sft, takes


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


def test_bpo_blind_weight_scales_the_blind_term():
    full, half = bpo(POLICY, REFERENCE, beta=0.1), bpo(POLICY, REFERENCE, beta=0.1, blind_weight=0.5)
    dpo_term = dpo(POLICY, REFERENCE, 0.1).loss
    assert torch.allclose(half.loss - dpo_term, 0.5 * (full.loss - dpo_term), atol=1e-6)


def test_bpo_needs_three_answers():
    with pytest.raises(ValueError, match="three answers"):
        bpo(POLICY[:, :2], REFERENCE[:, :2])


SUMMED = torch.tensor([[-10.0, -12.0], [-20.0, -9.0]])  # (B, K): chosen, rejected
TOKENS = torch.tensor([[5, 4], [8, 3]])


def test_sft_is_the_token_mean_nll_averaged_over_answers():
    out = sft(SUMMED, TOKENS)
    # token means: [[-2, -3], [-2.5, -3]] -> per example mean NLL 2.5 and 2.75
    assert torch.allclose(out.loss, torch.tensor([2.5, 2.75]))
    assert torch.allclose(out.rewards, torch.tensor([[-2.0, -3.0], [-2.5, -3.0]]))
    assert not out.rewards.requires_grad


def test_sft_on_one_answer_and_gradient():
    assert torch.allclose(sft(SUMMED[:, :1], TOKENS[:, :1]).loss, torch.tensor([2.0, 2.5]))
    policy = SUMMED.clone().requires_grad_(True)
    sft(policy, TOKENS).loss.sum().backward()
    # d loss / d log pi(y_k|x) = -1 / (K |y_k|): every answer's likelihood is raised, short ones more per token
    assert torch.allclose(policy.grad, -1 / (2 * TOKENS.float()))


def test_objectives_declare_their_inputs():
    assert takes(sft, "num_tokens") and not takes(sft, "reference_logps")
    assert all(takes(f, "reference_logps") and not takes(f, "num_tokens") for f in (dpo, bpo))


def test_answers_of_sft_are_configurable_and_checked():
    assert resolve_answers("sft", None) == ("chosen", "rejected")
    assert resolve_answers("sft", ["chosen"]) == ("chosen",) == resolve_answers("sft", "chosen")
    assert resolve_answers("sft", ["rejected", "chosen"]) == ("rejected", "chosen")
    for bad in (["blind"], ["chosen", "chosen"], [], ["chosen", "preferred"]):
        with pytest.raises(ValueError, match=r"objective.answers of sft must be distinct answers among"):
            resolve_answers("sft", bad)


def test_answers_of_preference_objectives_are_fixed():
    assert resolve_answers("bpo", ["chosen", "rejected", "blind"]) == ("chosen", "rejected", "blind")
    with pytest.raises(ValueError, match=r"objective dpo scores \['chosen', 'rejected'\] in that order"):
        resolve_answers("dpo", ["rejected", "chosen"])
