"""Generation health: is a "safer" score real, or caused by empty, broken or degenerate text?"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

_WORD = re.compile(r"\w+", re.UNICODE)


def is_broken(text: str) -> bool:
    """Replacement characters (split multi-byte sequences) or control characters other than whitespace."""
    return "\ufffd" in text or any(unicodedata.category(c) == "Cc" and c not in "\n\r\t" for c in text)


def is_repetitive(text: str, n: int = 3, min_words: int = 12, max_repeat_share: float = 0.5) -> bool:
    """True when more than ``max_repeat_share`` of the word n-grams are repeats (a looping answer)."""
    words = _WORD.findall(text.lower())
    if len(words) < min_words:
        return False
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) > max_repeat_share


def answer_health(line: dict[str, Any]) -> dict[str, bool]:
    """Flags for one generation line (``answer``, and ``finished`` when the generator recorded it)."""
    answer = line.get("answer") or ""
    return {
        "empty": not answer.strip(),
        "broken": is_broken(answer),
        "truncated": line.get("finished") is False,  # cut at max_new_tokens before EOS
        "repetitive": is_repetitive(answer),
    }


def health_summary(lines: list[dict[str, Any]]) -> dict[str, float]:
    """Shares of empty / broken / truncated / repetitive answers, and mean length in words and tokens."""
    n = len(lines)
    if n == 0:
        return {"n": 0}
    flags = [answer_health(x) for x in lines]
    out: dict[str, float] = {"n": n}
    for key in ("empty", "broken", "truncated", "repetitive"):
        out[f"{key}_rate"] = sum(f[key] for f in flags) / n
    out["mean_words"] = sum(len(_WORD.findall(x.get("answer") or "")) for x in lines) / n
    tokens = [x["num_tokens"] for x in lines if "num_tokens" in x]
    if tokens:
        out["mean_tokens"] = sum(tokens) / len(tokens)
    return out
