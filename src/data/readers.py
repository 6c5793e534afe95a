"""Readers: MMSafe-PO JSON and the generic JSONL format, both into `PreferenceRecord`.

Generic JSONL, one object per line::

    {"id": "r1",
     "messages": [{"role": "user", "content": "<image>\\nWhat is this?"}],
     "image": "images/r1.png",
     "chosen": "...", "rejected": "...",
     "blind": "..."}                      # optional
     ...any other keys are kept as metadata (entity, category, group, ...)

``content`` is a string (the image goes where the single ``<image>`` marker stands) or a list of
``{"type": "image"}`` / ``{"type": "text", "text": ...}`` items. ``prompt`` (a string) may replace
``messages`` for single-turn records. ``group`` names the source conversation for grouped splits.

The same two formats are read from Hugging Face `datasets` (hub ids or ``save_to_disk`` folders, with
embedded images) by `src.data.hub.read_hf_dataset`; `read_records` dispatches to it for ``format=hf``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from src.data.records import DataError, PreferenceRecord, Turn, invalid_json, validate_turns

IMAGE_MARKER = "<image>"
_ROLE_RE = re.compile(r"(?:^|(?<=\s))(USER|ASSISTANT):")
_ANSWER_PREFIX = re.compile(r"^\s*ASSISTANT:\s*")
MMSAFE_FIELDS = ("id", "question", "image", "chosen", "rejected")


def _split_marker(text: str, where: str) -> tuple[str, bool]:
    """Remove the image marker (and the newline after it) from a turn; say whether it was there."""
    n = text.count(IMAGE_MARKER)
    if n == 0:
        return text, False
    if n > 1:
        raise DataError(f"{where}: a turn holds {n} {IMAGE_MARKER} markers; exactly one image is supported")
    before, after = text.split(IMAGE_MARKER)
    return (before.rstrip() + " " + after.lstrip("\n").lstrip()).strip(), True


def _place_image(turns: list[tuple[str, str]], where: str) -> tuple[list[Turn], int | None]:
    out, image_turn = [], None
    for i, (role, text) in enumerate(turns):
        clean, has = _split_marker(text, f"{where} turn {i}")
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


def read_mmsafe_po(path: str | Path, problems: list[str] | None = None) -> list[PreferenceRecord]:
    """Read an MMSafe-PO JSON list (fields in docs: id, question, image, chosen, rejected, ...).

    With a ``problems`` list, a bad record is described there and skipped instead of raising.
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of MMSafe-PO records, got {type(data).__name__}")
    records, seen = [], set()
    for index, raw in enumerate(data):
        where = f"{path}: record #{index}"
        if isinstance(raw, dict) and "id" in raw:
            where = f"{path}: record id={raw['id']} (#{index})"
        try:
            records.append(_unique(mmsafe_record(raw, where), seen, where))
        except DataError as e:
            collect_problem(problems, e)
    return records


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
    """Convert one record of the generic format (module docstring) into a `PreferenceRecord`.

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


def read_jsonl(path: str | Path, problems: list[str] | None = None) -> list[PreferenceRecord]:
    """Read the generic JSONL format (module docstring). Blank lines are allowed.

    With a ``problems`` list, a bad line is described there and skipped instead of raising.
    """
    path = Path(path)
    records, seen = [], set()
    for lineno, data in enumerate(path.read_bytes().splitlines(), 1):
        if not data.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise invalid_json(where, e, line=False) from None
            records.append(_unique(generic_record(raw, where, fallback_id=f"line-{lineno}"), seen, where))
        except DataError as e:
            collect_problem(problems, e)
    return records


HF_FORMATS = ("hf", "hf_mmsafe_po", "hf_jsonl")  # Hugging Face `datasets`: auto, MMSafe-PO, generic
FORMATS = ("auto", "mmsafe_po", "jsonl") + HF_FORMATS
# files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write into their folder
HF_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def is_hf_dataset_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a saved Hugging Face dataset."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in HF_DISK_MARKERS)


def read_records(
    path: str | Path,
    format: str = "auto",
    *,
    split: str | None = None,
    image_dir: str | Path | None = None,
    revision: str | None = None,
    problems: list[str] | None = None,
    prefix: str = "data",
) -> list[PreferenceRecord]:
    """Read a data set; ``format`` is ``mmsafe_po``, ``jsonl``, ``hf``, ``hf_mmsafe_po``, ``hf_jsonl`` or ``auto``.

    ``auto`` picks ``hf`` for a folder written by ``save_to_disk``, else goes by the file extension.
    The ``hf*`` formats read a Hugging Face data set (a hub id or a local folder, see
    `src.data.hub.read_hf_dataset`): ``split`` (default ``train``), ``image_dir`` (where embedded
    images are written as PNG files) and ``revision`` apply to them only. With a ``problems`` list, each bad
    record is described there (one entry per record) and skipped instead of raising (`validate.py`,
    ``data.on_error=skip``); a file that cannot be read at all always raises. Errors name the settings to
    change as ``<prefix>.path`` etc. (``data`` for training, ``benchmark`` for an evaluation).
    """
    if format not in FORMATS:
        choices = ", ".join(repr(f) for f in FORMATS)
        raise DataError(f"unknown data format {format!r} ({prefix}.format); use one of {choices}")
    if format == "auto" and is_hf_dataset_dir(path):
        format = "hf"
    if format in HF_FORMATS:
        from src.data.hub import read_hf_dataset  # imports `datasets`, which is slow: only when needed

        hf_format = {"hf": "auto", "hf_mmsafe_po": "mmsafe_po", "hf_jsonl": "jsonl"}[format]
        records = read_hf_dataset(
            str(path),
            split or "train",
            hf_format,
            image_dir=image_dir,
            revision=revision,
            problems=problems,
            prefix=prefix,
        )
        if not records:
            raise DataError(f"{path} (split {split or 'train'}): no records")
        return records
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: data file not found (set {prefix}.path to an existing file, or {prefix}.format=hf for a "
            "Hugging Face dataset id or a folder written by save_to_disk)"
        )
    if format == "auto":
        format = "jsonl" if path.suffix == ".jsonl" else "mmsafe_po"
    if format == "mmsafe_po":
        records = read_mmsafe_po(path, problems)
    else:
        records = read_jsonl(path, problems)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise invalid_json(str(path), e) from None


def _unique(record: PreferenceRecord, seen: set[str], where: str) -> PreferenceRecord:
    """``record`` if its id is new (and now seen); a repeated id is an error at the repeat, naming it."""
    if record.id in seen:
        raise DataError(
            f"{where}: duplicate record id {record.id!r}; ids key caches and reports, so they must be unique"
        )
    seen.add(record.id)
    return record


def read_ids(path: str | Path) -> set[str]:
    """Record ids listed one per line (blank lines and ``#`` comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ids file not found: {path}")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return {line for line in lines if line and not line.startswith("#")}


def keep_listed(records: list[PreferenceRecord], ids_file: str | Path, source: str | Path) -> list[PreferenceRecord]:
    """The records whose ids ``ids_file`` lists, in their order; every listed id must be in ``source``."""
    wanted = read_ids(ids_file)
    unknown = wanted - {r.id for r in records}
    if unknown:
        raise DataError(f"{ids_file}: {len(unknown)} listed ids are not in {source}, e.g. {sorted(unknown)[:3]}")
    return [r for r in records if r.id in wanted]
