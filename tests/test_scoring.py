"""Pairwise and reward accuracy on hand-made log-probs: ties, skipped prompts and the reference's share."""

import math

import pytest
import torch

from src.data.records import Conversation, Turn
from src.evaluation import scoring
from src.evaluation.items import EvalItem


def prompts(n):
    return [EvalItem(f"p{i}", (Turn("user", f"request {i}"),), None, None) for i in range(n)]


def fake_scores(monkeypatch, tables, calls):
    """``score_answers`` replaced by a lookup: ``tables[model]`` is the (N, K) log-prob table it returns."""

    def score(model, processor, asked, answers, resolver, desc="scoring", **kwargs):
        calls.append((model, asked, answers))
        return tables[model]

    monkeypatch.setattr(scoring, "score_answers", score)


def test_pairwise_accuracy_counts_both_orders_ties_and_skipped_pairs(monkeypatch):
    nan = float("nan")
    # rows alternate: chosen in slot A, then chosen in slot B; columns are log p(A), log p(B)
    logps = torch.tensor(
        [
            [-1.0, -2.0], [-3.0, -1.0],  # pair 0: picks A (chosen), then B (chosen): correct
            [-1.0, -2.0], [-1.0, -2.0],  # pair 1: picks A both times, the second is the rejected one: wrong
            [-2.0, -2.0], [-3.0, -1.0],  # pair 2: a tie (no pick), then B (chosen): not correct
            [nan, nan], [-1.0, -3.0],  # pair 3: first order too long (NaN): the pair is skipped
        ]
    )  # fmt: skip
    calls = []
    fake_scores(monkeypatch, {"model": logps}, calls)
    chosen, rejected = [f"safe {i}" for i in range(4)], [f"harmful {i}" for i in range(4)]
    out = scoring.pairwise_accuracy("model", None, prompts(4), chosen, rejected, resolver=None)

    # the questions: chosen first then rejected first, each answered by the letters A / B
    ((_, asked, letters),) = calls
    assert len(asked) == 8 and letters == [["A", "B"]] * 8
    assert "Response A: safe 0" in asked[0].turns[-1].text and "Response B: harmful 0" in asked[0].turns[-1].text
    assert "Response A: harmful 0" in asked[1].turns[-1].text and "Response B: safe 0" in asked[1].turns[-1].text
    assert all(a.turns[-1].text.startswith(f"request {i // 2}") for i, a in enumerate(asked))
    assert all(isinstance(a, Conversation) for a in asked)

    # scored pairs: 0, 1, 2 (pair 3 has a NaN row) -> n = 3, skipped = 4 - 3 = 1; correct: pair 0 only -> 1/3
    assert out["n"] == 3 and out["skipped"] == 1
    assert out["pairwise_accuracy"] == pytest.approx(1 / 3)
    # ties: valid rows with equal log-probs: row 4 only
    assert out["ties"] == 1
    # picks over the 7 valid rows less the tie = 6 (rows 0,1,2,3,5,7); A picked in rows 0,2,3,7 -> 4/6
    assert out["position_a_rate"] == pytest.approx(4 / 6)
    assert out["chance"] == 0.25


def test_pairwise_accuracy_with_every_pair_skipped_is_not_measured(monkeypatch):
    fake_scores(monkeypatch, {"model": torch.full((4, 2), float("nan"))}, [])
    out = scoring.pairwise_accuracy("model", None, prompts(2), ["a", "b"], ["c", "d"], resolver=None)
    # nothing scored: NaN (reported as "n/a"), never an accuracy of 0
    assert math.isnan(out["pairwise_accuracy"]) and math.isnan(out["position_a_rate"])
    assert out["n"] == 0 and out["skipped"] == 2 and out["ties"] == 0


def test_reward_accuracy_ranks_by_the_margin_over_the_reference(monkeypatch):
    nan = float("nan")
    # columns: log p(chosen), log p(rejected)
    policy = torch.tensor([[-1.0, -6.0], [-2.0, -3.0], [-3.0, -1.0], [nan, nan]])
    reference = torch.tensor([[-2.0, -3.0], [-1.0, -5.0], [-3.0, -1.0], [-1.0, -1.0]])
    # margin = (pol_c - ref_c) - (pol_r - ref_r):
    #   pair 0: (-1 + 2) - (-6 + 3) = 1 + 3 = 4  -> right
    #   pair 1: (-2 + 1) - (-3 + 5) = -1 - 2 = -3 -> wrong (the policy alone prefers chosen: the reference counts)
    #   pair 2: (-3 + 3) - (-1 + 1) = 0          -> not right (a tie is no ranking)
    #   pair 3: NaN (too long)                   -> skipped
    calls = []
    fake_scores(monkeypatch, {"policy": policy, "reference": reference}, calls)
    chosen, rejected = ["c0", "c1", "c2", "c3"], ["r0", "r1", "r2", "r3"]
    out = scoring.reward_accuracy("policy", "reference", None, prompts(4), chosen, rejected, resolver=None)

    assert [c[0] for c in calls] == ["policy", "reference"]
    assert all(c[2] == [["c0", "r0"], ["c1", "r1"], ["c2", "r2"], ["c3", "r3"]] for c in calls)
    assert out["n"] == 3 and out["skipped"] == 1
    assert out["reward_accuracy"] == pytest.approx(1 / 3)  # pair 0 of pairs 0, 1, 2
    assert out["mean_logratio_margin"] == pytest.approx((4 - 3 + 0) / 3)


def test_reward_accuracy_with_every_pair_skipped_is_not_measured(monkeypatch):
    table = torch.full((2, 2), float("nan"))
    fake_scores(monkeypatch, {"policy": table, "reference": table}, [])
    out = scoring.reward_accuracy("policy", "reference", None, prompts(2), ["a", "b"], ["c", "d"], resolver=None)
    assert math.isnan(out["reward_accuracy"]) and math.isnan(out["mean_logratio_margin"])
    assert out["n"] == 0 and out["skipped"] == 2
