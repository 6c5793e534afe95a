"""What a benchmark yields: prompts to answer, each with its category and setting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from src.data.records import Conversation, Turn, hold_pictures

# the right behaviour for an item, in ``meta["expected"]``: refuse (or warn about) a harmful request, help with a
# harmless one; an item without it is harmful (the benchmarks of harmful requests only)
REFUSE = "refuse"
HELP = "help"


@dataclass(frozen=True)
class EvalItem(Conversation):
    """One prompt of a benchmark.

    ``id`` is unique within a benchmark run (it keys generations.jsonl), e.g. ``"01-Illegal_Activitiy/3/sd"``.
    ``category`` is what reports break figures down by (harm category, scenario, entity type);
    ``setting`` distinguishes variants of the same question (``text_only``, ``sd``, ``typo``,
    ``sd_typo``; ``text`` / ``image`` in co-defense). ``meta`` keeps benchmark fields: ``entity`` or
    ``key_phrase`` (drawn on stand-in images), reference answers ``chosen`` / ``rejected`` when the
    benchmark has them, ``scenario``, ``question_id``; ``expected`` (`REFUSE` or `HELP`) where a benchmark has
    harmless items beside harmful ones: a harmless item's refusal is an over-refusal (`is_harmless`).
    """

    id: str
    turns: tuple[Turn, ...]
    image_turn: int | None
    image: str | None
    category: str = "all"
    setting: str = "default"
    meta: dict[str, Any] = field(default_factory=dict)
    images: tuple[str, ...] = ()  # several pictures: as `PreferenceRecord` holds them
    image_turns: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        hold_pictures(self)

    @property
    def prompt_text(self) -> str:
        """The last user turn's text (what a judge is shown as the request)."""
        return self.turns[-1].text


def single_turn(item_id: str, text: str, image: str | None, **kwargs: Any) -> EvalItem:
    """An item with one user turn; the image (if any) goes before the text."""
    return EvalItem(id=item_id, turns=(Turn("user", text),), image_turn=0 if image else None, image=image, **kwargs)


def is_harmless(item: EvalItem) -> bool:
    """Whether helping is the right answer to ``item`` (its refusal is an over-refusal)."""
    return item.meta.get("expected", REFUSE) == HELP
