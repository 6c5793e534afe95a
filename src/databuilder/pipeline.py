"""The data builder's stages, resumable: text pairs -> entities -> images -> rephrased turns -> MMSafe-PO JSON.

Every stage appends its results to a JSONL file under ``<output_dir>/work/`` named by a hash of the stage's
component, settings and the component's ``fingerprint()`` (file contents the settings only name), so an
interrupted run continues where it stopped and a changed setting recomputes only that stage and the ones after
it; a re-run logs, per stage, how many results it reused from which file and how many are new. Within a
file, a row's key covers the inputs of that item. What is not a result is never stored: an image
lookup that failed on the way (`RETRIED_REASONS`) and a rephraser's fall-back to the rule-based turn are asked
again on every run, and counted in the report of every run. ``data.json`` and ``report.json`` are written whole
(temporary file + rename) at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from src.data.convert import mmsafe_record
from src.data.images import IMAGE_LIMITS
from src.data.records import DataError
from src.databuilder.base import (
    ENTITY_TYPES,
    RETRIED_REASONS,
    BuildError,
    Entity,
    EntityRecognizer,
    ImageMatcher,
    NoImage,
    RephraseItem,
    Rephraser,
    Rewrite,
    TextPair,
    component_fingerprint,
)
from src.databuilder.phrases import referring_phrase, rewrite_turn
from src.files import read_regular, write_atomic

log = logging.getLogger(__name__)
MAX_PROBLEMS_IN_REPORT = 200


def digest(value: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:n]


class StageLog:
    """Append-only ``key -> value`` JSONL store; a torn last line (a killed run) is ignored and overwritten."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, Any] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        good = 0
        if path.exists():
            with path.open("rb") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        break
                    self.done[row["key"]] = row["value"]
                    good += len(line)
            if good < path.stat().st_size:
                with path.open("r+b") as f:
                    f.truncate(good)
        self._file = path.open("a", encoding="utf-8")

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def __getitem__(self, key: str) -> Any:
        return self.done[key]

    def put_many(self, items: Iterable[tuple[str, Any]]) -> None:
        for key, value in items:
            self.done[key] = value
            self._file.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _one_per_item(component: Any, items: list[Any]) -> list[Any]:
    out = list(component(items))
    if len(out) != len(items):
        raise BuildError(f"{component.name!r} returned {len(out)} results for {len(items)} inputs")
    return out


def _file_digest(path: Path) -> str | None:
    """The digest of an image file's bytes; None (so the image is matched again) when it is no regular file within
    the image size limit: a FIFO or a device put in its place is never read."""
    try:
        return hashlib.sha256(read_regular(path, IMAGE_LIMITS.max_bytes)).hexdigest()[:16]
    except OSError:
        return None


def _slug(text: str) -> str:
    slug = re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_").lower()[:40]
    return f"{slug or 'entity'}-{digest(text, 8)}"


def conversation(turns: Iterable[tuple[str, str]], image_last: bool = False) -> str:
    """``USER: ... ASSISTANT: ... USER: <image>\\n... ASSISTANT:``, the MMSafe-PO conversation string."""
    turns = list(turns)
    parts = []
    for i, (role, text) in enumerate(turns):
        marker = "<image>\n" if image_last and i == len(turns) - 1 else ""
        parts.append(f"{role.upper()}: {marker}{text}")
    return " ".join(parts) + " ASSISTANT:"


def occurrences(text: str, entity: Entity) -> list[Entity]:
    """Every whole-word occurrence of the entity's surface form in ``text`` (the NER span among them)."""
    pattern = re.compile(r"(?<!\w)" + re.escape(entity.text) + r"(?!\w)")
    spans = [Entity(entity.text, entity.type, m.start(), m.end(), entity.score) for m in pattern.finditer(text)]
    return spans or [entity]


def remove_entity(text: str, entity: Entity, phrase: str) -> tuple[str, str]:
    """Replace every occurrence of the entity by the referring phrase (right to left: offsets stay valid).

    Returns the turn and the phrase used (a plural group turns "the person ..." into "the people ...").
    """
    used = phrase
    for span in sorted(occurrences(text, entity), key=lambda e: e.start, reverse=True):
        text, used = rewrite_turn(text, span, phrase)
    return text, used


@dataclass
class Candidate:
    """One output record in the making: a pair, one of its entities, and (later) its image and question."""

    pair: TextPair
    entity: Entity
    index: int  # which entity of the pair (0-based, in reading order)
    image: str | None = None
    image_source: str | None = None
    replacement: str | None = None
    mid_turn: str | None = None
    question_turn: str | None = None
    rephrased_by: str | None = None  # the rephraser's name, or "rule" when it fell back
    rephrase_fallback: str | None = None  # why the rephraser's own rewrite was not used

    @property
    def id(self) -> str:
        return f"{self.pair.id}-e{self.index}"

    @property
    def made_by(self) -> str:
        """How the question was made: ``model`` (the rephraser's name), ``rule``, ``rule (fallback: <reason>)``."""
        return f"rule (fallback: {self.rephrase_fallback})" if self.rephrase_fallback else str(self.rephrased_by)


class DatasetBuilder:
    """Runs the stages over a list of `TextPair` into ``output_dir`` (``data.json``, ``images/``, ``report.json``).

    ``stage_settings`` maps ``ner`` / ``image`` / ``rephrase`` to the settings that produced each stage's results:
    with each component's name and ``fingerprint()`` they name the stage files, so changed settings or a changed
    file behind them are never served stale results.
    """

    def __init__(
        self,
        recognizer: EntityRecognizer,
        matcher: ImageMatcher,
        rephraser: Rephraser,
        output_dir: str | Path,
        stage_settings: dict[str, Any] | None = None,
        entity_types: Iterable[str] = ENTITY_TYPES,
        max_entities: int = 1,
        min_entity_chars: int = 2,
        phrases: dict[str, list[str]] | None = None,
        record_type: str | None = None,
        ner_batch_size: int = 64,
        rephrase_batch_size: int = 16,
        progress: bool = True,
    ) -> None:
        unknown = set(entity_types) - set(ENTITY_TYPES)
        if unknown:
            raise BuildError(f"entity_types may hold {ENTITY_TYPES}; got unknown {sorted(unknown)}")
        if max_entities < 1:
            raise BuildError(f"max_entities must be >= 1, got {max_entities}")
        self.recognizer, self.matcher, self.rephraser = recognizer, matcher, rephraser
        self.output_dir = Path(output_dir)
        self.images_dir = self.output_dir / "images"
        self.work_dir = self.output_dir / "work"
        settings = stage_settings or {}
        self.keys = {
            "ner": digest([recognizer.name, settings.get("ner"), component_fingerprint(recognizer)]),
            "image": digest([matcher.name, settings.get("image"), component_fingerprint(matcher)]),
            "rephrase": digest([rephraser.name, settings.get("rephrase"), phrases, component_fingerprint(rephraser)]),
        }
        self.entity_types = tuple(entity_types)
        self.max_entities = max_entities
        self.min_entity_chars = min_entity_chars
        self.phrases = phrases
        self.record_type = record_type
        self.ner_batch_size = ner_batch_size
        self.rephrase_batch_size = rephrase_batch_size
        self.progress = progress

    def _bar(self, desc: str, total: int, initial: int = 0) -> tqdm:
        """A progress bar, or none when there is nothing left to do (`_reused` says what was taken over)."""
        quiet = not self.progress or initial >= total
        return tqdm(total=total, initial=initial, desc=desc, unit="rec", disable=quiet, leave=True)

    @staticmethod
    def _reused(store: StageLog, count: int, what: str, new: int) -> None:
        """Say what a re-run took over from an earlier run's stage file, so it is never mistaken for new work."""
        if count:
            log.info("reused %d %s from %s; %d new", count, what, store.path, new)

    # -- stages ------------------------------------------------------------------------------------
    def recognize(self, pairs: list[TextPair]) -> dict[str, list[Entity]]:
        """Entities of each pair's last user turn, by pair id."""
        store = StageLog(self.work_dir / f"ner-{self.keys['ner']}.jsonl")
        key = {p.id: f"{p.id}:{digest(p.last_user)}" for p in pairs}
        todo = [p for p in pairs if key[p.id] not in store]
        self._reused(store, len(pairs) - len(todo), "NER results (one per conversation)", len(todo))
        try:
            with self._bar("entities", len(pairs), len(pairs) - len(todo)) as bar:
                for batch in _batches(todo, self.ner_batch_size):
                    found = _one_per_item(self.recognizer, [p.last_user for p in batch])
                    store.put_many(
                        (key[p.id], [e.to_dict() for e in ents]) for p, ents in zip(batch, found, strict=True)
                    )
                    bar.update(len(batch))
        finally:
            store.close()
        return {p.id: [Entity.from_dict(d) for d in store[key[p.id]]] for p in pairs}

    def select(self, pair: TextPair, entities: list[Entity]) -> list[Entity]:
        """Usable entities of a pair, one per surface form, in reading order."""
        out, seen = [], set()
        for e in sorted(entities, key=lambda e: e.start):
            name = e.text.strip()
            if e.type not in self.entity_types or len(name) < self.min_entity_chars or name.casefold() in seen:
                continue
            if pair.last_user[e.start : e.end] != e.text:
                raise BuildError(f"pair {pair.id}: recognizer {self.recognizer.name!r} returned a bad span {e}")
            seen.add(name.casefold())
            out.append(e)
        return out

    def match_images(self, entities: list[Entity]) -> dict[str, dict[str, Any]]:
        """One image per distinct entity surface form: ``{text: {"file", "source"} | {"reason", "detail"}}``.

        The image of a surface form is matched for its first entity, and its row keyed by that entity's type
        too (a matcher may look in a folder per type). A failed lookup in `RETRIED_REASONS` is not stored.
        """
        store = StageLog(self.work_dir / f"image-{self.keys['image']}.jsonl")
        self.images_dir.mkdir(parents=True, exist_ok=True)
        texts = sorted({e.text for e in entities})
        first: dict[str, Entity] = {}
        for e in entities:
            first.setdefault(e.text, e)
        key = {t: f"{first[t].type}:{t}" for t in texts}

        def cached(text: str) -> bool:  # a result whose image file was deleted or overwritten is matched again
            row = store.done.get(key[text])
            return row is not None and ("reason" in row or _file_digest(self.images_dir / row["file"]) == row["sha"])

        todo = [t for t in texts if not cached(t)]
        self._reused(store, len(texts) - len(todo), "image lookups", len(todo))
        rows: dict[str, dict[str, Any]] = {}
        try:
            with self._bar("images", len(texts), len(texts) - len(todo)) as bar:
                for text in todo:
                    try:
                        match = self.matcher(first[text], self.images_dir / _slug(text))
                        if match.path.parent.resolve() != self.images_dir.resolve():
                            raise BuildError(f"image matcher {self.matcher.name!r} wrote outside images/: {match.path}")
                        row = {"file": match.path.name, "source": match.source, "sha": _file_digest(match.path)}
                    except NoImage as e:
                        row = {"reason": e.reason, "detail": e.detail}
                    rows[text] = row
                    if row.get("reason") not in RETRIED_REASONS:
                        store.put_many([(key[text], row)])
                    bar.update(1)
        finally:
            store.close()
        return {t: rows[t] if t in rows else store[key[t]] for t in texts}

    def rephrase(self, candidates: list[Candidate]) -> None:
        """Each candidate's ``mid_turn`` and ``question_turn``, and ``rephrased_by``: how the question was made.

        Only the rephraser's own rewrites are stored; a fall-back to the rule-based turn is asked again on the
        next run (a server that was down may be up), so every run counts its fall-backs.
        """
        store = StageLog(self.work_dir / f"rephrase-{self.keys['rephrase']}.jsonl")
        for c in candidates:
            phrase = referring_phrase(c.entity.type, c.id, self.phrases)
            c.mid_turn, c.replacement = remove_entity(c.pair.last_user, c.entity, phrase)
        key = {
            c.id: f"{c.id}:{digest([c.mid_turn, c.replacement, c.entity.text, c.entity.type, c.image])}"
            for c in candidates
        }
        for c in candidates:
            if key[c.id] in store:
                c.question_turn, c.rephrased_by = store[key[c.id]], self.rephraser.name
        todo = [c for c in candidates if key[c.id] not in store]
        self._reused(store, len(candidates) - len(todo), "rephrasings", len(todo))
        try:
            with self._bar("rephrase", len(candidates), len(candidates) - len(todo)) as bar:
                for batch in _batches(todo, self.rephrase_batch_size):
                    items = [
                        RephraseItem(
                            c.pair.last_user, c.entity, c.mid_turn, c.replacement, self.images_dir / str(c.image)
                        )
                        for c in batch
                    ]
                    made = []
                    for c, rewrite in zip(batch, _one_per_item(self.rephraser, items), strict=True):
                        if not isinstance(rewrite, Rewrite):
                            raise BuildError(
                                f"rephraser {self.rephraser.name!r} returned a {type(rewrite).__name__} for "
                                f"{c.id}, not a Rewrite (the question and whether it fell back)"
                            )
                        reason = rewrite.fallback or (None if rewrite.text.strip() else "empty")
                        if reason is None:
                            c.question_turn, c.rephrased_by = rewrite.text.strip(), self.rephraser.name
                            made.append((key[c.id], c.question_turn))
                        else:
                            c.question_turn, c.rephrased_by, c.rephrase_fallback = c.mid_turn, "rule", reason
                    store.put_many(made)
                    bar.update(len(batch))
        finally:
            store.close()

    # -- output ------------------------------------------------------------------------------------
    def record(self, c: Candidate) -> dict[str, Any]:
        history = list(c.pair.turns[:-1])
        row = {
            "id": c.id,
            "question": conversation([*history, ("user", c.question_turn)], image_last=True),
            "image": f"images/{c.image}",
            "chosen": f"ASSISTANT: {c.pair.chosen}",
            "rejected": f"ASSISTANT: {c.pair.rejected}",
        }
        record_type = c.pair.meta.get("type", self.record_type)
        if record_type is not None:
            row["type"] = record_type
        row |= {
            "entity": c.entity.text,
            "entity_type": c.entity.type,
            "replacement": c.replacement,
            "text_prompt": conversation(c.pair.turns),
            "mid_prompt": conversation([*history, ("user", c.mid_turn)], image_last=True),
            "source_id": c.pair.id,
            "image_source": c.image_source,
            "rephrased_by": c.made_by,
        }
        return row

    def run(
        self, pairs: list[TextPair], problems: list[str] | None = None, inputs: Any = None, beyond_max_records: int = 0
    ) -> dict[str, Any]:
        """Build the data set; returns the report (also written to ``report.json``).

        ``beyond_max_records``: conversations read but left out by a ``max_records`` limit, counted as read.
        """
        problems = list(problems or [])
        self.output_dir.mkdir(parents=True, exist_ok=True)
        found = self.recognize(pairs)
        chosen = {p.id: self.select(p, found[p.id]) for p in pairs}
        images = self.match_images([e for ents in chosen.values() for e in ents])

        candidates, dropped_pairs = [], Counter()
        image_drops: Counter = Counter()
        by_type: dict[str, Counter] = defaultdict(Counter)
        for p in pairs:
            ents = chosen[p.id]
            if not ents:
                dropped_pairs["no_entity"] += 1
                continue
            kept = 0
            for e in ents:
                if kept == self.max_entities:
                    by_type[e.type]["unused"] += 1
                    continue
                row = images[e.text]
                if "reason" in row:
                    image_drops[row["reason"]] += 1
                    by_type[e.type][f"dropped_{row['reason']}"] += 1
                    continue
                candidates.append(Candidate(p, e, kept, row["file"], row["source"]))
                by_type[e.type]["records"] += 1
                kept += 1
            if not kept:
                dropped_pairs["no_image"] += 1
        self.rephrase(candidates)

        records = []
        for c in candidates:
            row = self.record(c)
            try:  # the training reader must take every record as written
                mmsafe_record(row, f"built record {c.id}")
            except DataError as e:
                raise BuildError(f"built record {c.id} does not read back: {e}") from None
            records.append(row)
        write_atomic(self.output_dir / "data.json", json.dumps(records, ensure_ascii=False, indent=1) + "\n")

        used = {c.pair.id for c in candidates}
        report = {
            "inputs": inputs,
            "components": {"ner": self.recognizer.name, "image": self.matcher.name, "rephrase": self.rephraser.name},
            "pairs": {
                "read": len(pairs) + len(problems) + beyond_max_records,
                "beyond_max_records": beyond_max_records,
                "bad_record": len(problems),
                "no_entity": dropped_pairs["no_entity"],
                "no_image": dropped_pairs["no_image"],
                "used": len(used),
            },
            "entities": {
                "found": sum(len(v) for v in found.values()),
                "usable": sum(len(v) for v in chosen.values()),
                "found_by_type": dict(Counter(e.type for v in found.values() for e in v)),
                "distinct_looked_up": len(images),
                "images_matched": sum("file" in r for r in images.values()),
                "image_drop_reasons": dict(Counter(r["reason"] for r in images.values() if "reason" in r)),
            },
            "records": {
                "written": len(records),
                "by_entity_type": dict(Counter(c.entity.type for c in candidates)),
                "per_entity_type": {t: dict(v) for t, v in sorted(by_type.items())},
                "entity_candidates_dropped_for_image": dict(image_drops),
                "rephrased_by": dict(Counter(c.made_by for c in candidates)),
                "rephrase_fallbacks": dict(Counter(c.rephrase_fallback for c in candidates if c.rephrase_fallback)),
            },
            "problems": problems[:MAX_PROBLEMS_IN_REPORT],
            "problems_not_shown": max(0, len(problems) - MAX_PROBLEMS_IN_REPORT),
        }
        write_atomic(self.output_dir / "report.json", json.dumps(report, ensure_ascii=False, indent=2) + "\n")
        return report
