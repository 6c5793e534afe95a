"""Public multimodal preference sets, read in the layouts their publishers ship: SPA-VL and RLAIF-V.

Both are parquet shards on the Hugging Face hub with the image embedded in each row (``{bytes, path}``, the
``datasets`` Image feature), a ``question`` about it, a ``chosen`` and a ``rejected`` answer, and columns of their
own. ``path`` is what a user has after ``huggingface-cli download --repo-type dataset <hub id> --local-dir DIR``
(or the hub cache's snapshot folder of that download): the folder, whose shards of ``split`` are read in name
order; or one parquet file; or a folder holding one split's parquet files; or a folder written by ``save_to_disk``.
Nothing here reaches the network.

- SPA-VL (``sqrti/SPA-VL``, CC-BY-4.0): split ``train`` in ``data/train-*.parquet`` (image, question, chosen,
  rejected, image_name), split ``validation`` in ``validation/validation-*.parquet`` (image, question, chosen,
  rejected, class1, class2, class3). Its ``test`` config (``test/harm-*``, ``test/help-*``) holds questions
  without answers: no preference data. Ids are ``<split>-<row>``, the row counted over the split's shards in
  order (``<file stem>-<row>`` for a single file); ``group`` is ``image_name``; ``class1`` is the ``category``.
- RLAIF-V (``openbmb/RLAIF-V-Dataset``, CC-BY-NC-4.0): one split, ``train``, in ``RLAIF-V-Dataset_*.parquet`` at
  the top (ds_name, image, question, chosen, rejected, origin_dataset, origin_split, idx, image_path). Ids are
  ``idx``; ``group`` is ``image_path``; ``origin_dataset`` is the ``category``; ``origin_split`` (JSON text: the
  answering and the feedback model, the question type) is kept parsed.

An id met again in the same read gets ``~2``, ``~3``, ... (the row's own fields keep the original). Without the
set's group column a row is grouped by its picture's content. Embedded images are written once each as PNG files
named by their content under ``image_dir/<format>/`` (`src.data.hub.ContentImages`), so the pictures that several
questions share are one file. Every row read becomes a record or, with a ``problems`` list, one problem line naming
the file, the row and the id (without one, the first bad row raises); a file that cannot be read at all, or that
lacks the set's columns, always raises.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.data.convert import collect_problem, image_question_record
from src.data.hub import ContentImages
from src.data.records import DataError, PreferenceRecord
from src.files import file_problem

log = logging.getLogger(__name__)

ANSWER_COLUMNS = ("image", "question", "chosen", "rejected")
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes into its folder


def _texts(raw: dict[str, Any], keys: tuple[str, ...]) -> dict[str, str]:
    """The non-empty string fields of ``keys``, stripped."""
    return {k: raw[k].strip() for k in keys if isinstance(raw.get(k), str) and raw[k].strip()}


def _spa_vl_meta(raw: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    meta: dict[str, Any] = _texts(raw, ("image_name", "class1", "class2", "class3"))
    if "class1" in meta:
        meta["category"] = meta["class1"]
    return meta, meta.get("image_name")


def _rlaif_v_meta(raw: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    meta: dict[str, Any] = _texts(raw, ("ds_name", "origin_dataset", "idx", "image_path"))
    info = raw.get("origin_split")
    if isinstance(info, str) and info.strip():
        try:
            parsed = json.loads(info)
        except json.JSONDecodeError:
            parsed = None
        meta["origin_split"] = parsed if isinstance(parsed, dict) else info.strip()
    if "origin_dataset" in meta:
        meta["category"] = meta["origin_dataset"]
    return meta, meta.get("image_path")


def _idx_or_row(raw: dict[str, Any], source: str, row: int) -> str:
    idx = raw.get("idx")
    return str(idx).strip() if idx is not None and str(idx).strip() else f"{source}-{row}"


@dataclass(frozen=True)
class PublicSet:
    """How one public set is laid out and what its rows become.

    ``splits``: each preference split's shards in a downloaded copy (a glob under its folder). ``meta``: a row's
    metadata and its group (None: grouped by its picture). ``ident``: a row's id from the row, the source (split or
    file stem) and its index in the source.
    """

    name: str
    title: str
    hub_id: str
    splits: dict[str, str]
    meta: Callable[[dict[str, Any]], tuple[dict[str, Any], str | None]]
    ident: Callable[[dict[str, Any], str, int], str]


SETS = {
    "spa_vl": PublicSet(
        "spa_vl",
        "SPA-VL",
        "sqrti/SPA-VL",
        {"train": "data/train-*.parquet", "validation": "validation/validation-*.parquet"},
        _spa_vl_meta,
        lambda raw, source, row: f"{source}-{row}",
    ),
    "rlaif_v": PublicSet(
        "rlaif_v",
        "RLAIF-V",
        "openbmb/RLAIF-V-Dataset",
        {"train": "RLAIF-V-Dataset_*.parquet"},
        _rlaif_v_meta,
        _idx_or_row,
    ),
}


def download_advice(format: str, key: str) -> str:
    """How to get a local copy of the public set ``format`` and point the setting ``key`` at it."""
    spec = SETS[format]
    return (
        f"{spec.title} is read from a local copy: download it once with `huggingface-cli download --repo-type "
        f"dataset {spec.hub_id} --local-dir DIR` and set {key}=DIR"
    )


def read_public_set(
    path: str | Path,
    format: str,
    split: str | None = None,
    image_dir: str | Path | None = None,
    problems: list[str] | None = None,
    prefix: str = "data",
) -> list[PreferenceRecord]:
    """The records of one split (default ``train``) of a local copy of the public set ``format`` (module docstring).

    With a ``problems`` list, a bad row is described there and skipped instead of raising. Errors name the settings
    to change as ``<prefix>.path`` etc. (``data`` for training, ``benchmark`` for an evaluation).
    """
    spec = SETS[format]
    split = split or "train"
    local = Path(path).expanduser()
    if not local.exists():
        raise DataError(f"{path}: not found. {download_advice(format, f'{prefix}.path')}")
    if image_dir is None:  # a setting, not a row, is wrong: raises even when skipping
        raise DataError(
            f"{path}: {spec.title} embeds its images in the data; set {prefix}.image_dir (image_dir=...) to a "
            "writable folder where they are written once as files"
        )
    images = ContentImages(image_dir, spec.name, prefix)
    records: list[PreferenceRecord] = []
    used: set[str] = set()
    repeated = 0
    for number, (label, row, source, raw) in enumerate(_rows(local, spec, split, prefix)):
        rid = spec.ident(raw, source, number)
        if rid in used:
            repeated += 1
            copy = 2
            while f"{rid}~{copy}" in used:
                copy += 1
            rid = f"{rid}~{copy}"
        used.add(rid)
        where = f"{label}: row #{row} (id={rid})"
        try:
            records.append(_record(spec, raw, rid, images, where))
        except DataError as e:
            collect_problem(problems, e)
    if repeated:
        log.info("%s: %d rows repeat an id met before; they are told apart by ~2, ~3, ...", path, repeated)
    log.info(
        "%s (%s, split %s): %d records; %d embedded images written, %d reused, under %s",
        path,
        spec.title,
        split,
        len(records),
        images.written,
        images.reused,
        images.folder,
    )
    return records


def _record(spec: PublicSet, raw: dict[str, Any], rid: str, images: ContentImages, where: str) -> PreferenceRecord:
    """One row as a record, its image written (or found) as a file."""
    value = raw.get("image")
    if value is None or (isinstance(value, dict) and not value.get("bytes") and not value.get("path")):
        raise DataError(f"{where}: the row has no image (every {spec.title} row embeds one)")
    target, key = images.target(value, where)
    meta, group = spec.meta(raw)
    meta |= {"group": group or f"image:{key}", "source_format": spec.name}
    record = image_question_record(
        rid, raw.get("question"), str(target), raw.get("chosen"), raw.get("rejected"), meta, where
    )
    images.store(value, target, key, where)
    return record


def _rows(path: Path, spec: PublicSet, split: str, prefix: str) -> Iterator[tuple[str, int, str, dict[str, Any]]]:
    """(label naming the file or split, row index in it, id source, row) of every row of the split, in order."""
    if path.is_dir() and any((path / name).is_file() for name in SAVED_MARKERS):
        yield from _saved_rows(path, spec, split, prefix)
        return
    if path.is_file():
        files, source = [path], path.stem.split(".")[0]
    else:
        files, source = _split_files(path, spec, split, prefix), split
    for file in files:
        for row, raw in enumerate(_parquet_rows(file, spec, prefix)):
            yield str(file), row, source, raw


def _split_files(folder: Path, spec: PublicSet, split: str, prefix: str) -> list[Path]:
    """The parquet files of ``split`` in a downloaded copy; else every parquet file directly in ``folder``."""
    if split not in spec.splits:
        raise DataError(
            f"{folder}: {spec.title} has no preference split {split!r}; set {prefix}.split to one of "
            f"{sorted(spec.splits)}"
        )
    pattern = spec.splits[split]
    files = sorted(folder.glob(pattern)) or sorted(folder.glob("*.parquet"))
    if not files:
        raise DataError(
            f"{folder}: no parquet files of split {split!r} ({pattern}) and none directly in the folder. "
            f"{download_advice(spec.name, f'{prefix}.path')}, or point it at a parquet file"
        )
    return files


def _check_columns(columns: list[str], spec: PublicSet, what: str, prefix: str) -> None:
    missing = [c for c in ANSWER_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"{what}: no column(s) {missing}; {spec.title} rows have {list(ANSWER_COLUMNS)} (it has {columns}). "
            f"Is {prefix}.format={spec.name} the right set, and {prefix}.split a split with answers?"
        )


def _parquet_rows(file: Path, spec: PublicSet, prefix: str) -> Iterator[dict[str, Any]]:
    """A parquet file's rows as dicts, read in batches (an embedded image stays ``{bytes, path}``)."""
    import pyarrow as pa  # a dependency of `datasets`; imported only when a parquet file is read
    import pyarrow.parquet as pq

    problem = file_problem(file)
    if problem is not None:
        raise DataError(f"{file}: the parquet file is {problem}")
    try:
        parquet = pq.ParquetFile(file)
        columns = parquet.schema_arrow.names
    except (OSError, ValueError, pa.ArrowException) as e:
        raise DataError(f"{file}: not a readable parquet file ({type(e).__name__}: {e})") from None
    _check_columns(columns, spec, str(file), prefix)
    batches = parquet.iter_batches(batch_size=64)
    while True:
        try:
            batch = next(batches, None)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise DataError(f"{file}: a part of the parquet file cannot be read ({type(e).__name__}: {e})") from None
        if batch is None:
            return
        yield from batch.to_pylist()


def _saved_rows(path: Path, spec: PublicSet, split: str, prefix: str) -> Iterator[tuple[str, int, str, dict[str, Any]]]:
    """The rows of a folder written by ``save_to_disk`` (a DatasetDict's ``split``, or a single Dataset)."""
    from src.data.hub import load_hf_split, undecoded_images  # imports `datasets`: only for such a folder

    label = f"{path} (split {split})"
    dataset = undecoded_images(load_hf_split(str(path), split, None, prefix), label)
    _check_columns(list(dataset.column_names), spec, label, prefix)
    for row, raw in enumerate(dataset):
        yield label, row, split, dict(raw)
