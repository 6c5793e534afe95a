"""The one record type every reader produces and every later stage consumes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from src.errors import SettingError

ROLES = ("system", "user", "assistant")


class DataError(SettingError):
    """Bad input data; the message names the file and the record so the user can fix it.

    ``reason``, when given, is the message without what is particular to the record (its id, its path): many
    records failing for one cause are then reported as one line with a count.
    """

    label = "data error"

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


def invalid_json(where: str, e: json.JSONDecodeError, line: bool = True) -> DataError:
    """One line for a JSON syntax error; json's own messages may end in "at" ("Invalid control character at")."""
    position = f"line {e.lineno}, column {e.colno}" if line else f"column {e.colno}"
    return DataError(f"{where}: invalid JSON ({e.msg.removesuffix(' at')} at {position})")


@dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    text: str


class Conversation:
    """Behaviour shared by everything that is a prompt: a conversation with at most one image.

    Subclasses are dataclasses with ``id``, ``turns``, ``image_turn``, ``image`` and ``meta``. The image
    belongs to turn ``image_turn`` (always a user turn) and is rendered before that turn's text, the way
    LLaVA's chat template places it. ``image`` is a reference (a path relative to the data set's image
    root, or an absolute path); ``None`` means a text-only prompt.
    """

    id: str
    turns: tuple[Turn, ...]
    image_turn: int | None
    image: str | None
    meta: dict[str, Any]

    @property
    def group(self) -> str:
        """Source-conversation key: records sharing it must stay on the same side of a split."""
        return str(self.meta.get("group") or self.id)

    def stand_in_text(self) -> str:
        """What a rendered stand-in image shows: the entity, else its referring phrase, else the id."""
        for key in ("entity", "key_phrase", "replacement"):
            if self.meta.get(key):
                return str(self.meta[key])
        return str(self.id)

    def messages(self, with_image: bool = True, first_turn: int = 0) -> list[dict[str, Any]]:
        """Chat-template messages (HF content-list form) for turns ``first_turn``.. of the prompt.

        ``with_image=False`` gives the *blind* prompt: the same conversation with the image removed.
        """
        out = []
        for i, turn in enumerate(self.turns):
            if i < first_turn and turn.role != "system":
                continue
            content: list[dict[str, Any]] = []
            if with_image and i == self.image_turn:
                content.append({"type": "image"})
            content.append({"type": "text", "text": turn.text})
            out.append({"role": turn.role, "content": content})
        return out

    def history_starts(self) -> list[int]:
        """Indices at which the prompt may start when old history is dropped, oldest first.

        A prompt must start at a user turn and must keep the image turn and everything after it.
        """
        last = self.image_turn if self.image_turn is not None else len(self.turns) - 1
        return [i for i, t in enumerate(self.turns) if t.role == "user" and i <= last]


@dataclass(frozen=True)
class PreferenceRecord(Conversation):
    """A multimodal preference pair: a prompt, a chosen (harmless) and a rejected (harmful) answer.

    Answers carry no role prefix; ``blind`` is the reference model's answer without the image.
    """

    id: str
    turns: tuple[Turn, ...]
    image_turn: int | None
    image: str | None
    chosen: str
    rejected: str
    blind: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    blind_finished: bool = True  # False: the blind answer was cut by its token limit (scored without EOS)

    def with_blind(self, blind: str, finished: bool = True) -> PreferenceRecord:
        return replace(self, blind=blind, blind_finished=finished)


def validate_turns(turns: list[Turn], where: str) -> None:
    """Check roles alternate user/assistant (after optional system turns) and end on a user turn."""
    if not turns:
        raise DataError(f"{where}: the conversation has no turns")
    body = [t for t in turns if t.role != "system"]
    for i, t in enumerate(turns):
        if t.role not in ROLES:
            raise DataError(f"{where}: turn {i} has role {t.role!r}; expected one of {ROLES}")
        if t.role == "system" and i > 0 and turns[i - 1].role != "system":
            raise DataError(f"{where}: a system turn may only open the conversation (turn {i})")
    for i, t in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if t.role != expected:
            raise DataError(f"{where}: turns must alternate user/assistant starting with user; turn {i} is {t.role!r}")
    if not body or body[-1].role != "user":
        raise DataError(f"{where}: the conversation must end with a user turn (the prompt)")
