"""Helpers both entity recognizers share: tag-set label names to entity types, span edges, name keys."""

from __future__ import annotations

import re
import string

# label names of other tag sets mapped to the CoNLL-03 types; value types (dates, numbers) are not names
LABEL_ALIASES = {
    "PER": "PER",
    "PERS": "PER",
    "PERSON": "PER",
    "ORG": "ORG",
    "ORGANIZATION": "ORG",
    "ORGANISATION": "ORG",
    "LOC": "LOC",
    "LOCATION": "LOC",
    "GPE": "LOC",
    "FAC": "LOC",
    "MISC": "MISC",
    "NORP": "MISC",
}
_VALUE_LABELS = frozenset({"DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "ORDINAL", "CARDINAL"})

APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'"})  # 1:1, offsets kept
_EDGE_CHARS = string.whitespace + string.punctuation + "\u2018\u2019\u201c\u201d\u00ab\u00bb\u2026\u2013\u2014"
_KEEP_FINAL_DOT = re.compile(r"(?:^|[\s.])(?:[A-Z]|Jr|Sr|Inc|Co|Corp|Ltd|St|Mt)\.$")


def entity_type(label: str) -> str | None:
    """The entity type of a tag-set type name (``PERSON`` -> PER, ``GPE`` -> LOC), None for value types.

    Unknown names are MISC.
    """
    name = label.strip().upper()
    if name in _VALUE_LABELS:
        return None
    return LABEL_ALIASES.get(name, "MISC")


def strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """``(start, end)`` narrowed past surrounding spaces, punctuation and a possessive "'s".

    The dot of an abbreviation stays: "U.S.", "Jr.".
    """
    while start < end and text[start] in _EDGE_CHARS:
        start += 1
    while start < end and text[end - 1] in _EDGE_CHARS:
        if text[end - 1] == "." and _KEEP_FINAL_DOT.search(text[start:end]):
            break
        end -= 1
    if end - start > 2 and text[end - 2 : end].translate(APOSTROPHES).lower() == "'s":
        return strip_span(text, start, end - 2)
    return start, end


def norm_key(name: str) -> str:
    """Gazetteer key: straight apostrophes, single spaces, no leading "The"."""
    key = " ".join(name.translate(APOSTROPHES).split())
    return key[4:] if key.startswith("The ") and len(key) > 4 else key
