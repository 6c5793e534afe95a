"""Text-only preference data in, `TextPair` out: Anthropic-HH transcripts and the generic chat format.

Anthropic-HH style (one JSON object per line)::

    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: <chosen answer>",
     "rejected": "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: <rejected answer>"}

Both transcripts repeat the conversation; they must agree up to the last ``Assistant:`` turn, whose text is the
answer. Generic chat (one JSON object per line)::

    {"id": "c1", "messages": [{"role": "user", "content": "..."}, ...], "chosen": "...", "rejected": "..."}

``prompt`` (a string) may replace ``messages``; ``chosen`` / ``rejected`` may also be lists of messages whose
last one is the assistant answer (the TRL conversational form). Other keys are kept as metadata.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from src.data.records import DataError, Turn, invalid_json, validate_turns
from src.databuilder.base import BuildError, TextPair
from src.files import EMPTY, NOT_FOUND, file_problem

INPUT_FORMATS = ("auto", "hh", "chat")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_RESERVED = re.compile(r"<image>|\b(?:USER|ASSISTANT):")  # the MMSafe-PO conversation string's markers


def _lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) of every non-empty line; a bad line yields a DataError instead."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}: line {number}"
            try:  # a byte-order mark (Windows editors write one) opens the first line only; CRLF is JSON whitespace
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield number, DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as e:
                yield number, invalid_json(where, e, line=False)


def parse_hh_transcript(text: str, where: str) -> list[tuple[str, str]]:
    """Split ``\\n\\nHuman: ...\\n\\nAssistant: ...`` into (role, text) turns."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise DataError(f"{where}: text before the first 'Human:' turn: {parts[0][:60]!r}")
    return [(_HH_ROLES[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


def hh_pair(raw: Any, where: str, fallback_id: str) -> TextPair:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for key in ("chosen", "rejected"):
        if not isinstance(raw.get(key), str):
            raise DataError(f"{where}: field {key!r} must be a transcript string")
    chosen = parse_hh_transcript(raw["chosen"], f"{where} 'chosen'")
    rejected = parse_hh_transcript(raw["rejected"], f"{where} 'rejected'")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) < 2 or turns[-1][0] != "assistant":
            raise DataError(f"{where}: the {name!r} transcript must end with an 'Assistant:' answer")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(f"{where}: 'chosen' and 'rejected' differ before their last 'Assistant:' turn")
    meta = {k: v for k, v in raw.items() if k not in ("chosen", "rejected")}
    return _pair(str(raw.get("id", fallback_id)), chosen[:-1], chosen[-1][1], rejected[-1][1], meta, where)


def _answer_text(value: Any, key: str, where: str) -> str:
    if isinstance(value, list):  # TRL conversational form: the answer is the last (assistant) message
        if not value or not isinstance(value[-1], dict) or value[-1].get("role") != "assistant":
            raise DataError(f"{where}: {key!r} as a list must end with an assistant message")
        value = value[-1].get("content")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string")
    return value


def chat_pair(raw: Any, where: str, fallback_id: str) -> TextPair:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if isinstance(raw.get("messages"), list):
        turns = []
        for m in raw["messages"]:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: 'messages' must be {{role, content}} objects with string content")
            turns.append((str(m.get("role")), m["content"].strip()))
    elif isinstance(raw.get("prompt"), str):
        turns = [("user", raw["prompt"].strip())]
    else:
        raise DataError(f"{where}: needs 'messages' (a list) or 'prompt' (a string)")
    chosen = _answer_text(raw.get("chosen"), "chosen", where)
    rejected = _answer_text(raw.get("rejected"), "rejected", where)
    meta = {k: v for k, v in raw.items() if k not in ("id", "messages", "prompt", "chosen", "rejected")}
    return _pair(str(raw.get("id", fallback_id)), turns, chosen, rejected, meta, where)


def _pair(
    pid: str, turns: list[tuple[str, str]], chosen: str, rejected: str, meta: dict[str, Any], where: str
) -> TextPair:
    where = f"{where} (id={pid})"
    validate_turns([Turn(r, t) for r, t in turns], where)
    if any(role == "system" for role, _ in turns):
        raise DataError(f"{where}: system turns cannot be written in the MMSafe-PO format")
    for i, (_, text) in enumerate(turns):
        if not text:
            raise DataError(f"{where}: turn {i} is empty")
        if reserved := _RESERVED.search(text):
            raise DataError(f"{where}: turn {i} contains {reserved.group()!r}, reserved by the output format")
    chosen, rejected = chosen.strip(), rejected.strip()
    if not chosen or not rejected:
        raise DataError(f"{where}: an answer is empty")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical; the pair carries no preference")
    return TextPair(pid, tuple(turns), chosen, rejected, meta)


def detect_format(path: Path) -> str:
    """``hh`` when the first record's ``chosen`` is a ``Human:`` transcript, else ``chat``."""
    for _, raw in _lines(path):
        if isinstance(raw, dict) and isinstance(raw.get("chosen"), str) and "Human:" in raw["chosen"]:
            return "hh"
        return "chat"
    raise BuildError(f"{path}: the input file holds no records")


def read_text_pairs(path: str | Path, format: str = "auto", problems: list[str] | None = None) -> list[TextPair]:
    """Read every pair of a JSONL file; with ``problems`` a bad record is described there and skipped."""
    path = Path(path)
    if format not in INPUT_FORMATS:
        raise BuildError(f"input_format must be one of {INPUT_FORMATS}, got {format!r}")
    problem = file_problem(path)  # looked at, not opened: a FIFO would block the read for ever
    if problem == NOT_FOUND:
        raise BuildError(f"input file not found: {path}")
    if problem not in (None, EMPTY):  # an empty file "holds no records"
        raise BuildError(f"input file {path} is {problem}; set input to a JSONL file")
    fmt = detect_format(path) if format == "auto" else format
    make = hh_pair if fmt == "hh" else chat_pair
    pairs, seen = [], {}
    for number, raw in _lines(path):
        where = f"{path}: line {number}"
        try:
            if isinstance(raw, DataError):
                raise raw
            pair = make(raw, where, fallback_id=f"{path.stem}-{number}")
            if pair.id in seen:
                raise DataError(f"{where}: duplicate id {pair.id!r} (first on line {seen[pair.id]})")
            seen[pair.id] = number
            pairs.append(pair)
        except DataError as e:
            if problems is None:
                raise
            problems.append(str(e))
    return pairs
