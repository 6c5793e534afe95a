"""One raw record (an MMSafe-PO JSON object, a generic JSONL line, a row of a Hugging Face dataset, or a row of a
public preference set) into a `PreferenceRecord`. The file readers (`src.data.readers`), the hub reader
(`src.data.hub`) and the public sets' reader (`src.data.public_sets`) convert with these functions, so a hub row
and the matching JSON record give the same record; no reader module imports another's conversion code.
"""

from __future__ import annotations

import re
from typing import Any

from src.data.records import DataError, PreferenceRecord, Turn, validate_turns

IMAGE_MARKER = "<image>"
_ROLE_RE = re.compile(r"(?:^|(?<=\s))(USER|ASSISTANT):")
_ANSWER_PREFIX = re.compile(r"^\s*ASSISTANT:\s*")
MMSAFE_FIELDS = ("id", "question", "image", "chosen", "rejected")


def _split_markers(text: str) -> tuple[str, int]:
    """``text`` without its image markers (each with the newline after it), and how many there were."""
    pieces = text.split(IMAGE_MARKER)
    clean = pieces[0]
    for piece in pieces[1:]:
        clean = clean.rstrip() + " " + piece.lstrip("\n").lstrip()
    return clean.strip(), len(pieces) - 1


def _place_images(turns: list[tuple[str, str]], where: str) -> tuple[list[Turn], list[int]]:
    """The turns without their markers, and the turn of each marker in order (a turn with two markers: twice).
    ``where`` names the record alone, so that a problem line's record label is read from it."""
    out, marker_turns = [], []
    for i, (role, text) in enumerate(turns):
        clean, n = _split_markers(text)
        if n and role != "user":
            raise DataError(f"{where}: the {IMAGE_MARKER} marker is in a {role} turn; it must be in a user turn")
        marker_turns += [i] * n
        out.append(Turn(role, clean))
    return out, marker_turns


def check_picture_count(markers: int, pictures: int, where: str) -> None:
    """Each picture needs its marker and each marker its picture; the error names both counts."""
    if markers != pictures:
        counts = (
            f"{markers} {IMAGE_MARKER} marker{'s' if markers != 1 else ''} but {pictures} "
            f"picture{'s' if pictures != 1 else ''}"
        )
        raise DataError(
            f"{where}: the prompt holds {counts}; give one marker per picture, in the pictures' order",
            reason=f"the prompt holds {counts}",
        )


def parse_conversation(text: str, where: str) -> tuple[list[Turn], int | None]:
    """Parse ``USER: ... ASSISTANT: ... USER: <image>\\n... ASSISTANT:`` into turns; the turn of the first marker."""
    turns, marker_turns = parse_conversation_markers(text, where)
    return turns, marker_turns[0] if marker_turns else None


def parse_conversation_markers(text: str, where: str) -> tuple[list[Turn], list[int]]:
    """`parse_conversation` with the turn of every marker, in order."""
    parts = _ROLE_RE.split(text)
    if parts[0].strip():
        raise DataError(f"{where}: text before the first USER:/ASSISTANT: marker: {parts[0][:60]!r}")
    pairs = [(parts[i].lower(), parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    if pairs and pairs[-1][0] == "assistant" and not pairs[-1][1]:
        pairs = pairs[:-1]  # the trailing generation prompt "ASSISTANT:"
    turns, marker_turns = _place_images(pairs, where)
    validate_turns(turns, where)
    return turns, marker_turns


def _answer(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    text = _ANSWER_PREFIX.sub("", value).strip()
    if not text:
        raise DataError(f"{where}: field {name!r} is empty")
    return text


def mmsafe_record(raw: Any, where: str, fallback_id: str | None = None) -> PreferenceRecord:
    """Convert one MMSafe-PO record (a JSON object or a hub row) into a `PreferenceRecord`.

    ``where`` names the record in error messages. ``fallback_id`` is used when the record has no id
    (the hub copy has none); without it a missing id is an error.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
    if fallback_id is not None and raw.get("id") is None:
        raw = {**raw, "id": fallback_id}
    question = raw.get("question", raw.get("prompt"))  # the hub copy names it "prompt"
    missing = [f for f in MMSAFE_FIELDS if f != "question" and f not in raw]
    if question is None:
        missing.insert(1, "question")
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")
    if not isinstance(question, str):
        raise DataError(f"{where}: field 'question' must be a string")
    turns, marker_turns = parse_conversation_markers(question, where)
    if not marker_turns:
        raise DataError(f"{where}: no {IMAGE_MARKER} marker in 'question'")
    if not raw["image"]:  # a marker without an image would train the pair as text-only
        raise DataError(f"{where}: the prompt has an {IMAGE_MARKER} marker but 'image' is empty ({raw['image']!r})")
    if not isinstance(raw["image"], str):
        raise DataError(f"{where}: 'image' must be a path string, got {type(raw['image']).__name__}")
    check_picture_count(len(marker_turns), 1, where)
    image_turn = marker_turns[0]
    meta = {k: v for k, v in raw.items() if k not in MMSAFE_FIELDS + ("prompt",)}
    # records made from one source conversation share text_prompt and both answers
    meta["group"] = str(raw.get("text_prompt") or raw["id"])
    meta["source_format"] = "mmsafe_po"
    chosen, rejected = _answer(raw["chosen"], "chosen", where), _answer(raw["rejected"], "rejected", where)
    _check_differ(chosen, rejected, where)
    return PreferenceRecord(
        id=str(raw["id"]),
        turns=tuple(turns),
        image_turn=image_turn,
        image=raw["image"],
        chosen=chosen,
        rejected=rejected,
        blind=_answer(raw["blind"], "blind", where) if raw.get("blind") else None,
        meta=meta,
    )


def _check_differ(chosen: str, rejected: str, where: str) -> None:
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical; the pair carries no preference")


def collect_problem(problems: list[str] | None, error: DataError) -> None:
    """Raise (``problems is None``) or record the problem and let the caller skip the record."""
    if problems is None:
        raise error
    problems.append(str(error))


def _content_to_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for item in content:
            if not isinstance(item, dict) or item.get("type") not in ("image", "text"):
                raise DataError(f"{where}: content items must be {{'type': 'image'|'text', ...}}")
            pieces.append(IMAGE_MARKER + "\n" if item["type"] == "image" else str(item.get("text", "")))
        return "".join(pieces)
    raise DataError(f"{where}: 'content' must be a string or a list of items")


def generic_record(raw: Any, where: str, fallback_id: str) -> PreferenceRecord:
    """Convert one record of the generic format (`src.data.readers` docstring) into a `PreferenceRecord`.

    Used for JSONL lines and for rows of a Hugging Face dataset; ``where`` names the record in errors
    (the id is appended), ``fallback_id`` is the id of a record without one.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    rid = str(raw.get("id", fallback_id))
    where = f"{where} (id={rid})"
    if "messages" in raw:
        msgs = raw["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        pairs = [(str(m.get("role")), _content_to_text(m.get("content"), where)) for m in msgs]
    elif isinstance(raw.get("prompt"), str):
        pairs = [("user", raw["prompt"])]
    else:
        raise DataError(f"{where}: needs 'messages' (a list) or 'prompt' (a string)")
    for key in ("chosen", "rejected"):
        if key not in raw:
            raise DataError(f"{where}: missing field {key!r}")
    turns, marker_turns = _place_images(pairs, where)
    validate_turns(turns, where)
    images = _pictures(raw, where)
    if not images and marker_turns:
        raise DataError(f"{where}: the prompt has an {IMAGE_MARKER} marker but no 'image' field (or it is empty)")
    if images and not marker_turns:
        # no marker: the pictures belong to the last user turn, in order, as in single-image chat data
        marker_turns = [len(turns) - 1] * len(images)
    check_picture_count(len(marker_turns), len(images), where)
    known = {"id", "messages", "prompt", "image", "images", "chosen", "rejected", "blind"}
    chosen, rejected = _answer(raw["chosen"], "chosen", where), _answer(raw["rejected"], "rejected", where)
    _check_differ(chosen, rejected, where)
    return PreferenceRecord(
        id=rid,
        turns=tuple(turns),
        image_turn=marker_turns[0] if images else None,
        image=images[0] if images else None,
        images=tuple(images),
        image_turns=tuple(marker_turns),
        chosen=chosen,
        rejected=rejected,
        blind=_answer(raw["blind"], "blind", where) if raw.get("blind") else None,
        meta={k: v for k, v in raw.items() if k not in known} | {"source_format": "jsonl"},
    )


def _pictures(raw: dict[str, Any], where: str) -> list[str]:
    """The record's picture references in order: ``images`` (a list) or ``image`` (one, or none when empty)."""
    if "images" in raw and raw.get("image"):
        raise DataError(f"{where}: give 'image' (one picture) or 'images' (a list), not both")
    if "images" not in raw:
        image = raw.get("image")
        if image is not None and not isinstance(image, str):
            raise DataError(f"{where}: 'image' must be a path string")
        return [image] if image else []
    images = raw["images"]
    if images is None:
        return []
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise DataError(f"{where}: 'images' must be a list of non-empty path strings")
    return images


def image_question_record(
    rid: str, question: Any, image: str, chosen: Any, rejected: Any, meta: dict[str, Any], where: str
) -> PreferenceRecord:
    """A record of one question about one image with a chosen and a rejected answer (the public preference sets,
    `src.data.public_sets`). The image goes before the question, where these sets' own training code puts it; an
    ``<image>`` marker in the question is taken out. ``where`` names the row in errors."""
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field 'question' must be a non-empty string, got {question!r:.60}")
    turns, markers = _place_images([("user", question)], where)
    if len(markers) > 1:
        check_picture_count(len(markers), 1, where)
    if not turns[0].text:
        raise DataError(f"{where}: field 'question' holds nothing but the {IMAGE_MARKER} marker")
    chosen, rejected = _answer(chosen, "chosen", where), _answer(rejected, "rejected", where)
    _check_differ(chosen, rejected, where)
    return PreferenceRecord(
        id=rid, turns=tuple(turns), image_turn=0, image=image, chosen=chosen, rejected=rejected, meta=meta
    )
