import inspect
import math

import pytest
import torch

from src.models.objectives import (
    INPUTS,
    OBJECTIVES,
    Objective,
    anchor_term,
    blind_term,
    bpo,
    cdpo,
    composite,
    composite_answers,
    conditional_term,
    dpo,
    dpo_term,
    hinge,
    implicit_rewards,
    ipo,
    nll_term,
    resolve_answers,
    robust,
    rpo,
    sft,
    simpo,
)


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


def takes(objective, name: str) -> bool:
    """Whether the function takes the input ``name``, read from its signature (what `Objective` declares)."""
    return name in inspect.signature(objective).parameters


def test_objectives_declare_their_inputs():
    declared = {name: (o.reference_free, o.inputs) for name, o in OBJECTIVES.items()}
    assert declared["sft"] == declared["simpo"] == (True, ("num_tokens",))
    assert all(declared[name] == (False, ()) for name in ("dpo", "bpo", "ipo", "cdpo", "hinge", "robust"))
    assert declared["rpo"] == (False, ("num_tokens",))
    assert declared["composite"] == (False, ("num_tokens", "has_image"))
    # each declaration says what the function's signature takes, so the module never reads the signature
    for name, o in OBJECTIVES.items():
        assert o.reference_free == (not takes(o.fn, "reference_logps")), name
        assert set(o.inputs) == {key for key in INPUTS if takes(o.fn, key)}, name
    with pytest.raises(ValueError, match="unknown inputs"):
        Objective(dpo, inputs=("lengths",))


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


# DPO variants on the first two columns of POLICY / REFERENCE (chosen, rejected), beta 0.1.
# h = (log-ratio of chosen) - (log-ratio of rejected): example 0: 1 - (-1) = 2; example 1: 0 - 2 = -2,
# so beta h = 0.2 and -0.2; -log sigmoid(0.2) = 0.598139, -log sigmoid(-0.2) = 0.798139.
PAIR, PAIR_REF = POLICY[:, :2], REFERENCE[:, :2]


def test_ipo_by_hand():
    # (h - 1/(2 * 0.1))^2 = (2 - 5)^2 and (-2 - 5)^2, on summed log-probs
    assert torch.allclose(ipo(PAIR, PAIR_REF, beta=0.1).loss, torch.tensor([9.0, 49.0]))
    assert torch.allclose(ipo(PAIR, PAIR_REF, beta=0.5).loss, torch.tensor([1.0, 9.0]))  # target 1


def test_cdpo_by_hand_and_zero_smoothing_is_dpo():
    out = cdpo(PAIR, PAIR_REF, beta=0.1, label_smoothing=0.1)
    # 0.9 * 0.598139 + 0.1 * 0.798139 and 0.9 * 0.798139 + 0.1 * 0.598139
    assert torch.allclose(out.loss, torch.tensor([0.618139, 0.778139]), atol=1e-6)
    assert torch.equal(cdpo(PAIR, PAIR_REF, 0.1, label_smoothing=0.0).loss, dpo(PAIR, PAIR_REF, 0.1).loss)


def test_hinge_by_hand():
    assert torch.allclose(hinge(PAIR, PAIR_REF, beta=0.1).loss, torch.tensor([0.8, 1.2]))
    # beta 1: margins 2 and -2; the first is past the hinge, no loss and no gradient
    policy = PAIR.clone().requires_grad_(True)
    out = hinge(policy, PAIR_REF, beta=1.0)
    assert torch.allclose(out.loss, torch.tensor([0.0, 3.0]))
    out.loss.sum().backward()
    assert torch.equal(policy.grad[0], torch.zeros(2)) and torch.equal(policy.grad[1], torch.tensor([-1.0, 1.0]))


def test_robust_by_hand_and_zero_smoothing_is_dpo():
    out = robust(PAIR, PAIR_REF, beta=0.1, label_smoothing=0.1)
    # (0.9 * 0.598139 - 0.1 * 0.798139) / 0.8 and (0.9 * 0.798139 - 0.1 * 0.598139) / 0.8
    assert torch.allclose(out.loss, torch.tensor([0.573139, 0.823139]), atol=1e-6)
    assert torch.allclose(robust(PAIR, PAIR_REF, 0.1, label_smoothing=0.0).loss, dpo(PAIR, PAIR_REF, 0.1).loss)
    for bad in (0.5, 0.7, -0.1):
        with pytest.raises(ValueError, match=r"robust needs objective.label_smoothing in \[0, 0.5\)"):
            robust(PAIR, PAIR_REF, label_smoothing=bad)


def test_rpo_by_hand():
    # chosen token-mean NLL: 10 / 5 = 2 and 20 / 8 = 2.5
    out = rpo(PAIR, PAIR_REF, TOKENS, beta=0.1, nll_weight=1.0)
    assert torch.allclose(out.loss, torch.tensor([2.598139, 3.298139]), atol=1e-6)
    half = rpo(PAIR, PAIR_REF, TOKENS, beta=0.1, nll_weight=0.5)
    assert torch.allclose(half.loss, torch.tensor([1.598139, 2.048139]), atol=1e-6)
    assert torch.allclose(out.rewards, implicit_rewards(PAIR, PAIR_REF, 0.1))


def test_simpo_by_hand():
    out = simpo(PAIR, TOKENS, beta=2.0, gamma=1.0)
    # token means [[-2, -3], [-2.5, -6]] -> rewards [[-4, -6], [-5, -12]]; margins - gamma: 1 and 6
    assert torch.allclose(out.rewards, torch.tensor([[-4.0, -6.0], [-5.0, -12.0]]))
    assert torch.allclose(out.loss, torch.tensor([0.313262, 0.002476]), atol=1e-6)
    assert not takes(simpo, "reference_logps") and takes(simpo, "num_tokens")


# Composite terms on four columns (chosen, rejected, blind, chosen_corrupted); beta 0.1 gives rewards
# [[0.1, -0.1, -0.1, -0.2], [0.0, 0.2, 0.1, -0.1]].
POLICY4 = torch.tensor([[-10.0, -12.0, -15.0, -13.0], [-20.0, -18.0, -19.0, -21.0]])
REFERENCE4 = torch.tensor([[-11.0, -11.0, -14.0, -11.0], [-20.0, -20.0, -20.0, -20.0]])
TOKENS4 = torch.tensor([[5, 4, 6, 5], [8, 3, 4, 8]])
COLUMNS4 = ("chosen", "rejected", "blind", "chosen_corrupted")
HAS_IMAGE = torch.tensor([True, False])


def by_column(x):
    return {c: x[:, k] for k, c in enumerate(COLUMNS4)}


def test_each_term_by_hand():
    r = by_column(implicit_rewards(POLICY4, REFERENCE4, 0.1))
    assert torch.allclose(dpo_term(r), torch.tensor([0.598139, 0.798139]), atol=1e-6)
    assert torch.allclose(blind_term(r), torch.tensor([0.598139, 0.744397]), atol=1e-6)  # margins 0.2, -0.1
    # margins 0.3 and 0.1; the second record has no image, so no corrupted variant: 0
    assert torch.allclose(conditional_term(r, has_image=HAS_IMAGE), torch.tensor([0.554355, 0.0]), atol=1e-6)
    both = torch.tensor([True, True])
    assert torch.allclose(conditional_term(r, has_image=both), torch.tensor([0.554355, 0.644397]), atol=1e-6)
    assert torch.allclose(anchor_term(r), torch.tensor([0.644397, 0.693147]), atol=1e-6)  # rewards 0.1 and 0
    nll = nll_term(logps=by_column(POLICY4), num_tokens=by_column(TOKENS4))
    assert torch.allclose(nll, torch.tensor([2.0, 2.5]))


def test_composite_of_every_term_by_hand():
    terms = {"dpo": 1.0, "blind": 0.5, "conditional": 1.0, "anchor": 2.0, "nll": 0.1}
    out = composite(POLICY4, REFERENCE4, TOKENS4, HAS_IMAGE, terms=terms, beta=0.1)
    # 0.598139 + 0.5 * 0.598139 + 0.554355 + 2 * 0.644397 + 0.1 * 2 ; 0.798139 + 0.5 * 0.744397 + 0 + 2 * 0.693147
    # + 0.1 * 2.5
    assert torch.allclose(out.loss, torch.tensor([2.940357, 2.806632]), atol=1e-5)
    assert list(out.terms) == list(terms)
    assert torch.allclose(out.terms["conditional"], torch.tensor([0.554355, 0.0]), atol=1e-6)
    assert torch.allclose(out.rewards, torch.tensor([[0.1, -0.1, -0.1, -0.2], [0.0, 0.2, 0.1, -0.1]]), atol=1e-6)
    assert not out.rewards.requires_grad and not any(t.requires_grad for t in out.terms.values())


def test_composite_reads_columns_by_name_and_skips_zero_terms():
    # chosen, rejected, chosen_corrupted: the corrupted column is third here
    columns = [0, 1, 3]
    out = composite(
        POLICY4[:, columns], REFERENCE4[:, columns], TOKENS4[:, columns], HAS_IMAGE, {"dpo": 1.0, "conditional": 1.0}
    )
    assert torch.allclose(out.loss, torch.tensor([0.598139 + 0.554355, 0.798139]), atol=1e-6)
    anchored = composite(POLICY4[:, :1], REFERENCE4[:, :1], TOKENS4[:, :1], HAS_IMAGE, {"anchor": 1.0, "dpo": 0.0})
    assert list(anchored.terms) == ["anchor"] and anchored.rewards.shape == (2, 1)
    with pytest.raises(ValueError, match=r"scores \['chosen'\]; got 2 answers"):
        composite(POLICY4[:, :2], REFERENCE4[:, :2], TOKENS4[:, :2], HAS_IMAGE, {"anchor": 1.0})


def test_conditional_term_of_an_imageless_record_has_no_gradient_even_from_nan():
    columns = [0, 3]  # chosen, chosen_corrupted
    policy = POLICY4[:, columns].clone()
    policy[1, 1] = float("nan")  # no corrupted variant of an image-less record to score
    policy.requires_grad_(True)
    out = composite(policy, REFERENCE4[:, columns], TOKENS4[:, columns], HAS_IMAGE, {"conditional": 1.0})
    out.loss.sum().backward()
    assert torch.allclose(out.loss, torch.tensor([0.554355, 0.0]), atol=1e-6)
    assert torch.equal(policy.grad[1], torch.zeros(2)) and policy.grad[0, 0] < 0 < policy.grad[0, 1]


def test_composite_dpo_and_blind_is_bpo():
    torch.manual_seed(0)
    policy, reference = -20 * torch.rand(16, 3), -20 * torch.rand(16, 3)
    tokens, has_image = torch.randint(1, 9, (16, 3)), torch.ones(16, dtype=torch.bool)
    out = composite(policy, reference, tokens, has_image, {"dpo": 1.0, "blind": 1.0}, beta=0.1)
    expected = bpo(policy, reference, beta=0.1)
    assert torch.allclose(out.loss, expected.loss, atol=1e-6) and torch.allclose(
        out.rewards, expected.rewards, atol=1e-6
    )


def test_composite_answers_follow_the_terms():
    assert composite_answers({"dpo": 1.0, "blind": 1.0}) == ["chosen", "rejected", "blind"]
    assert composite_answers({"conditional": 1.0, "nll": 0.1}) == ["chosen", "chosen_corrupted"]
    assert composite_answers({"blind": 1.0, "dpo": 0.0, "anchor": 1.0}) == ["chosen", "blind"]
    every = {"dpo": 1, "blind": 1, "conditional": 1, "anchor": 1, "nll": 0.1}
    assert composite_answers(every) == ["chosen", "rejected", "blind", "chosen_corrupted"]
    assert resolve_answers("composite", None, every) == ("chosen", "rejected", "blind", "chosen_corrupted")
    assert resolve_answers("composite", ["chosen", "blind"], {"blind": 1.0}) == ("chosen", "blind")
    with pytest.raises(ValueError, match=r"objective composite with terms \{'dpo': 1.0\} scores"):
        resolve_answers("composite", ["chosen", "rejected", "blind"], {"dpo": 1.0, "blind": 0})


def test_composite_terms_are_checked():
    with pytest.raises(ValueError, match=r"unknown terms \['margin'\]"):
        composite_answers({"dpo": 1.0, "margin": 1.0})
    with pytest.raises(ValueError, match=r"weights must be >= 0"):
        composite_answers({"dpo": -1.0})
    for no_reward in ({"nll": 1.0}, {"dpo": 0.0, "nll": 0.1}, {}):
        with pytest.raises(ValueError, match=r"has no reward term .* objective=sft with objective.answers=\[chosen\]"):
            composite_answers(no_reward)


def test_every_objective_has_a_config(tmp_path):
    from tests.helpers import CONFIGS, compose_config

    configs = {p.stem for p in (CONFIGS / "objective").glob("*.yaml")}
    assert set(OBJECTIVES) <= configs  # one config per objective, under its name
    for extra in configs - set(OBJECTIVES):  # presets of an objective (mdpo: a composite with mDPO's terms)
        assert compose_config("train", [f"objective={extra}"]).objective.name in OBJECTIVES
