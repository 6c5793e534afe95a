"""Entity recognition by a transformers token-classification model (`TransformersNER`)."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from src.databuilder.base import BuildError, Entity
from src.databuilder.ner.common import entity_type, strip_span
from src.models.source import hub_offline, path_fingerprint

log = logging.getLogger(__name__)

_TAGGED_LABEL = re.compile(r"^([BIESLU])[-_](.+)$")
_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


class TransformersNER:
    """Token-classification model through transformers (default ``dslim/bert-base-NER``), loaded on first call.

    Words take the label of their first sub-token; B-/I- (or BIOES) runs of one type make an entity whose
    score is the mean of its words' label probabilities. Spans are exact character offsets into the input
    (surrounding spaces / punctuation left out); entities under ``min_score`` are dropped. Label names are
    mapped to PER / ORG / LOC / MISC (``PERSON`` -> PER, ``GPE`` -> LOC, unknown -> MISC, dates and numbers
    dropped). Long texts are read in overlapping windows of the model's length.

    ``model``: a hub id or a local folder; ``local_files_only=None`` follows ``HF_HUB_OFFLINE`` (or
    ``TRANSFORMERS_OFFLINE``).
    """

    name = "transformers"

    def __init__(
        self,
        model: str = "dslim/bert-base-NER",
        revision: str | None = None,
        batch_size: int = 32,
        min_score: float = 0.5,
        device: str = "cpu",
        trust_remote_code: bool = False,
        local_files_only: bool | None = None,
    ) -> None:
        if batch_size < 1 or not 0.0 <= min_score <= 1.0:
            raise BuildError(f"ner.batch_size must be >= 1 and ner.min_score in [0, 1], got {batch_size}, {min_score}")
        self.model = str(model)
        self.revision = revision
        self.batch_size = int(batch_size)
        self.min_score = float(min_score)
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.local_files_only = local_files_only
        self._model: Any = None
        self._tokenizer: Any = None
        self._types: dict[int, tuple[str | None, str | None]] = {}  # label id -> (tag B/I/E/S/L/U or None, type)
        self._max_length = 512

    def __repr__(self) -> str:
        return f"TransformersNER(model={self.model!r}, device={self.device!r}, min_score={self.min_score})"

    def fingerprint(self) -> str | None:
        """The model's files (names, sizes, times): a local folder, or a hub id's snapshot in the hub cache."""
        path = os.path.expanduser(self.model)
        if not os.path.isdir(path):
            from huggingface_hub import try_to_load_from_cache

            try:
                found = try_to_load_from_cache(self.model, "config.json", revision=self.revision)
            except ValueError:  # not a valid hub id: loading names the problem
                found = None
            path = os.path.dirname(found) if isinstance(found, str) else None
        return path_fingerprint(path)

    def _load(self) -> None:
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        offline = bool(hub_offline()) if self.local_files_only is None else bool(self.local_files_only)
        path = os.path.expanduser(self.model)
        if (os.path.isabs(path) or path.startswith(".") or path.count("/") > 1) and not os.path.isdir(path):
            raise BuildError(
                f"NER model folder {self.model!r} not found; set ner.model=<local path> to a folder with a "
                "token-classification model, or use ner=fallback"
            )
        kwargs: dict[str, Any] = {
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            "local_files_only": offline,
        }
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            # adapter_kwargs: transformers looks for a PEFT adapter on the hub even when local_files_only is set
            model = AutoModelForTokenClassification.from_pretrained(
                path, adapter_kwargs={"local_files_only": offline}, **kwargs
            )
        except (OSError, ValueError, KeyError) as e:
            mode = "offline (HF_HUB_OFFLINE / ner.local_files_only): only local folders and the hub cache are read"
            raise BuildError(
                f"could not load the NER model {self.model!r}: {e}\n"
                f"{mode if offline else 'online: the hub is reached for ids not in the cache'}. "
                "Set ner.model=<local path> to a downloaded token-classification model, or use ner=fallback "
                "(rule-based, no weights)."
            ) from e
        if not getattr(tokenizer, "is_fast", False):
            raise BuildError(f"NER model {self.model!r} has no fast tokenizer (tokenizer.json); offsets need one")
        types: dict[int, tuple[str | None, str | None]] = {}
        for idx, label in model.config.id2label.items():
            label = str(label)
            m = _TAGGED_LABEL.match(label)
            tag, name = (m.group(1), m.group(2)) if m else (None, label)
            types[int(idx)] = (tag, None if label.upper() == "O" else entity_type(name))
        if all(_GENERIC_LABEL.match(str(lab)) for lab in model.config.id2label.values()):
            raise BuildError(
                f"NER model {self.model!r} has no entity labels (id2label={model.config.id2label}); "
                "it is not a trained token-classification (NER) model"
            )
        limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        self._max_length = min([int(x) for x in limits if isinstance(x, int) and 8 <= x < 100_000] or [512])
        self._types = types
        self._tokenizer = tokenizer
        self._model = model.to(self.device).eval()
        log.info("ner: loaded %s on %s (%d labels)", self.model, self.device, len(types))

    def __call__(self, texts: list[str]) -> list[list[Entity]]:
        if not texts:
            return []
        if self._model is None:
            self._load()
        out: list[list[Entity]] = []
        for i in range(0, len(texts), self.batch_size):
            out.extend(self._batch(texts[i : i + self.batch_size]))
        return out

    def _batch(self, texts: list[str]) -> list[list[Entity]]:
        """Entities of a batch: word labels from each window, then BIO runs per text."""
        import torch

        enc = self._tokenizer(
            texts,
            return_offsets_mapping=True,
            return_overflowing_tokens=True,
            truncation=True,
            max_length=self._max_length,
            stride=self._max_length // 4,
            padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            inputs = {
                k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")
            }
            probs = self._model(**inputs).logits.float().softmax(-1).cpu()
        best_p, best_id = (t.tolist() for t in probs.max(-1))
        offsets = enc["offset_mapping"].tolist()
        # per text and word index: the word's character span, and per window (start of the word's first
        # token there, label id, probability); a word cut at a window's edge starts later in that window
        spans: list[dict[int, tuple[int, int]]] = [{} for _ in texts]
        votes: list[dict[int, list[tuple[int, int, float]]]] = [{} for _ in texts]
        for row, owner in enumerate(enc["overflow_to_sample_mapping"].tolist()):
            word_ids = enc.word_ids(row)
            for pos, word_id in enumerate(word_ids):
                if word_id is None:
                    continue
                start, end = offsets[row][pos]
                old = spans[owner].get(word_id, (start, end))
                spans[owner][word_id] = (min(old[0], start), max(old[1], end))
                if pos == 0 or word_ids[pos - 1] != word_id:
                    votes[owner].setdefault(word_id, []).append((start, best_id[row][pos], best_p[row][pos]))
        out = []
        for k, text in enumerate(texts):
            words = []
            for word_id in sorted(spans[k]):
                start, end = spans[k][word_id]
                whole = [v for v in votes[k][word_id] if v[0] == start]  # windows that hold the word's start
                _, label_id, score = max(whole, key=lambda v: v[2])
                words.append((start, end, label_id, score))
            out.append(self._entities(text, words))
        return out

    def _entities(self, text: str, words: list[tuple[int, int, int, float]]) -> list[Entity]:
        """BIO(ES) runs of ``(start, end, label id, score)`` words as entities, above ``min_score``."""
        groups: list[tuple[str, int, int, list[float]]] = []  # (type, start, end, word scores)
        open_group = False
        for start, end, label_id, score in words:
            tag, kind = self._types[label_id]
            if kind is None:
                open_group = False
                continue
            if open_group and tag not in ("B", "S", "U") and groups[-1][0] == kind:
                groups[-1] = (kind, groups[-1][1], end, [*groups[-1][3], score])
            else:
                groups.append((kind, start, end, [score]))
            open_group = tag not in ("E", "L", "S", "U")
        found: list[Entity] = []
        for kind, start, end, scores in groups:
            start, end = strip_span(text, start, end)
            score = sum(scores) / len(scores)
            if start < end and score >= self.min_score:
                found.append(Entity(text[start:end], kind, start, end, score))
        return found
