"""LightningDataModule of multimodal preference pairs."""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from lightning import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader

from src.data.convert import collect_problem
from src.data.data_settings import DataNeeds, EncodingSettings, LoaderSettings, ReaderSettings, data_settings, flat
from src.data.dataset import EpochShuffle, PreferenceDataset, check_conditional
from src.data.encoding import EncodeStats, PromptEncoder, collate_pairs
from src.data.images import Drawer, ImageResolver, check_corruption
from src.data.prompt_format import PromptFormat
from src.data.public_sets import download_advice
from src.data.readers import HF_FORMATS, PUBLIC_FORMATS, keep_listed, read_records
from src.data.records import DataError, PreferenceRecord, Turn
from src.errors import SettingError
from src.files import EMPTY, NOT_FOUND, file_problem

log = logging.getLogger(__name__)

# where a problem line names its record: "record 7", "f.jsonl:3", "f.jsonl:3 (id=x)", "f.json: record id=x (#2)"
_WHERE = re.compile(r"^(record [^:]+|.*?(?:\(id=[^)]*\)|\(#\d+\)|record #\d+|:\d+)): (.*)$", re.S)
_LABEL = re.compile(r"id=([^)\s]+)|^record (\S+)$|record (#\d+)$|:(\d+)$")
SHOWN_IDS = 5  # record ids listed per reason
# the data set shipped with the project: its images are not shipped, every one is drawn as a stand-in by design
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"


def split_problem(problem: str) -> tuple[str, str]:
    """(record, what is wrong) of a problem line; the record is a short label (id, "#index", "line N"), "" if none."""
    match = _WHERE.match(problem)
    if not match:
        return "", problem
    label = _LABEL.search(match[1])
    if label is None:
        return match[1], match[2]
    return label[1] or label[2] or label[3] or f"line {label[4]}", match[2]


def check_data_paths(data: Any) -> None:
    """The files and folders the data settings name exist: a typo fails in a second, before any model loads.

    ``data``: the ``data`` config (``path``, ``format``, ``val_path``, ``image_root``, ``ids_file``). Data sets
    read through Hugging Face ``datasets`` (``data.format=hf*``) may be hub ids: reading them checks them.
    """
    if not data.get("path"):  # data=jsonl (or another format) without data.path: never the default data instead
        raise SettingError(
            f"data.path is not set: data.format={data.get('format')} reads the file, folder or dataset that "
            "data.path names (data.path=...)"
        )
    files = [("data.path", data.get("path")), ("data.val_path", data.get("val_path"))]
    if data.get("format") not in HF_FORMATS:
        for key, path in files:
            problem = file_problem(str(path)) if path else None
            if problem == NOT_FOUND:
                advice = "set it to an existing file, or data.format=hf for a Hugging Face dataset id"
                if data.get("format") in PUBLIC_FORMATS:
                    advice = download_advice(data.get("format"), key)
                raise DataError(f"{path}: data file not found ({key}; {advice})")
            # a FIFO or a device is refused here, never read; a folder may be a data set saved by save_to_disk
            if problem not in (None, EMPTY) and not Path(str(path)).is_dir():
                raise DataError(f"{path}: the data file is {problem} ({key})")
    ids_file, image_root = data.get("ids_file"), data.get("image_root")
    problem = file_problem(str(ids_file)) if ids_file else None
    if problem == NOT_FOUND:
        raise DataError(f"{ids_file}: ids file not found (data.ids_file)")
    if problem not in (None, EMPTY):
        raise DataError(f"{ids_file}: the ids file is {problem} (data.ids_file)")
    if image_root and not Path(str(image_root)).is_dir():
        raise DataError(f"{image_root}: no such image folder (data.image_root)")


def check_max_length(data: Any, processor: Any, prompt_format: PromptFormat | None = None) -> None:
    """``data.max_length`` leaves room for an answer after the shortest prompt with a picture (the template and the
    image tokens alone) in ``prompt_format``; else every record with an image would be skipped as too long, after
    the model loaded."""
    size = data.get("stand_in_size") or _image_size(processor)
    encoder = PromptEncoder(processor, data.max_length, data.min_answer_tokens, prompt_format)
    record = PreferenceRecord("shortest", (Turn("user", "?"),), 0, "render:?", chosen="", rejected="")
    shortest = len(encoder.prompt_ids(record, Image.new("RGB", (size, size))))
    if data.max_length < shortest + data.min_answer_tokens:
        raise SettingError(
            f"data.max_length={data.max_length} is out of range: the shortest prompt with a picture takes {shortest} "
            f"tokens (the image's and the chat template's) and an answer at least data.min_answer_tokens="
            f"{data.min_answer_tokens}: set data.max_length >= {shortest + data.min_answer_tokens}"
        )


def grouped_split(
    records: list[PreferenceRecord], val_fraction: float, seed: int = 0
) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """Split by source conversation (``record.group``) so no group lands on both sides.

    Groups are ordered by a seeded hash, which keeps the split stable when records are added.
    """
    if val_fraction <= 0:
        return list(records), []
    groups = sorted({r.group for r in records}, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    n_val = max(1, round(len(groups) * val_fraction))
    val_groups = set(groups[:n_val])
    return [r for r in records if r.group not in val_groups], [r for r in records if r.group in val_groups]


class PreferenceDataModule(LightningDataModule):
    """Reads a preference data set, splits it by source conversation, encodes it with the processor.

    Its settings come in groups, each one value (`src.data.data_settings`): ``reader`` (which records, from where,
    split how), ``encoding`` (``max_length``), ``loader`` (batches), ``prompt_format`` (the model's system prompt and
    how non-square images reach it, `PromptFormat`) and ``needs``: the answers each example carries, in order, and
    the corruption of ``chosen_corrupted``'s image, as the objective says (`DataNeeds`). Every record in the data
    file(s) is counted exactly once (see `summary`): left out by ``ids_file`` / ``max_records``, usable, rejected
    as bad input (``on_error=skip``), or skipped because it does not fit ``max_length``; nothing is dropped
    silently. ``image_drawers`` are the resolver's drawers of image references that are no files (`ImageResolver`).
    `from_config` builds one from the flat ``data`` config node.
    """

    def __init__(
        self,
        reader: ReaderSettings,
        encoding: EncodingSettings | None = None,
        loader: LoaderSettings | None = None,
        prompt_format: PromptFormat | None = None,
        needs: DataNeeds | None = None,
        processor: Any = None,
        image_drawers: dict[str, Drawer] | None = None,
    ):
        super().__init__()
        # a group left out (None) takes its defaults
        self.reader, self.encoding, self.loader = reader, encoding or EncodingSettings(), loader or LoaderSettings()
        self.prompt_format, self.needs = prompt_format or PromptFormat(), needs or DataNeeds()
        # logged and checkpointed flat, as the data config names them; plain containers (checkpoints load with
        # weights_only)
        hparams = flat(self.reader, self.encoding, self.loader) | self.prompt_format.to_dict()
        self.save_hyperparameters(hparams | {"answers": list(self.needs.answers), "corruption": self.needs.corruption})
        self.answers = self.needs.answers
        # the corrupted image of chosen_corrupted (mDPO's conditional term); checked even when no answer needs it
        self.corruption = None if self.needs.corruption is None else check_corruption(self.needs.corruption)
        # with on_error=skip, bad records are described here, skipped and counted, never dropped silently
        self.problems: list[str] | None = [] if reader.on_error == "skip" else None
        self.problem_reasons: dict[int, str] = {}  # index in problems -> DataError.reason, where it has one
        self.skipped_records: list[str] = []  # one line per record skipped at encoding, naming it and why
        self.records_in_file = 0  # every record of data.path and data.val_path, kept or rejected
        self.not_selected: Counter = Counter()  # records left out on purpose, by the setting that did it
        self.processor = processor
        path = reader.path
        data_folder = Path(path).parent if Path(path).is_file() else None
        size = reader.stand_in_size or _image_size(processor)
        self.resolver = ImageResolver(
            reader.image_root, reader.missing_images, size, data_folder, drawers=image_drawers
        )
        self.records: list[PreferenceRecord] | None = None
        self.val_records_given: list[PreferenceRecord] | None = None
        self.stats: dict[str, EncodeStats] = {}
        self.encoded: dict[str, PreferenceDataset] = {}  # by split, kept for summary() when setup() stopped
        self.train_set: PreferenceDataset | None = None
        self.val_set: PreferenceDataset | None = None

    @classmethod
    def from_config(
        cls,
        data: Mapping[str, Any],
        prompt_format: PromptFormat | None = None,
        needs: DataNeeds | None = None,
        processor: Any = None,
        image_drawers: dict[str, Drawer] | None = None,
    ) -> PreferenceDataModule:
        """From the flat ``data`` config node (`data_settings` sorts its keys into the groups)."""
        reader, encoding, loader = data_settings(data)
        return cls(reader, encoding, loader, prompt_format, needs, processor, image_drawers)

    # -- records -------------------------------------------------------------------------------
    def load_records(self) -> list[PreferenceRecord]:
        """Read the data file(s) once; returns every record (train and validation)."""
        if self.records is None:
            reader = self.reader
            records = self._read(reader.path, reader.split)
            if reader.ids_file:
                n = len(records)
                records = keep_listed(records, reader.ids_file, reader.path)
                self.not_selected["ids_file"] = n - len(records)
                log.info("kept the %d of %d records listed in %s", len(records), n, reader.ids_file)
            if reader.max_records and len(records) > reader.max_records:
                self.not_selected["max_records"] = len(records) - reader.max_records
                records = records[: reader.max_records]
            self.records = records
            if reader.val_path:
                self.val_records_given = self._drop_shared_ids(records, self._read(reader.val_path, reader.val_split))
            log.info("read %d records from %s", len(records), reader.path)
            # fail fast on missing images; with on_error=skip each one is described when encoding instead
            missing = 0 if self.problems is not None else self.resolver.check(records + (self.val_records_given or []))
            if missing:
                shipped_without = Path(reader.path).resolve().parent == EMBEDDED_DIR
                log.log(
                    logging.INFO if shipped_without else logging.WARNING,
                    "%d images not found: a stand-in is drawn for each where an image is used "
                    "(data.missing_images=render)%s",
                    missing,
                    "; the embedded data set ships no images" if shipped_without else "",
                )
        return self.records + (self.val_records_given or [])

    def _read(self, path: str, split: str | None) -> list[PreferenceRecord]:
        """The good records of one file; all of its records are counted, the rejected ones included."""
        reader = self.reader
        rejected_before = len(self.problems or [])
        records = read_records(
            path,
            reader.format,
            split=split,
            image_dir=reader.image_dir,
            revision=reader.revision,
            problems=self.problems,
        )
        # the readers describe each rejected record by exactly one problem
        self.records_in_file += len(records) + len(self.problems or []) - rejected_before
        return records

    def _drop_shared_ids(self, train: list[PreferenceRecord], val: list[PreferenceRecord]) -> list[PreferenceRecord]:
        """Ids key caches and reports, so they must be unique across data.path and data.val_path too."""
        train_ids = {r.id for r in train}
        kept = []
        for r in val:
            if r.id in train_ids:
                error = DataError(
                    f"{self.reader.val_path}: record id {r.id!r} is also in {self.reader.path}; "
                    "ids must be unique across the training and validation files"
                )
                self._collect(error)
                continue
            kept.append(r)
        return kept

    def set_records(self, records: list[PreferenceRecord]) -> None:
        """Replace records by id (e.g. with blind answers filled in) before `setup`."""
        by_id = {r.id: r for r in records}
        self.load_records()
        self.records = [by_id.get(r.id, r) for r in self.records]
        if self.val_records_given:
            self.val_records_given = [by_id.get(r.id, r) for r in self.val_records_given]

    def split(self) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
        self.load_records()
        if self.val_records_given is not None:
            return self.records, self.val_records_given
        return grouped_split(self.records, self.reader.val_fraction, self.reader.split_seed)

    # -- problems ------------------------------------------------------------------------------
    def _collect(self, error: DataError) -> None:
        """Raise, or describe the bad record in ``problems`` (keeping its record-independent reason)."""
        collect_problem(self.problems, error)
        if error.reason:
            self.problem_reasons[len(self.problems) - 1] = error.reason

    def problem_groups(self, start: int = 0, end: int | None = None) -> list[dict[str, Any]]:
        """``problems[start:end]`` grouped by what is wrong, most frequent first: reason, records, first ids."""
        groups: dict[str, list[str]] = {}
        for i, problem in enumerate((self.problems or [])[start:end], start):
            record, what = split_problem(problem)
            groups.setdefault(self.problem_reasons.get(i, what), []).append(record)
        ordered = sorted(groups.items(), key=lambda g: -len(g[1]))
        return [{"reason": r, "records": len(ids), "first": ids[:SHOWN_IDS]} for r, ids in ordered]

    # -- encoding ------------------------------------------------------------------------------
    def _encode(self, records: list[PreferenceRecord], name: str) -> PreferenceDataset:
        enc = self.encoding
        encoder = PromptEncoder(self.processor, enc.max_length, enc.min_answer_tokens, self.prompt_format)
        stats = EncodeStats()
        pairs = []
        for record in records:
            try:
                check_conditional(record, self.answers)
                result = encoder.encode(record, self.resolver.resolve(record), self.answers)
            except DataError as e:  # e.g. an unreadable image: bad input, counted as rejected only
                self._collect(e)
                stats.rejected += 1
                continue
            if isinstance(result, str):
                stats.skipped[result] += 1
                self.skipped_records.append(f"{name}: record {record.id}: {result} (data.max_length={enc.max_length})")
                log.debug("%s: skipping record %s (%s)", name, record.id, result)
                continue
            stats.encoded += 1
            stats.dropped_history += result.dropped_turns > 0
            stats.truncated_answers += result.truncated_answers
            stats.truncated_extra += result.truncated_extra
            pairs.append(result)
        self.stats[name] = stats
        self.encoded[name] = dataset = PreferenceDataset(
            records, pairs, self.resolver, encoder, self.answers, self.corruption
        )
        if stats.skipped:  # one line per split; each record is named in skipped_records
            log.warning(
                "%s: %d records skipped %s (data.max_length=%d)",
                name,
                sum(stats.skipped.values()),
                dict(stats.skipped),
                self.encoding.max_length,
            )
        return dataset

    def _nothing_usable(self, name: str, records: int, problems: tuple[int, int]) -> str:
        """Why no record of a split is usable: the reasons with their counts; max_length only if it is one."""
        stats = self.stats[name]
        reasons = [f"{g['records']} records: {g['reason']}" for g in self.problem_groups(*problems)]
        reasons += [
            f"{n} records skipped: {why} (data.max_length={self.encoding.max_length})"
            for why, n in stats.skipped.items()
        ]
        hint = f"; raise data.max_length (now {self.encoding.max_length})" if stats.skipped else ""
        return f"{name}: none of the {records} records is usable: {'; '.join(reasons)}{hint}"

    def setup(self, stage: str | None = None) -> None:
        if self.processor is None:
            raise ValueError("PreferenceDataModule needs the model's processor (pass processor=...)")
        if self.train_set is not None:
            return
        train, val = self.split()
        # both splits are encoded before any stop, so every problem is described (validate.py reports them all)
        before_train = len(self.problems or [])
        train_set = self._encode(train, "train")
        before_val = len(self.problems or [])
        val_set = self._encode(val, "val") if val else None
        problems = {"train": (before_train, before_val), "val": (before_val, len(self.problems or []))}
        for name, records, dataset in (("train", train, train_set), ("val", val, val_set)):
            if records and not dataset.pairs:
                raise ValueError(self._nothing_usable(name, len(records), problems[name]))
        self.train_set, self.val_set = train_set, val_set

    def fit_sets(self) -> list[PreferenceDataset]:
        """The encoded splits there are, train first (after `setup`)."""
        return [d for d in (self.train_set, self.val_set) if d is not None]

    def set_reference_logps(self, values: list[list[list[float]]]) -> None:
        """Give every pair its reference log-probs: ``values[d][i]`` for item ``i`` of `fit_sets` ``d``."""
        for dataset, rows in zip(self.fit_sets(), values, strict=True):
            dataset.set_reference_logps(rows)

    def summary(self, limit: int | None = 100) -> dict[str, Any]:
        """Where every record of the data file(s) went, counted once; per-split encoding figures.

        ``records_in_file`` = ``not_selected`` (by data.ids_file / data.max_records) + ``records_read``, and
        ``records_read`` = ``usable`` + ``rejected_records`` (bad input, each described in ``problems``) +
        ``skipped`` (does not fit data.max_length, each named in ``skipped_records``). ``stand_in_images``
        counts the usable records whose missing image is drawn as a stand-in. ``limit`` caps the two lists.
        """
        if "train" not in self.encoded:  # set by setup(), also when it stopped because no record is usable
            raise RuntimeError("PreferenceDataModule.summary() needs setup() first")
        usable = sum(s.encoded for s in self.stats.values())
        skipped_by_reason = sum((s.skipped for s in self.stats.values()), Counter())
        skipped = sum(skipped_by_reason.values())
        rejected = len(self.problems or [])
        records_read = self.records_in_file - sum(self.not_selected.values())
        if records_read != usable + rejected + skipped:  # a bookkeeping bug: never report numbers that disagree
            raise RuntimeError(
                f"data accounting does not add up: {records_read} records read != {usable} usable + "
                f"{rejected} rejected + {skipped} skipped"
            )
        usable_ids = {p.id for d in self.encoded.values() for p in d.pairs}
        out: dict[str, Any] = {
            "path": str(self.reader.path),
            "records_in_file": self.records_in_file,
            "not_selected": dict(self.not_selected),
            "records_read": records_read,
            "usable": usable,
            "rejected_records": rejected,
            "skipped": skipped,
            "skipped_by_reason": dict(skipped_by_reason),
            "stand_in_images": len(self.resolver.rendered & usable_ids),
        }
        for name, stats in self.stats.items():
            out[name] = stats.summary()
        out["problems_by_reason"] = self.problem_groups()
        out["problems"] = (self.problems or [])[:limit]
        out["skipped_records"] = self.skipped_records[:limit]
        return out

    # -- loaders -------------------------------------------------------------------------------
    def _loader(self, dataset: PreferenceDataset, batch_size: int, shuffle: bool) -> DataLoader:
        sampler = None
        if shuffle:
            sampler = self.train_sampler = EpochShuffle(len(dataset), self.loader.shuffle_seed, self._epoch)
            sampler.skip, self._pending_skip = getattr(self, "_pending_skip", 0), 0
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.loader.num_workers,
            collate_fn=partial(collate_pairs, pad_token_id=_pad_id(self.processor)),
            persistent_workers=self.loader.num_workers > 0,
        )

    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def resume_within_epoch(self, batches_done: int, world_size: int = 1) -> None:
        """After a restart in the middle of an epoch: leave out the batches already trained on."""
        skip = batches_done * self.loader.batch_size * world_size
        if self.train_set is not None and skip >= len(self.train_set):
            skip = 0  # saved at the end of an epoch: the next one starts whole
        if getattr(self, "train_sampler", None) is not None:
            self.train_sampler.skip = skip
        self._pending_skip = skip  # the loader may be built after the checkpoint is read

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.loader.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None or len(self.val_set) == 0:
            return []
        batch_size = self.loader.eval_batch_size or self.loader.batch_size
        return self._loader(self.val_set, batch_size, shuffle=False)


def _pad_id(processor: Any) -> int:
    tok = getattr(processor, "tokenizer", processor)
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _image_size(processor: Any) -> int:
    crop = getattr(getattr(processor, "image_processor", None), "crop_size", None)
    height = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
    return int(height) if height else 336
