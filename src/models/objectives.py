"""Preference objectives as pure functions of per-answer summed log-probs.

Notation: for answer y to multimodal prompt x, the implicit reward is
``r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))``.

Every objective takes policy and reference log-probs of shape (B, K) — one column per answer, in the
order chosen, rejected[, blind] — and returns an `ObjectiveOutput` with the per-example loss (B,) and
the detached rewards (B, K) for logging. Adding a variant is one function here and one config file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHOSEN, REJECTED, BLIND = 0, 1, 2


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # (B,) per-example loss
    rewards: torch.Tensor  # (B, K) detached implicit rewards, K answers


def implicit_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """r = beta * (log pi - log pi_ref), elementwise; shapes (B, K) -> (B, K)."""
    return beta * (policy_logps - reference_logps)


def dpo(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float = 0.1) -> ObjectiveOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290): prefer chosen over rejected.

    L = -log sigmoid(r(x, y_w) - r(x, y_l)).  Inputs (B, K>=2): columns 0 chosen, 1 rejected.
    """
    rewards = implicit_rewards(policy_logps, reference_logps, beta)
    loss = -F.logsigmoid(rewards[:, CHOSEN] - rewards[:, REJECTED])
    return ObjectiveOutput(loss=loss, rewards=rewards.detach())


def bpo(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float = 0.1, blind_weight: float = 1.0
) -> ObjectiveOutput:
    """Blind Preference Optimization (Li et al. 2025, arXiv 2503.14189): DPO plus a blind-answer term.

    The blind answer y_b is the reference model's answer to the prompt with the image removed, scored
    under the full multimodal prompt x; it is assumed worse than the chosen answer, which teaches the
    model to use the image rather than answer from text alone.

    L = -log sigmoid(r(x, y_w) - r(x, y_l)) - blind_weight * log sigmoid(r(x, y_w) - r(x, y_b)).
    Inputs (B, 3): columns chosen, rejected, blind.
    """
    if policy_logps.shape[-1] < 3:
        raise ValueError("bpo needs three answers per example (chosen, rejected, blind); set data.answers")
    rewards = implicit_rewards(policy_logps, reference_logps, beta)
    dpo_term = -F.logsigmoid(rewards[:, CHOSEN] - rewards[:, REJECTED])
    blind_term = -F.logsigmoid(rewards[:, CHOSEN] - rewards[:, BLIND])
    return ObjectiveOutput(loss=dpo_term + blind_weight * blind_term, rewards=rewards.detach())


OBJECTIVES: dict[str, Callable[..., ObjectiveOutput]] = {"dpo": dpo, "bpo": bpo}
# the answers each objective scores, in column order
ANSWERS: dict[str, tuple[str, ...]] = {"dpo": ("chosen", "rejected"), "bpo": ("chosen", "rejected", "blind")}
