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
    """Behaviour shared by everything that is a prompt: a conversation with any number of pictures.

    Subclasses are dataclasses with ``id``, ``turns``, ``image_turn``, ``image`` and ``meta``; those that hold
    several pictures (`PreferenceRecord`) add ``images`` and ``image_turns``.

    How a record holds its pictures: ``images`` lists the references in order (each a path relative to the data
    set's image root, an absolute path, or a stand-in / drawer reference) and ``image_turns[k]`` is the turn of
    picture ``k`` (always a user turn; never decreasing). A turn's pictures are rendered before that turn's text,
    in their order, the way LLaVA's chat template places its one picture; the ``<image>`` markers that placed them
    are taken out of the text. ``image`` / ``image_turn`` are the first picture and its turn (``None``: a
    text-only prompt), which is all that code serving one picture per record reads. Here ``images`` and
    ``image_turns`` are derived from them; a subclass with the fields overrides these properties.
    """

    id: str
    turns: tuple[Turn, ...]
    image_turn: int | None
    image: str | None
    meta: dict[str, Any]

    @property
    def images(self) -> tuple[str, ...]:
        """Every picture's reference, in order (one-picture prompts: the ``image`` field)."""
        return () if self.image is None else (self.image,)

    @property
    def image_turns(self) -> tuple[int, ...]:
        """The turn of each picture of `images`."""
        return () if self.image is None or self.image_turn is None else (self.image_turn,)

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

        ``with_image=False`` gives the *blind* prompt: the same conversation with every picture removed. With
        pictures, a turn opens with one image part per picture it holds, in order.
        """
        out = []
        for i, turn in enumerate(self.turns):
            if i < first_turn and turn.role != "system":
                continue
            content: list[dict[str, Any]] = []
            if with_image:
                content.extend({"type": "image"} for t in self.image_turns if t == i)
            content.append({"type": "text", "text": turn.text})
            out.append({"role": turn.role, "content": content})
        return out

    def history_starts(self) -> list[int]:
        """Indices at which the prompt may start when old history is dropped, oldest first.

        A prompt must start at a user turn and must keep every picture's turn and everything after it.
        """
        last = min(self.image_turns, default=len(self.turns) - 1)
        return [i for i, t in enumerate(self.turns) if t.role == "user" and i <= last]


@dataclass(frozen=True)
class PreferenceRecord(Conversation):
    """A multimodal preference pair: a prompt, a chosen (harmless) and a rejected (harmful) answer.

    Answers carry no role prefix; ``blind`` is the reference model's answer without any picture.

    Pictures: give ``image`` / ``image_turn`` for one, or ``images`` / ``image_turns`` for any number with
    ``image`` / ``image_turn`` the first picture's. For a record with one picture the single fields
    win, so that ``replace(record, image=...)`` changes its picture; a record with several pictures must keep
    ``image`` / ``image_turn`` equal to its first picture's (change its pictures through ``images``).
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
    images: tuple[str, ...] = ()
    image_turns: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        hold_pictures(self)

    def with_blind(self, blind: str, finished: bool = True) -> PreferenceRecord:
        return replace(self, blind=blind, blind_finished=finished)


def hold_pictures(self: Conversation) -> None:
    """Make a frozen conversation's ``images`` / ``image_turns`` and ``image`` / ``image_turn`` agree (the rule in
    `PreferenceRecord`'s docstring); called by the ``__post_init__`` of the dataclasses that hold several pictures."""
    images, turns = tuple(self.images), tuple(self.image_turns)
    if len(images) != len(turns):
        raise ValueError(f"record {self.id}: {len(images)} pictures but {len(turns)} picture turns")
    if len(images) <= 1:  # the single fields hold the picture (or none)
        images = () if not self.image else (self.image,)
        turns = () if not self.image else (self.image_turn,)
    elif (self.image, self.image_turn) != (images[0], turns[0]):
        raise ValueError(
            f"record {self.id}: 'image'/'image_turn' differ from the first of its {len(images)} pictures; "
            "change a record's pictures through 'images'/'image_turns'"
        )
    if any(b < a for a, b in zip(turns, turns[1:], strict=False)):
        raise ValueError(f"record {self.id}: picture turns {turns} are not in order")
    object.__setattr__(self, "images", images)
    object.__setattr__(self, "image_turns", turns)
    if images:
        object.__setattr__(self, "image", images[0])
        object.__setattr__(self, "image_turn", turns[0])


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
