"""Shared types of the data builder (modality interpretation of text-only preference data).

Stages, each a pluggable component chosen by a Hydra group of ``configs/build_dataset.yaml``:

    read (HH / chat)  ->  ner  ->  image  ->  rephrase  ->  MMSafe-PO JSON + images/ + report.json

A `TextPair` is a text-only preference conversation. NER finds `Entity` spans in its last user turn;
an image matcher writes one image file for an entity or raises `NoImage` with a reason; the entity is
replaced in the turn by a referring phrase (``mid_prompt``), which a rephraser may rewrite fluently
(``question``).

Stage results are cached (`src.databuilder.pipeline`) under a key of the component's name and settings. A component
whose results depend on more than its settings (the contents of a file or folder its settings only name) has a
``fingerprint() -> str`` that changes with that content; it becomes part of the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ENTITY_TYPES = ("PER", "ORG", "LOC", "MISC")
# `NoImage` reasons that are a failure of the way to the image, not a fact about the entity: never cached,
# so a re-run asks again
RETRIED_REASONS = frozenset({"timeout", "network_error"})


class BuildError(ValueError):
    """Bad builder input or configuration; the message names the file / record / setting to fix."""


@dataclass(frozen=True)
class TextPair:
    """A text-only preference conversation: ``turns`` end with the user turn both answers reply to."""

    id: str
    turns: tuple[tuple[str, str], ...]  # (role, text), role in user | assistant | system
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def last_user(self) -> str:
        return self.turns[-1][1]


@dataclass(frozen=True)
class Entity:
    """A named-entity span in a text: ``text == source[start:end]``."""

    text: str
    type: str  # one of ENTITY_TYPES
    start: int
    end: int
    score: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "type": self.type, "start": self.start, "end": self.end, "score": self.score}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entity:
        return cls(str(d["text"]), str(d["type"]), int(d["start"]), int(d["end"]), float(d.get("score", 1.0)))


class EntityRecognizer(Protocol):
    """``recognizer(texts) -> one list of entities per text`` (sorted by start, non-overlapping)."""

    name: str

    def __call__(self, texts: list[str]) -> list[list[Entity]]: ...


class NoImage(Exception):
    """No image could be matched to an entity; ``reason`` is a short drop-reason key for report.json."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageMatch:
    path: Path  # the image file written under the output images/ folder
    source: str  # where it came from: "typography", a local file path, a URL


class ImageMatcher(Protocol):
    """``matcher(entity, dest) -> ImageMatch``: write an image of ``entity`` to ``dest`` + a suffix.

    ``dest`` is a path without suffix inside the output ``images/`` folder; the matcher picks the suffix
    (``.png``, ``.jpg``, ...). Raise `NoImage` with a reason when there is no image for the entity.
    """

    name: str

    def __call__(self, entity: Entity, dest: Path) -> ImageMatch: ...


@dataclass(frozen=True)
class RephraseItem:
    text: str  # the original last user turn (entity named)
    entity: Entity
    mid_prompt: str  # the turn with the entity replaced by its referring phrase (rule-based)
    replacement: str  # the referring phrase used
    image: Path | None = None  # the matched image, for rephrasers that look at it


@dataclass(frozen=True)
class Rewrite:
    """A rephraser's question turn for one item and how it was made.

    ``fallback`` is None when the rephraser made ``text`` itself; otherwise ``text`` is the rule-based
    ``mid_prompt`` and ``fallback`` the reason the rephraser's own rewrite was not used (``request_failed``,
    ``empty``, ...). A fall-back is never cached: it is asked again on the next run.
    """

    text: str
    fallback: str | None = None


class Rephraser(Protocol):
    """``rephraser(items) -> one Rewrite per item`` (the final ``question`` turn text and how it was made)."""

    name: str

    def __call__(self, items: list[RephraseItem]) -> list[Rewrite]: ...


def component_fingerprint(component: Any) -> str | None:
    """What a component's results depend on beyond its settings (its ``fingerprint()``); None if nothing."""
    fingerprint = getattr(component, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None
