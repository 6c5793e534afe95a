"""Training objectives as pure functions of per-answer summed log-probs.

Notation: for answer y to multimodal prompt x, the implicit reward is
``r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))``, and the DPO variants below are written with
``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``, so r(x, y_w) - r(x, y_l) = beta h.

Every objective takes policy log-probs of shape (B, K) — one column per answer, in the order of
``ANSWERS[name]`` — and returns an `ObjectiveOutput` with the per-example loss (B,) and detached
per-answer scores (B, K) for logging. What else it takes it names as parameters, and its `Objective` in
`OBJECTIVES` declares: ``reference_logps`` (B, K), the reference model's log-probs, unless it is
``reference_free`` (it then runs with no reference model); and its ``inputs``, among ``num_tokens`` (B, K) for
answer lengths and ``has_image`` (B,) for whether a record has an image.
Adding a variant is one function here, its `Objective` and one config file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from src.data.data_settings import DataNeeds
from src.data.encoding import ANSWER_KEYS

CHOSEN, REJECTED, BLIND = 0, 1, 2


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # (B,) per-example loss
    rewards: torch.Tensor  # (B, K) detached implicit rewards (sft: token-mean log-probs), K answers
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # composite: name -> (B,) detached term values


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
        raise ValueError("bpo needs three answers per example (chosen, rejected, blind); set objective.answers")
    rewards = implicit_rewards(policy_logps, reference_logps, beta)
    dpo_term = -F.logsigmoid(rewards[:, CHOSEN] - rewards[:, REJECTED])
    blind_term = -F.logsigmoid(rewards[:, CHOSEN] - rewards[:, BLIND])
    return ObjectiveOutput(loss=dpo_term + blind_weight * blind_term, rewards=rewards.detach())


def ipo(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float = 0.1) -> ObjectiveOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036): regress the log-ratio gap onto a fixed target.

    L = (h - 1 / (2 beta))^2 on summed log-probs, as in the paper (TRL's ``ipo`` averages them per token
    instead, so its numbers differ). Inputs (B, 2): chosen, rejected.
    """
    log_ratios = policy_logps - reference_logps
    h = log_ratios[:, CHOSEN] - log_ratios[:, REJECTED]
    loss = (h - 1 / (2 * beta)) ** 2
    return ObjectiveOutput(loss=loss, rewards=implicit_rewards(policy_logps, reference_logps, beta).detach())


def cdpo(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.1
) -> ObjectiveOutput:
    """Conservative DPO (label smoothing; Mitchell 2023, "A note on DPO with noisy preferences"): each label is
    taken to be flipped with probability eps = ``label_smoothing``.

    L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); eps = 0 is DPO. Inputs (B, 2).
    """
    rewards = implicit_rewards(policy_logps, reference_logps, beta)
    margin = rewards[:, CHOSEN] - rewards[:, REJECTED]
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return ObjectiveOutput(loss=loss, rewards=rewards.detach())


def hinge(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float = 0.1) -> ObjectiveOutput:
    """SLiC hinge loss (Zhao et al. 2023, arXiv 2305.10425) on the DPO log-ratio gap.

    L = max(0, 1 - beta h): no gradient once the reward margin exceeds 1. Inputs (B, 2).
    """
    rewards = implicit_rewards(policy_logps, reference_logps, beta)
    loss = torch.relu(1 - (rewards[:, CHOSEN] - rewards[:, REJECTED]))
    return ObjectiveOutput(loss=loss, rewards=rewards.detach())


def robust(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.1
) -> ObjectiveOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409): unbiased under labels flipped with probability
    eps = ``label_smoothing`` in [0, 0.5).

    L = [(1 - eps)(-log sigmoid(beta h)) - eps(-log sigmoid(-beta h))] / (1 - 2 eps); eps = 0 is DPO. It can be
    negative (the flipped-label term is subtracted). Inputs (B, 2).
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs objective.label_smoothing in [0, 0.5), got {label_smoothing}")
    rewards = implicit_rewards(policy_logps, reference_logps, beta)
    margin = rewards[:, CHOSEN] - rewards[:, REJECTED]
    loss = (-(1 - label_smoothing) * F.logsigmoid(margin) + label_smoothing * F.logsigmoid(-margin)) / (
        1 - 2 * label_smoothing
    )
    return ObjectiveOutput(loss=loss, rewards=rewards.detach())


def rpo(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    num_tokens: torch.Tensor,
    beta: float = 0.1,
    nll_weight: float = 1.0,
) -> ObjectiveOutput:
    """RPO (Pang et al. 2024, arXiv 2404.19733): DPO plus the chosen answer's negative log-likelihood.

    L = -log sigmoid(beta h) + nll_weight * (-log pi(y_w|x) / |y_w|), the NLL a token mean. Inputs (B, 2) and
    answer token counts ``num_tokens`` (B, 2).
    """
    out = dpo(policy_logps, reference_logps, beta)
    nll = -policy_logps[:, CHOSEN] / num_tokens[:, CHOSEN].to(policy_logps.dtype)
    return ObjectiveOutput(loss=out.loss + nll_weight * nll, rewards=out.rewards)


def simpo(
    policy_logps: torch.Tensor, num_tokens: torch.Tensor, beta: float = 2.0, gamma: float = 1.0
) -> ObjectiveOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734): a preference objective with no reference model.

    The reward is the length-normalised log-likelihood r(x, y) = beta / |y| * log pi(y|x), and the chosen one
    must beat the rejected one by a margin gamma: L = -log sigmoid(r(x, y_w) - r(x, y_l) - gamma).
    Inputs (B, 2) and answer token counts ``num_tokens`` (B, 2); the returned rewards are these r (B, 2).
    """
    rewards = beta * policy_logps / num_tokens.to(policy_logps.dtype)
    loss = -F.logsigmoid(rewards[:, CHOSEN] - rewards[:, REJECTED] - gamma)
    return ObjectiveOutput(loss=loss, rewards=rewards.detach())


def sft(policy_logps: torch.Tensor, num_tokens: torch.Tensor) -> ObjectiveOutput:
    """Supervised fine-tuning: token-mean negative log-likelihood, averaged over the answers.

    L = mean_k -log pi(y_k|x) / |y_k|, with no reference model. Inputs (B, K): summed log-probs and
    answer token counts of any K answers (e.g. chosen and rejected, for a base that is not yet aligned).
    The returned rewards are the token-mean log-probs log pi(y_k|x) / |y_k|.
    """
    token_mean = policy_logps / num_tokens.to(policy_logps.dtype)
    return ObjectiveOutput(loss=-token_mean.mean(dim=-1), rewards=token_mean.detach())


# Composable terms on the implicit rewards r (dict: column -> (B,)) of named answer columns; each returns (B,).
def dpo_term(r: dict[str, torch.Tensor], **_: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r(x, chosen) - r(x, rejected)): DPO's term."""
    return -F.logsigmoid(r["chosen"] - r["rejected"])


def blind_term(r: dict[str, torch.Tensor], **_: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r(x, chosen) - r(x, blind)): BPO's term (the blind answer as the rejected one)."""
    return -F.logsigmoid(r["chosen"] - r["blind"])


def conditional_term(r: dict[str, torch.Tensor], has_image: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r(x, chosen) - r(x', chosen)), x' the prompt with a corrupted image (mDPO, Wang et al. 2024,
    arXiv 2406.11839): the chosen answer must be likelier given the real image. A record without an image
    (``has_image`` (B,) false) has no corrupted variant: its term is 0, with no gradient."""
    margin = torch.where(has_image, r["chosen"] - r["chosen_corrupted"], 0.0)  # masked before: no NaN leaks back
    return torch.where(has_image, -F.logsigmoid(margin), 0.0)


def anchor_term(r: dict[str, torch.Tensor], **_: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r(x, chosen) - 0): mDPO's anchored preference, the chosen reward kept above zero."""
    return -F.logsigmoid(r["chosen"])


def nll_term(logps: dict[str, torch.Tensor], num_tokens: dict[str, torch.Tensor], **_: torch.Tensor) -> torch.Tensor:
    """-log pi(chosen|x) / |chosen|: the chosen answer's token-mean negative log-likelihood (no reference)."""
    return -logps["chosen"] / num_tokens["chosen"].to(logps["chosen"].dtype)


# name -> (term, the columns it needs, whether it needs a reference model)
TERMS: dict[str, tuple[Callable[..., torch.Tensor], tuple[str, ...], bool]] = {
    "dpo": (dpo_term, ("chosen", "rejected"), True),
    "blind": (blind_term, ("chosen", "blind"), True),
    "conditional": (conditional_term, ("chosen", "chosen_corrupted"), True),
    "anchor": (anchor_term, ("chosen",), True),
    "nll": (nll_term, ("chosen",), False),
}


def active_terms(terms: Mapping[str, float] | None) -> dict[str, float]:
    """The terms a composite computes: those with a nonzero weight, checked (known names, weights >= 0, at least
    one term that needs a reference: the composite always runs with one)."""
    terms = dict(terms or {})
    unknown = sorted(set(terms) - set(TERMS))
    if unknown:
        raise ValueError(f"objective.terms: unknown terms {unknown}; available: {list(TERMS)}")
    negative = {name: w for name, w in terms.items() if w < 0}
    if negative:
        raise ValueError(f"objective.terms: weights must be >= 0, got {negative}")
    active = {name: float(w) for name, w in terms.items() if w != 0}
    if not any(TERMS[name][2] for name in active):
        raise ValueError(
            f"objective.terms={terms} has no reward term (one of {[n for n, t in TERMS.items() if t[2]]}); "
            "the likelihood alone is objective=sft with objective.answers=[chosen]"
        )
    return active


def composite_answers(terms: Mapping[str, float] | None) -> list[str]:
    """The columns the composite's nonzero terms need, in `ANSWER_KEYS` order."""
    needed = {column for name in active_terms(terms) for column in TERMS[name][1]}
    return [column for column in ANSWER_KEYS if column in needed]


def composite(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    num_tokens: torch.Tensor,
    has_image: torch.Tensor,
    terms: Mapping[str, float],
    beta: float = 0.1,
) -> ObjectiveOutput:
    """A weighted sum of named terms: L = sum_t terms[t] * term_t; a term left out or weighted 0 is not computed.

    Inputs (B, K): the columns of `composite_answers(terms)`, in that order; ``num_tokens`` (B, K), ``has_image``
    (B,). The rewards are r = beta (log pi - log pi_ref) of every column (B, K); ``terms`` holds each computed
    term's per-example value (B,), unweighted. {dpo: 1, blind: 1} is `bpo`.
    """
    active = active_terms(terms)
    columns = composite_answers(terms)
    if policy_logps.shape[-1] != len(columns):
        raise ValueError(f"composite with terms {active} scores {columns}; got {policy_logps.shape[-1]} answers")
    rewards = implicit_rewards(policy_logps, reference_logps, beta)
    inputs = {
        "r": {c: rewards[:, k] for k, c in enumerate(columns)},
        "logps": {c: policy_logps[:, k] for k, c in enumerate(columns)},
        "num_tokens": {c: num_tokens[:, k] for k, c in enumerate(columns)},
        "has_image": has_image.to(device=policy_logps.device, dtype=torch.bool),
    }
    values = {name: TERMS[name][0](**inputs) for name in active}
    loss = sum(weight * values[name] for name, weight in active.items())
    return ObjectiveOutput(
        loss=loss, rewards=rewards.detach(), terms={name: value.detach() for name, value in values.items()}
    )


# the batch inputs an objective may take besides the log-probs, by parameter name
INPUTS = ("num_tokens", "has_image")


@dataclass(frozen=True)
class Objective:
    """An objective function and what it takes besides the policy's log-probs (B, K), declared, not read from its
    signature: ``reference_free``, it takes no ``reference_logps`` and runs with no reference model (as torchtune's
    ``is_reference_free``); ``inputs``, the batch inputs of `INPUTS` it takes, by name."""

    fn: Callable[..., ObjectiveOutput]
    reference_free: bool = False
    inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.inputs) - set(INPUTS)
        if unknown:
            raise ValueError(f"{self.fn.__name__}: unknown inputs {sorted(unknown)}; an objective may take {INPUTS}")


OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective(dpo),
    "bpo": Objective(bpo),
    "sft": Objective(sft, reference_free=True, inputs=("num_tokens",)),
    "ipo": Objective(ipo),
    "cdpo": Objective(cdpo),
    "hinge": Objective(hinge),
    "robust": Objective(robust),
    "rpo": Objective(rpo, inputs=("num_tokens",)),
    "simpo": Objective(simpo, reference_free=True, inputs=("num_tokens",)),
    "composite": Objective(composite, inputs=("num_tokens", "has_image")),
}
# the answers each objective scores by default, in column order (composite: `composite_answers` of its terms)
ANSWERS: dict[str, tuple[str, ...]] = {
    "bpo": ("chosen", "rejected", "blind"),
    "sft": ("chosen", "rejected"),
} | {name: ("chosen", "rejected") for name in ("dpo", "ipo", "cdpo", "hinge", "robust", "rpo", "simpo")}
# objectives whose answers `objective.answers` may choose, and the answers allowed
ANSWER_CHOICES: dict[str, tuple[str, ...]] = {"sft": ("chosen", "rejected")}
# Objectives that fit the likelihood of their answers: their scores are token-mean log-probs, logged as nll/*.
# Every other objective prefers some answers to others and logs its scores as rewards/*, whether or not it has
# a reference model (simpo has none).
LIKELIHOOD = frozenset({"sft"})


def resolve_answers(
    name: str, answers: Sequence[str] | None, terms: Mapping[str, float] | None = None
) -> tuple[str, ...]:
    """The answers objective ``name`` scores: ``answers`` (from its config) checked, or its default (composite:
    the columns its ``terms`` need)."""
    default = tuple(composite_answers(terms)) if name == "composite" else ANSWERS[name]
    if answers is None:
        return default
    answers = (answers,) if isinstance(answers, str) else tuple(answers)
    if name not in ANSWER_CHOICES:
        if answers != default:
            given = f" with terms {active_terms(terms)}" if name == "composite" else ""
            raise ValueError(
                f"objective {name}{given} scores {list(default)} in that order; got objective.answers={list(answers)}"
            )
        return default
    allowed = ANSWER_CHOICES[name]
    if not answers or len(set(answers)) != len(answers) or not set(answers) <= set(allowed):
        raise ValueError(
            f"objective.answers of {name} must be distinct answers among {list(allowed)}; got {list(answers)}"
        )
    return answers


def data_needs(objective: Mapping[str, Any] | DictConfig) -> DataNeeds:
    """What the data must carry for ``objective`` (the ``objective`` config node): the answers it scores
    (`resolve_answers`: ``objective.answers`` checked, or the objective's own; a composite's follow from its terms)
    and ``objective.corruption``, the corrupted image of ``chosen_corrupted``. The one place the data's columns are
    derived from the objective; raises ValueError for a setting the objective refuses."""
    if isinstance(objective, DictConfig):
        objective = OmegaConf.to_container(objective, resolve=True)
    if objective.get("name") not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective.get('name')!r}; available: {sorted(OBJECTIVES)}")
    answers = resolve_answers(objective["name"], objective.get("answers"), objective.get("terms"))
    return DataNeeds(answers, objective.get("corruption"))
