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


def _split_marker(text: str, where: str, turn: int) -> tuple[str, bool]:
    """Remove the image marker (and the newline after it) from turn ``turn``; say whether it was there. ``where``
    names the record alone, so that a problem line's record label is read from it."""
    n = text.count(IMAGE_MARKER)
    if n == 0:
        return text, False
    if n > 1:
        raise DataError(f"{where}: turn {turn} holds {n} {IMAGE_MARKER} markers; exactly one image is supported")
    before, after = text.split(IMAGE_MARKER)
    return (before.rstrip() + " " + after.lstrip("\n").lstrip()).strip(), True


def _place_image(turns: list[tuple[str, str]], where: str) -> tuple[list[Turn], int | None]:
    out, image_turn = [], None
    for i, (role, text) in enumerate(turns):
        clean, has = _split_marker(text, where, i)
        if has:
            if image_turn is not None:
                raise DataError(f"{where}: more than one {IMAGE_MARKER} marker in the conversation")
            if role != "user":
                raise DataError(f"{where}: the {IMAGE_MARKER} marker is in a {role} turn; it must be in a user turn")
            image_turn = i
        out.append(Turn(role, clean))
    return out, image_turn


def parse_conversation(text: str, where: str) -> tuple[list[Turn], int | None]:
    """Parse ``USER: ... ASSISTANT: ... USER: <image>\\n... ASSISTANT:`` into turns."""
    parts = _ROLE_RE.split(text)
    if parts[0].strip():
        raise DataError(f"{where}: text before the first USER:/ASSISTANT: marker: {parts[0][:60]!r}")
    pairs = [(parts[i].lower(), parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    if pairs and pairs[-1][0] == "assistant" and not pairs[-1][1]:
        pairs = pairs[:-1]  # the trailing generation prompt "ASSISTANT:"
    turns, image_turn = _place_image(pairs, where)
    validate_turns(turns, where)
    return turns, image_turn


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
    turns, image_turn = parse_conversation(question, where)
    if image_turn is None:
        raise DataError(f"{where}: no {IMAGE_MARKER} marker in 'question'")
    if not raw["image"]:  # a marker without an image would train the pair as text-only
        raise DataError(f"{where}: the prompt has an {IMAGE_MARKER} marker but 'image' is empty ({raw['image']!r})")
    if not isinstance(raw["image"], str):
        raise DataError(f"{where}: 'image' must be a path string, got {type(raw['image']).__name__}")
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
    turns, image_turn = _place_image(pairs, where)
    validate_turns(turns, where)
    image = raw.get("image")
    if image is not None and not isinstance(image, str):
        raise DataError(f"{where}: 'image' must be a path string")
    if image and image_turn is None:
        # no marker: the image belongs to the last user turn, as in single-image chat data
        image_turn = len(turns) - 1
    if image_turn is not None and not image:
        raise DataError(f"{where}: the prompt has an {IMAGE_MARKER} marker but no 'image' field (or it is empty)")
    known = {"id", "messages", "prompt", "image", "chosen", "rejected", "blind"}
    chosen, rejected = _answer(raw["chosen"], "chosen", where), _answer(raw["rejected"], "rejected", where)
    _check_differ(chosen, rejected, where)
    return PreferenceRecord(
        id=rid,
        turns=tuple(turns),
        image_turn=image_turn,
        image=image or None,
        chosen=chosen,
        rejected=rejected,
        blind=_answer(raw["blind"], "blind", where) if raw.get("blind") else None,
        meta={k: v for k, v in raw.items() if k not in known} | {"source_format": "jsonl"},
    )


def image_question_record(
    rid: str, question: Any, image: str, chosen: Any, rejected: Any, meta: dict[str, Any], where: str
) -> PreferenceRecord:
    """A record of one question about one image with a chosen and a rejected answer (the public preference sets,
    `src.data.public_sets`). The image goes before the question, where these sets' own training code puts it; an
    ``<image>`` marker in the question is taken out. ``where`` names the row in errors."""
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field 'question' must be a non-empty string, got {question!r:.60}")
    turns, _ = _place_image([("user", question)], where)
    if not turns[0].text:
        raise DataError(f"{where}: field 'question' holds nothing but the {IMAGE_MARKER} marker")
    chosen, rejected = _answer(chosen, "chosen", where), _answer(rejected, "rejected", where)
    _check_differ(chosen, rejected, where)
    return PreferenceRecord(
        id=rid, turns=tuple(turns), image_turn=0, image=image, chosen=chosen, rejected=rejected, meta=meta
    )
