"""Preference data from Hugging Face `datasets`: MMSafe-PO in its hub form, or the generic format.

``path`` is a hub id (``Downton/MMSafe-PO``) or a local folder. A folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` is read with ``datasets.load_from_disk``; anything
else goes to ``datasets.load_dataset(path, split=..., revision=...)``, which reaches the network only when
the user is online (with ``HF_HUB_OFFLINE=1`` it reads the local hub cache only). This module makes no
network call of its own.

Rows are converted by the same code as the file readers (`mmsafe_record`, `generic_record`), so a hub row
and the matching JSON record give the same `PreferenceRecord`. Records keep a path as their image: an
embedded image (a ``datasets.Image`` value, raw bytes, or a PIL image) is written once as a PNG file under
``image_dir/<dataset>/<split>/<record id>.png`` and the record points at that absolute path. Embedded PNG
bytes are copied as they are (and reused when a file of the same size is there); other encodings are
converted to PNG, tagged with a fingerprint of the source bytes, and reused when the tag matches, so a
second read of a large data set neither decodes nor writes anything (`store_png`). `ContentImages` writes them the
same way under names made from their content, for data sets whose rows share pictures (`src.data.public_sets`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from PIL import PngImagePlugin

from src.data.convert import collect_problem, generic_record, mmsafe_record
from src.data.images import IMAGE_LIMITS, check_image_size
from src.data.records import DataError, PreferenceRecord
from src.files import read_regular, write_atomic

log = logging.getLogger(__name__)

HF_SUBFORMATS = ("auto", "mmsafe_po", "jsonl")
IMAGE_COLUMN = "image"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
_SOURCE_TAG = "mllm-bpo-source"  # PNG text chunk: fingerprint of the non-PNG bytes a file was converted from
_CONVERSATION_START = re.compile(r"^\s*(USER|ASSISTANT):")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def read_hf_dataset(
    path: str,
    split: str = "train",
    format: str = "auto",
    image_dir: str | Path | None = None,
    revision: str | None = None,
    problems: list[str] | None = None,
    prefix: str = "data",
) -> list[PreferenceRecord]:
    """Read one split of a Hugging Face data set into preference records.

    ``format``: ``mmsafe_po`` (MMSafe-PO rows: ``prompt`` or ``question`` holding a ``USER: ...``
    conversation, ``image``, ``chosen``, ``rejected`` and metadata; ``id`` is optional, the row index
    stands in for it), ``jsonl`` (the generic format: ``messages`` or ``prompt``, ``chosen``, ``rejected``,
    optional ``blind``, optional ``image`` as a path string or an embedded image, metadata columns), or
    ``auto`` (see `detect_format`). ``image_dir`` is required when any record has an embedded image.
    Errors name the data set, the split, the row and the record id. With a ``problems`` list, a bad row is
    described there and skipped instead of raising; a missing ``image_dir`` always raises. Errors name the
    settings as ``<prefix>.path`` and ``<prefix>.image_dir`` (``data`` for training, ``benchmark`` for an evaluation).
    """
    if format not in HF_SUBFORMATS:
        raise DataError(f"unknown Hugging Face data format {format!r}; use one of {HF_SUBFORMATS}")
    dataset = load_hf_split(path, split, revision, prefix)
    label = f"{path} (split {split})"
    dataset = undecoded_images(dataset, label)
    if format == "auto":
        format = detect_format(dataset)
        log.info("%s: detected format %s", label, format)
    writer = _ImageWriter(image_dir, _dataset_slug(path, revision), _safe_name(split), prefix)
    records: list[PreferenceRecord] = []
    seen: set[str] = set()
    for index, row in enumerate(dataset):
        raw = dict(row)
        if raw.get("id") is None:
            raw.pop("id", None)
        rid = str(raw.get("id", index))
        where = f"{label}: row #{index}"
        image = raw.get(IMAGE_COLUMN)
        embedded = image is not None and not isinstance(image, str)
        if embedded and _is_empty_image(image):
            raw[IMAGE_COLUMN], embedded = None, False
        if embedded:  # a setting, not a row, is wrong when image_dir is missing: raises even when skipping
            raw[IMAGE_COLUMN] = str(writer.target(rid, f"{where} (id={rid})"))
        try:
            if format == "mmsafe_po":
                record = mmsafe_record(raw, f"{where} (id={rid})", fallback_id=str(index))
            else:  # appends the id to `where` itself
                record = generic_record(raw, where, fallback_id=str(index))
            if record.id in seen:
                raise DataError(
                    f"{where} (id={record.id}): duplicate record id {record.id!r}; ids key caches and reports, "
                    "so they must be unique"
                )
            if embedded:
                writer.write(image, record.id, f"{where} (id={record.id})")
        except DataError as e:
            collect_problem(problems, e)
            continue
        seen.add(record.id)
        records.append(record)
    if writer.written or writer.reused:
        log.info(
            "%s: %d embedded images written, %d reused, under %s",
            label,
            writer.written,
            writer.reused,
            writer.folder,
        )
    return records


def load_hf_split(path: str, split: str = "train", revision: str | None = None, prefix: str = "data") -> Any:
    """The ``datasets.Dataset`` of one split: ``load_from_disk`` for a saved folder, else ``load_dataset``."""
    import datasets

    local = Path(path).expanduser()
    if local.is_dir() and (local / "dataset_dict.json").is_file():
        dataset_dict = datasets.load_from_disk(str(local))
        if split not in dataset_dict:
            raise DataError(f"{path}: no split {split!r} in this saved DatasetDict; it has {sorted(dataset_dict)}")
        return dataset_dict[split]
    if local.is_dir() and (local / "state.json").is_file():
        if revision:
            log.warning("%s: a folder written by save_to_disk has no revisions; ignoring revision=%s", path, revision)
        return datasets.load_from_disk(str(local))  # a single split: `split` only names it
    try:
        dataset = datasets.load_dataset(path, split=split, revision=revision)
    except (OSError, ValueError) as e:  # offline/not found (ConnectionError, FileNotFoundError), unknown split
        raise DataError(
            f"{path}: cannot load split {split!r} with datasets.load_dataset ({type(e).__name__}: {e}). "
            "Offline, download it first while online (huggingface-cli download --repo-type dataset "
            f"{path}) and set HF_HUB_OFFLINE=1, or point {prefix}.path at a folder written by save_to_disk."
        ) from e
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(f"{path}: expected one split ({split!r}) as a datasets.Dataset, got {type(dataset).__name__}")
    return dataset


def detect_format(dataset: Any, sample: int = 20) -> str:
    """``mmsafe_po`` for MMSafe-PO rows, else ``jsonl`` (the generic format).

    MMSafe-PO: a ``question`` column, or ``prompt`` and ``chosen`` columns whose prompts are
    ``USER: ...`` conversations. A ``messages`` column always means the generic format.
    """
    columns = set(dataset.column_names)
    if "messages" in columns:
        return "jsonl"
    if "question" in columns:
        return "mmsafe_po"
    if {"prompt", "chosen"} <= columns:
        prompts = [p for p in dataset.select_columns(["prompt"])[:sample]["prompt"] if isinstance(p, str)]
        if prompts and all(_CONVERSATION_START.match(p) for p in prompts):
            return "mmsafe_po"
    return "jsonl"


def undecoded_images(dataset: Any, label: str) -> Any:
    """Read the image column undecoded (bytes, no PIL round trip); drop other image columns."""
    import datasets

    others = [c for c, f in dataset.features.items() if c != IMAGE_COLUMN and isinstance(f, datasets.Image)]
    if others:
        log.info("%s: ignoring image column(s) %s (only %r is used)", label, others, IMAGE_COLUMN)
        dataset = dataset.remove_columns(others)
    feature = dataset.features.get(IMAGE_COLUMN)
    if isinstance(feature, datasets.Image) and feature.decode:
        dataset = dataset.cast_column(IMAGE_COLUMN, datasets.Image(decode=False))
    return dataset


def _is_empty_image(value: Any) -> bool:
    if isinstance(value, dict):
        return not value.get("bytes") and not value.get("path")
    return isinstance(value, (bytes, bytearray)) and not value


def _safe_name(text: str, limit: int = 80) -> str:
    """A file name made of ``[A-Za-z0-9._-]``; a short hash keeps changed or shortened names distinct."""
    safe = _UNSAFE.sub("_", text).strip("._")
    if safe != text or len(safe) > limit or not safe:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
        safe = f"{safe[:limit]}-{digest}" if safe else digest
    return safe


def _dataset_slug(path: str, revision: str | None) -> str:
    local = Path(path).expanduser()
    if local.exists():  # a local folder: its name, plus a hash of where it is
        resolved = str(local.resolve())
        return f"{_safe_name(local.resolve().name, 60)}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"
    return _safe_name(path + (f"@{revision}" if revision else ""))


class _ImageWriter:
    """Writes embedded images once, atomically, as PNG files under ``image_dir/<dataset>/<split>/``."""

    def __init__(self, image_dir: str | Path | None, dataset: str, split: str, prefix: str):
        self.prefix = prefix  # of the image_dir setting named in errors
        self.folder = Path(image_dir).expanduser().resolve() / dataset / split if image_dir else None
        self.written = 0
        self.reused = 0

    def target(self, record_id: str, where: str) -> Path:
        if self.folder is None:
            raise DataError(
                f"{where}: the image is embedded in the data set and must be written to a file; set "
                f"{self.prefix}.image_dir (image_dir=...) to a writable folder"
            )
        return self.folder / f"{_safe_name(record_id)}.png"

    def write(self, value: Any, record_id: str, where: str) -> Path:
        target = self.target(record_id, where)
        if store_png(value, target, where):
            self.written += 1
        else:
            self.reused += 1
        return target


class ContentImages:
    """Embedded images written once each as PNG files under ``image_dir/<name>/``, named by a hash of their bytes: a
    picture that several rows share (several questions about one image) is one file, written by the first of them.

    ``target`` names the file of an image (and its key, by which rows of one picture are grouped); ``store`` writes
    it, or finds it there already; ``written`` / ``reused`` count both. ``prefix`` names the image_dir setting in
    errors (``data`` for training, ``benchmark`` for an evaluation).
    """

    def __init__(self, image_dir: str | Path | None, name: str, prefix: str = "data"):
        self.prefix = prefix
        self.folder = Path(image_dir).expanduser().resolve() / name if image_dir else None
        self.written = 0
        self.reused = 0
        self._stored: set[str] = set()  # keys written or found in this read

    def target(self, value: Any, where: str) -> tuple[Path, str]:
        """(the file the image is written to, its content key); a `DataError` naming ``where`` for a value that is
        no image, or with no image_dir set (then a setting is wrong, not the row: the caller raises it always)."""
        if self.folder is None:
            raise DataError(
                f"{where}: the image is embedded in the data set and must be written to a file; set "
                f"{self.prefix}.image_dir (image_dir=...) to a writable folder"
            )
        source = _source_bytes(value, where)
        data = source if source is not None else _to_png(value, None)
        key = hashlib.sha256(data).hexdigest()[:32]
        return self.folder / f"{key}.png", key

    def store(self, value: Any, target: Path, key: str, where: str) -> None:
        """Write the image of ``key`` to ``target`` (from `target`), unless this read or an earlier one did."""
        if key not in self._stored and store_png(value, target, where):
            self.written += 1
        else:
            self.reused += 1
        self._stored.add(key)


def store_png(value: Any, target: Path, where: str) -> bool:
    """Write an embedded image (encoded bytes, ``{'bytes', 'path'}``, or a decoded PIL image) to ``target`` as PNG;
    False, writing nothing, where the file there already holds it.

    PNG bytes are copied as they are (a file of the same size there is taken to be them); other encodings are
    decoded (within the image bounds) and converted, the file tagged with a fingerprint of the source bytes, and
    reused when the tag matches, so that a second read of a large data set neither decodes nor writes anything.
    """
    source = _source_bytes(value, where)
    if source is not None and source.startswith(_PNG_MAGIC):
        data = source  # already PNG: copied as is
        if target.is_file() and target.stat().st_size == len(data):
            return False
    elif source is not None:
        tag = f"{len(source)}:{hashlib.sha256(source).hexdigest()}"
        if target.is_file() and _png_tag(target) == tag:
            return False
        data = _to_png(_open(source, where), tag)
    else:  # a decoded PIL image
        data = _to_png(value, None)
        if target.is_file() and target.stat().st_size == len(data):
            return False
    write_atomic(target, data)
    return True


def _source_bytes(value: Any, where: str) -> bytes | None:
    """The encoded bytes of an embedded image, or None for a decoded PIL image."""
    if isinstance(value, PILImage.Image):
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            try:
                return read_regular(value["path"], IMAGE_LIMITS.max_bytes)  # a FIFO or device is refused, not read
            except OSError as e:
                raise DataError(
                    f"{where}: the embedded image refers to {value['path']!r}, which cannot be read: {e}"
                ) from None
    raise DataError(
        f"{where}: 'image' must be a path string or an embedded image (PIL image, bytes, or "
        f"{{'bytes', 'path'}}), got {type(value).__name__}"
    )


def _open(data: bytes, where: str) -> PILImage.Image:
    try:
        image = PILImage.open(io.BytesIO(data))
        check_image_size(image.size, f"{where}: the embedded image")  # from its header, before decoding it
        image.load()
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: the embedded image cannot be decoded: {e}") from None
    return image


def _to_png(image: PILImage.Image, tag: str | None) -> bytes:
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    info = None
    if tag is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(_SOURCE_TAG, tag)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _png_tag(path: Path) -> str | None:
    try:
        with PILImage.open(path) as image:  # reads the chunks before the pixel data only
            return image.info.get(_SOURCE_TAG)
    except (OSError, SyntaxError, ValueError):
        return None
