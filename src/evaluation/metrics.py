"""Rates with confidence intervals, overall and per category."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from src.evaluation.judges import Verdict, is_empty_answer


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sensible at small n and at 0 or 1)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(flags: list[bool]) -> dict[str, Any]:
    """``{"rate", "k", "n", "ci95"}`` of a list of booleans."""
    k, n = sum(flags), len(flags)
    return {"rate": k / n if n else float("nan"), "k": k, "n": n, "ci95": list(wilson_interval(k, n))}


def verdict_rates(verdicts: list[Verdict], answers: list[str]) -> dict[str, Any]:
    """Safe and unsafe shares over the ``judged`` answers. The others are counted by why they got no verdict,
    never taken as safe: ``failed`` (the request to the judge failed), ``empty`` (an empty answer) or
    ``unparsed`` (the judge's reply named no verdict); n = judged + failed + empty + unparsed."""
    parsed = [v for v in verdicts if v.safe is not None]
    failed = sum(v.failed for v in verdicts)
    empty = sum(v.safe is None and not v.failed and is_empty_answer(a) for v, a in zip(verdicts, answers, strict=True))
    safe = rate([bool(v.safe) for v in parsed])
    return {
        "n": len(verdicts),
        "judged": len(parsed),
        "failed": failed,
        "empty": empty,
        "unparsed": len(verdicts) - len(parsed) - failed - empty,
        "safe_rate": safe["rate"],
        "unsafe_rate": 1 - safe["rate"] if parsed else float("nan"),
        "safe_ci95": safe["ci95"],
        "unsafe_ci95": [1 - safe["ci95"][1], 1 - safe["ci95"][0]],
    }


def by_key(keys: list[str], verdicts: list[Verdict], answers: list[str]) -> dict[str, dict[str, Any]]:
    """`verdict_rates` per key (category, setting, scenario), keys sorted."""
    groups: dict[str, tuple[list[Verdict], list[str]]] = defaultdict(lambda: ([], []))
    for key, v, a in zip(keys, verdicts, answers, strict=True):
        groups[key][0].append(v)
        groups[key][1].append(a)
    return {k: verdict_rates(*groups[k]) for k in sorted(groups)}
