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
embedded images) by `src.data.hub.read_hf_dataset`; `read_records` dispatches to it for ``format=hf``, and to
`src.data.public_sets.read_public_set` for the public sets SPA-VL and RLAIF-V in their own layouts.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from src.data.convert import collect_problem, generic_record, mmsafe_record
from src.data.records import DataError, PreferenceRecord, invalid_json
from src.files import EMPTY, NOT_FOUND, file_problem


def read_mmsafe_po(path: str | Path, problems: list[str] | None = None) -> list[PreferenceRecord]:
    """Read an MMSafe-PO JSON list (fields in docs: id, question, image, chosen, rejected, ...).

    With a ``problems`` list, a bad record is described there and skipped instead of raising.
    """
    path = Path(path)
    data = load_json(path)
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


def read_jsonl(path: str | Path, problems: list[str] | None = None) -> list[PreferenceRecord]:
    """Read the generic JSONL format (module docstring). Blank lines are allowed.

    With a ``problems`` list, a bad line is described there and skipped instead of raising.
    """
    path = Path(path)
    records, seen = [], set()
    # lines end in LF, CRLF or CR; a byte-order mark (Windows editors write one) opens the first line only
    for lineno, data in enumerate(path.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines(), 1):
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
PUBLIC_FORMATS = ("spa_vl", "rlaif_v")  # local copies of public preference sets in their own layouts
FORMATS = ("auto", "mmsafe_po", "jsonl") + HF_FORMATS + PUBLIC_FORMATS
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
    """Read a data set; ``format`` is ``mmsafe_po``, ``jsonl``, ``hf``, ``hf_mmsafe_po``, ``hf_jsonl``, ``spa_vl``,
    ``rlaif_v`` or ``auto``.

    ``auto`` picks ``hf`` for a folder written by ``save_to_disk``, else goes by the file extension.
    The ``hf*`` formats read a Hugging Face data set (a hub id or a local folder, see
    `src.data.hub.read_hf_dataset`): ``split`` (default ``train``), ``image_dir`` (where embedded
    images are written as PNG files) and ``revision`` apply to them only. ``spa_vl`` and ``rlaif_v`` read a local
    copy of SPA-VL or RLAIF-V in the layout its publisher ships (`src.data.public_sets`), with ``split`` and
    ``image_dir`` as above. With a ``problems`` list, each bad
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
    if format in PUBLIC_FORMATS:
        from src.data.public_sets import read_public_set  # reads parquet through pyarrow: only when needed

        records = read_public_set(path, format, split, image_dir, problems, prefix)
        if not records:
            raise DataError(f"{path} ({format}, split {split or 'train'}): no records")
        return records
    path = Path(path)
    problem = file_problem(path)  # looked at, not opened: a FIFO would block the read for ever
    if problem == NOT_FOUND:
        raise DataError(
            f"{path}: data file not found (set {prefix}.path to an existing file, or {prefix}.format=hf for a "
            "Hugging Face dataset id or a folder written by save_to_disk)"
        )
    if problem not in (None, EMPTY):  # an empty file has "no records", below
        raise DataError(f"{path}: the data file is {problem}; set {prefix}.path to a JSON or JSONL file")
    if format == "auto":
        format = "jsonl" if path.suffix == ".jsonl" else "mmsafe_po"
    if format == "mmsafe_po":
        records = read_mmsafe_po(path, problems)
    else:
        records = read_jsonl(path, problems)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def load_json(path: Path) -> Any:
    """A JSON file's content, with or without a byte-order mark; bad UTF-8 or JSON is a `DataError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # with or without a byte-order mark
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
    problem = file_problem(path)
    if problem not in (None, EMPTY):  # an empty list keeps no record, as it says
        raise DataError(f"ids file {'not found' if problem == NOT_FOUND else f'is {problem}'}: {path}")
    lines = (line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines())
    return {line for line in lines if line and not line.startswith("#")}


def keep_listed(records: list[PreferenceRecord], ids_file: str | Path, source: str | Path) -> list[PreferenceRecord]:
    """The records whose ids ``ids_file`` lists, in their order; every listed id must be in ``source``."""
    wanted = read_ids(ids_file)
    unknown = wanted - {r.id for r in records}
    if unknown:
        raise DataError(f"{ids_file}: {len(unknown)} listed ids are not in {source}, e.g. {sorted(unknown)[:3]}")
    return [r for r in records if r.id in wanted]
