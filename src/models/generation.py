"""Batched greedy generation of answers, written to a resumable JSONL file keyed by record id.

One component serves blind answers (the prompt with the image removed) and answers with the image.
Each line of the output is ``{"id", "prompt_sha", "source", "answer", ...}``; a line is only trusted when its
``prompt_sha`` matches the prompt now built for that record (tokens and pixel inputs) and its ``source`` the
model, attention kernel and generation settings now used, so an edited record, or a file written by another
model or with other settings (a user-named `generate.py` output), is regenerated.
Lines are appended and flushed batch by batch, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from src.data.encoding import PromptEncoder, cat_image_inputs, inputs_digest
from src.data.images import ImageResolver
from src.data.prompt_format import PromptFormat
from src.data.records import Conversation, DataError, PreferenceRecord
from src.files import locked
from src.models.factory import fingerprint
from src.models.logprobs import add_token_types, attn_implementation
from src.models.predict import generate_on_devices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_length: int = 512  # prompt + answer budget; old history is dropped to fit

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _prompt_sha(record: Conversation, prompt: tuple[list[int], Any, str]) -> str:
    """Identity of a prompt: its token ids (so template and tokenizer changes count) and the exact image
    inputs (so another image file, a stand-in or other processor settings count, not just the path)."""
    return _sha(json.dumps([prompt[0], inputs_digest(prompt[1])]))


def read_generations(path: Path) -> dict[str, dict[str, Any]]:
    """Read a generations JSONL; a torn last line (from a killed run) is ignored with a warning."""
    out: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return out
    # line by line as bytes: a write killed inside a multi-byte character leaves a line that is not UTF-8
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            item = None
        if not isinstance(item, dict) or "id" not in item:
            log.warning("%s:%d: unreadable line ignored (interrupted write?); it will be regenerated", path, n)
            continue
        out[str(item["id"])] = item
    return out


def drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a write interrupted by a kill) so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        log.warning(
            "%s: removing an unfinished last line (%d bytes) left by an interrupted run", path, len(data) - keep
        )
        f.truncate(keep)


class AnswerGenerator:
    """Generate answers for records with ``model`` (greedy by default), batched with left padding."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        settings: GenerationSettings,
        resolver: ImageResolver | None = None,
        devices: dict[str, Any] | None = None,
        prompt_format: PromptFormat | None = None,
    ):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.settings = settings
        self.resolver = resolver or ImageResolver(missing="error")
        # Lightning Trainer arguments (accelerator, devices, strategy) to spread generation over devices
        self.devices = dict(devices) if devices else None
        # what made an answer, besides its prompt: checked per line, whatever file the lines are in
        self.source = _sha(fingerprint(model) + attn_implementation(model) + settings.key())
        self.encoder = PromptEncoder(
            processor,
            max_length=max(1, settings.max_length - settings.max_new_tokens),
            prompt_format=prompt_format,
        )

    def prompt(self, record: Conversation, with_image: bool) -> tuple[list[int], Any, str]:
        """(prompt ids, image inputs or None, rendered prompt text) with old history dropped to fit."""
        image = self.resolver.resolve(record) if with_image and record.image else None  # several: a list
        for start in record.history_starts():
            ids = self.encoder.prompt_ids(record, image, first_turn=start)
            if len(ids) <= self.encoder.max_length:
                break
        text = self.encoder.prompt_text(record, with_image=image is not None, first_turn=start)
        return ids, self.encoder.image_inputs(image), text

    @torch.no_grad()
    def _generate_batch(self, prompts: list[tuple[list[int], Any, str]]) -> list[dict[str, Any]]:
        """Answers with their token count and whether EOS ended them (False: cut at max_new_tokens)."""
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(len(p[0]) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, (ids, _, _) in enumerate(prompts):  # left padding: the answer starts at the same column
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
        inputs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        inputs = add_token_types(self.model, inputs)
        images = cat_image_inputs([p[1] for p in prompts if p[1] is not None])
        for key, value in images.items():
            inputs[key] = value.to(device, dtype) if key == "pixel_values" else value.to(device)
        s = self.settings
        sampling = (
            {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p} if s.do_sample else {"do_sample": False}
        )
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            **inputs,
            max_new_tokens=s.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id,
            **sampling,
        )
        self.model.train(was_training)
        results = []
        eos = self.tokenizer.eos_token_id
        for row in out[:, width:].tolist():
            finished = eos in row
            tokens = row[: row.index(eos) + 1] if finished else row
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results.append({"answer": text, "num_tokens": len(tokens), "finished": finished})
        return results

    def run(
        self,
        records: list[Conversation],
        path: str | Path,
        with_image: bool,
        desc: str = "generating",
        lock: bool = False,
    ) -> dict[str, dict[str, Any]]:
        """Generate for every record not already answered in ``path``.

        Returns {id: line} for all records, a line being ``{"id", "prompt_sha", "source", "with_image", "answer",
        "num_tokens", "finished"}``. With ``lock``, ``path`` is filled under its inter-process lock (a cache that
        concurrent jobs share): in one process the lock is held from reading to the last line, so a concurrent job
        waits, then reuses every line. Over devices it is held only to read the file and for rank 0's append: the
        processes must all reach the predict loop's collectives, and those Lightning launches read the file only
        once inside it, so a lock rank 0 kept across it would stall them for ever. Concurrent jobs over devices can
        then both generate an answer; their lines never interleave. A record whose prompt cannot be encoded (a
        `DataError`, e.g. a text too long) gets ``{"id", "answer": "", "num_tokens": 0, "finished": False,
        "error"}``, kept out of ``path``; encoding the record for training rejects it with the same reason.
        """
        path = Path(path)
        if lock and not self.devices:
            with locked(path):
                return self.run(records, path, with_image, desc)
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path) if lock else nullcontext():  # no half-written line of another job is cut or read
            drop_torn_tail(path)
            done = read_generations(path)
        results: dict[str, dict[str, Any]] = {}
        todo = []
        for record in records:
            try:
                prompt = self.prompt(record, with_image)
            except DataError as e:  # e.g. a text too long: no answer, never written to the file, not a crash
                log.warning("%s: no answer for record %s: %s", desc, record.id, e)
                results[record.id] = {
                    "id": record.id,
                    "answer": "",
                    "num_tokens": 0,
                    "finished": False,
                    "error": str(e),
                }
                continue
            prev = done.get(record.id)
            if prev is not None and (prev.get("prompt_sha"), prev.get("source")) == (
                _prompt_sha(record, prompt),
                self.source,
            ):
                results[record.id] = prev
            else:
                todo.append((record, prompt))
        # longest prompt first (stable: ties keep record order), so each batch holds prompts of similar length and
        # left padding is small; the lines go to the file in this order, the results come back in record order
        todo.sort(key=lambda item: -len(item[1][0]))
        self.generated = len(todo)
        if todo:
            log.info("%s: %d to generate, %d reused from %s", desc, len(todo), len(results), path)
        if todo and self.devices:
            outputs = generate_on_devices(self, [p for _, p in todo], self.devices)
            lines = [
                {"id": r.id, "prompt_sha": _prompt_sha(r, p), "source": self.source, "with_image": with_image} | o
                for (r, p), o in zip(todo, outputs, strict=True)
            ]
            results |= {line["id"]: line for line in lines}
            if is_main_process():
                with locked(path) if lock else nullcontext(), open(path, "a", encoding="utf-8") as f:
                    f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
            return {r.id: results[r.id] for r in records}
        with open(path, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc=desc, disable=not todo) as bar:
            for start in range(0, len(todo), self.settings.batch_size):
                chunk = todo[start : start + self.settings.batch_size]
                outputs = self._generate_batch([p for _, p in chunk])
                for (record, prompt), output in zip(chunk, outputs, strict=True):
                    line = {
                        "id": record.id,
                        "prompt_sha": _prompt_sha(record, prompt),
                        "source": self.source,
                        "with_image": with_image,
                    }
                    results[record.id] = line = line | output
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(chunk))
        return {r.id: results[r.id] for r in records}


def is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def blind_cache_path(cache_dir: str | Path, model: torch.nn.Module, settings: GenerationSettings) -> Path:
    """Cache file for blind answers: one per (model weights and dtype, attention kernel, generation settings)."""
    key = _sha(fingerprint(model) + attn_implementation(model) + settings.key())
    return Path(cache_dir) / f"blind-{key}.jsonl"


def fill_blind_answers(
    records: Iterable[PreferenceRecord],
    reference: torch.nn.Module,
    processor: Any,
    settings: GenerationSettings,
    cache_dir: str | Path,
    devices: dict[str, Any] | None = None,
    prompt_format: PromptFormat | None = None,
) -> tuple[list[PreferenceRecord], dict[str, Any]]:
    """Give every record without a blind answer the reference model's answer to the image-less prompt.

    Answers come from (and go to) a JSONL cache keyed by record id and a fingerprint of the model and
    generation settings, so a second run with the same model and settings generates nothing; a line is reused
    only for the same prompt tokens (``prompt_format``'s system prompt included; blind prompts have no image). The
    cache is filled under its lock, so the jobs of a sweep launched in parallel generate each answer once (over
    ``devices``, see `AnswerGenerator.run`).
    Returns the records and a summary (counts, cache path).
    """
    records = list(records)
    missing = [r for r in records if r.blind is None]
    summary: dict[str, Any] = {"records": len(records), "given_in_data": len(records) - len(missing)}
    if not missing:
        return records, summary | {"generated": 0, "from_cache": 0}
    path = blind_cache_path(cache_dir, reference, settings)
    generator = AnswerGenerator(reference, processor, settings, devices=devices, prompt_format=prompt_format)
    lines = generator.run(missing, path, with_image=False, desc="blind answers", lock=True)
    generated = generator.generated
    filled = []
    for r in records:
        if r.blind is None:
            # an empty generation is still a (bad) answer; score its EOS rather than drop the record. One cut
            # by max_new_tokens is scored without EOS (lines from before `finished` was stored count as cut).
            line = lines[r.id]
            filled.append(r.with_blind(line["answer"], finished=bool(line.get("finished", False))))
        else:
            filled.append(r)
    summary |= {
        "generated": generated,
        "from_cache": len(missing) - generated,
        "empty": sum(not line["answer"] for line in lines.values()),
        "unfinished": sum(not line.get("finished", False) for line in lines.values()),
        "cache": str(path),
    }
    return filled, summary
