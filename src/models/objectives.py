"""Training objectives as pure functions of per-answer summed log-probs.

Notation: for answer y to multimodal prompt x, the implicit reward is
``r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))``.

Every objective takes policy log-probs of shape (B, K) — one column per answer, in the order of
``ANSWERS[name]`` — and returns an `ObjectiveOutput` with the per-example loss (B,) and detached
per-answer scores (B, K) for logging. What else it needs it names as parameters: ``reference_logps``
(B, K) for the reference model's log-probs (preference objectives), ``num_tokens`` (B, K) for answer
lengths (`sft`). Adding a variant is one function here and one config file.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHOSEN, REJECTED, BLIND = 0, 1, 2


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # (B,) per-example loss
    rewards: torch.Tensor  # (B, K) detached implicit rewards (sft: token-mean log-probs), K answers


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


def sft(policy_logps: torch.Tensor, num_tokens: torch.Tensor) -> ObjectiveOutput:
    """Supervised fine-tuning: token-mean negative log-likelihood, averaged over the answers.

    L = mean_k -log pi(y_k|x) / |y_k|, with no reference model. Inputs (B, K): summed log-probs and
    answer token counts of any K answers (e.g. chosen and rejected, for a base that is not yet aligned).
    The returned rewards are the token-mean log-probs log pi(y_k|x) / |y_k|.
    """
    token_mean = policy_logps / num_tokens.to(policy_logps.dtype)
    return ObjectiveOutput(loss=-token_mean.mean(dim=-1), rewards=token_mean.detach())


OBJECTIVES: dict[str, Callable[..., ObjectiveOutput]] = {"dpo": dpo, "bpo": bpo, "sft": sft}
# the answers each objective scores by default, in column order
ANSWERS: dict[str, tuple[str, ...]] = {
    "dpo": ("chosen", "rejected"),
    "bpo": ("chosen", "rejected", "blind"),
    "sft": ("chosen", "rejected"),
}
# objectives whose answers `objective.answers` may choose, and the answers allowed
ANSWER_CHOICES: dict[str, tuple[str, ...]] = {"sft": ("chosen", "rejected")}


def takes(objective: Callable[..., ObjectiveOutput], name: str) -> bool:
    """Whether ``objective`` takes the input ``name`` (``reference_logps``, ``num_tokens``)."""
    return name in inspect.signature(objective).parameters


def resolve_answers(name: str, answers: Sequence[str] | None) -> tuple[str, ...]:
    """The answers objective ``name`` scores: ``answers`` (from its config) checked, or its default."""
    default = ANSWERS[name]
    if answers is None:
        return default
    answers = (answers,) if isinstance(answers, str) else tuple(answers)
    if name not in ANSWER_CHOICES:
        if answers != default:
            raise ValueError(
                f"objective {name} scores {list(default)} in that order; got objective.answers={list(answers)}"
            )
        return default
    allowed = ANSWER_CHOICES[name]
    if not answers or len(set(answers)) != len(answers) or not set(answers) <= set(allowed):
        raise ValueError(
            f"objective.answers of {name} must be distinct answers among {list(allowed)}; got {list(answers)}"
        )
    return answers
