"""Tokenization through the model's own processor and chat template, truncation, and collation.

The prompt is rendered by ``processor.apply_chat_template`` and tokenized by the processor itself, so
image tokens are expanded by the model's own rules and never inserted by hand. An answer's tokens are
what the template appends after the generation prompt when the answer is rendered as the assistant
turn, closed by EOS, so the scored text is exactly what the model would have to generate.

Truncation never cuts the prompt (and so never cuts image tokens): oldest history turns are dropped
first, then answers are shortened from the end; a record that still does not fit is skipped with a
reason that is counted and reported. The prompt is fitted to the preference pair (chosen, rejected)
alone, exactly as DPO fits it; an extra answer (the blind one) takes the budget that is left, so BPO and
DPO train their shared term on identical prompts.

Text from data is text (`Rendered`, `PromptEncoder.text_ids`): a question, a history turn or an answer that holds a
control token's string (``</s>``, ``<image>``, ``<|im_start|>``, any token the tokenizer was given as an added token)
is tokenized as the characters it is, never as that token. The template's own markers (BOS, the image marker,
ChatML's turn markers) stay tokens, and image tokens appear only where the record's image is.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from src.data.prompt_format import PromptFormat
from src.data.records import Conversation, DataError, PreferenceRecord

IGNORE_INDEX = -100
# chosen_corrupted: the chosen text scored under the record's corrupted image (mDPO's conditional term)
ANSWER_KEYS = ("chosen", "rejected", "blind", "chosen_corrupted")
PAIR_KEYS = ANSWER_KEYS[:2]  # the answers a prompt is fitted to; others fit the budget left
CORRUPTED = "chosen_corrupted"
CORRUPTED_PREFIX = "corrupted_"  # batch keys of the corrupted image's inputs: corrupted_pixel_values, ...
# the answer whose text each column scores; the rest score their own
ANSWER_TEXT = {CORRUPTED: "chosen"}
# a text field longer than this is rejected ("text too long") before any tokenization: 100k characters are some
# 25k tokens, beyond every max_length used here (llava-1.5's 4096 tokens are ~16k characters), so such a field
# could only be cut; bounding it bounds the time and memory one record can take
MAX_TEXT_CHARS = 100_000
# stand-ins for data text while the chat template is rendered: private-use characters, which no template writes and
# no control token holds, so the rendered string says where the template put its own text and where the data's
_SLOT = re.compile("\ue000(\\d+)\ue001")


@dataclass
class EncodedPair:
    """A record tokenized for scoring: one prompt and K answers (in ``answer_keys`` order)."""

    id: str
    prompt_ids: list[int]
    answer_ids: list[list[int]]
    dropped_turns: int = 0
    truncated_answers: int = 0
    truncated_extra: int = 0  # of which extra answers (blind) shortened to the budget the pair left
    reference_logps: list[float] | None = None  # filled from the reference cache, when precomputed


@dataclass
class EncodeStats:
    """What truncation did over a data set; reported at the start and the end of a run."""

    encoded: int = 0
    rejected: int = 0  # bad input (e.g. an unreadable image), described in the data module's problems
    skipped: Counter = field(default_factory=Counter)
    dropped_history: int = 0
    truncated_answers: int = 0
    truncated_extra: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "encoded": self.encoded,
            "rejected": self.rejected,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(self.skipped),
            "records_with_history_dropped": self.dropped_history,
            "answers_truncated": self.truncated_answers,
            "blind_answers_truncated": self.truncated_extra,
        }


# processors whose models take several pictures per prompt as this encoder lays them out (`several_pictures`)
SEVERAL_PICTURES = ("LlavaProcessor", "LlavaNextProcessor", "Qwen2VLProcessor", "Qwen2_5_VLProcessor")


def _slot(i: int) -> str:
    return f"\ue000{i}\ue001"


@dataclass(frozen=True)
class Rendered:
    """A rendered chat template and where the data's text lies in it.

    ``spans``: the (start, end) character ranges of data text in ``text``, in order; None when the template
    changes the text it is given (trims it, say), so the ranges cannot be told. ``texts``: the data texts.
    """

    text: str
    spans: tuple[tuple[int, int], ...] | None
    texts: tuple[str, ...]

    def cut(self, start: int, end: int) -> Rendered:
        """``text[start:end]``, its spans moved and clipped to it."""
        spans = None
        if self.spans is not None:
            spans = tuple(
                (max(a, start) - start, min(b, end) - start) for a, b in self.spans if min(b, end) > max(a, start)
            )
        return Rendered(self.text[start:end], spans, self.texts)

    def template_pieces(self) -> list[tuple[int, str]]:
        """(offset, text) of each stretch of the template's own text (the complement of ``spans``)."""
        out, pos = [], 0
        for a, b in (*self.spans, (len(self.text), len(self.text))):
            if a > pos:
                out.append((pos, self.text[pos:a]))
            pos = max(pos, b)
        return out

    def replace_in_data(self, pattern: re.Pattern, repl: str) -> Rendered:
        """The same string with ``pattern`` replaced in the data text only (spans kept in step); ``repl`` must not
        match ``pattern``."""
        pieces, spans, pos = [], [], 0
        for a, b in self.spans:
            pieces.append(self.text[pos:a])
            start = sum(map(len, pieces))
            text = self.text[a:b]
            while pattern.search(text):  # what a removal joins ("<im<image>age>") is removed too
                text = pattern.sub(repl, text)
            pieces.append(text)
            spans.append((start, start + len(pieces[-1])))
            pos = b
        pieces.append(self.text[pos:])
        return Rendered("".join(pieces), tuple(spans), self.texts)


class PromptEncoder:
    """Render and tokenize prompts and answers of `PreferenceRecord`s with a model's processor, in the model's
    ``prompt_format`` (its system message, how its images are fitted; None: `PromptFormat`'s defaults)."""

    def __init__(
        self,
        processor: Any,
        max_length: int = 512,
        min_answer_tokens: int = 4,
        prompt_format: PromptFormat | None = None,
    ):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; answers must end with one to be scored")
        self.max_length = max_length
        self.min_answer_tokens = min_answer_tokens
        self.prompt_format = prompt_format or PromptFormat()  # None: the defaults
        self._controls: tuple[dict[str, Any], re.Pattern | None, re.Pattern | None] | None = None
        self._special_added: tuple[list[int], list[int]] | None = None

    # -- prompts -------------------------------------------------------------------------------
    def messages(self, record: Conversation, with_image: bool = True, first_turn: int = 0) -> list[dict[str, Any]]:
        """The record's chat-template messages, opened by the format's system prompt when it has no system turn."""
        messages = record.messages(with_image=with_image, first_turn=first_turn)
        system = self.prompt_format.system_prompt
        if system and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": [{"type": "text", "text": system}]}, *messages]
        return messages

    def prompt_text(self, record: Conversation, with_image: bool = True, first_turn: int = 0) -> str:
        messages = self.messages(record, with_image=with_image, first_turn=first_turn)
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, record_id: str = "?") -> Rendered:
        """The chat template rendered as `prompt_text` renders it, with the places of the data text.

        The template is rendered a second time with each text item replaced by a stand-in (`_slot`); putting the
        texts back where the stand-ins stand must give the first rendering, else the template changed the text and
        the places are unknown (``spans=None``). A text over `MAX_TEXT_CHARS` is a `DataError` ("text too long").
        """
        texts: list[str] = []

        def slot(text: str) -> str:
            if len(text) > MAX_TEXT_CHARS:
                raise DataError(
                    f"record {record_id}: a text of {len(text)} characters (more than {MAX_TEXT_CHARS}); text too long",
                    reason="text too long",
                )
            texts.append(text)
            return _slot(len(texts) - 1)

        slotted = []
        for message in messages:
            if isinstance(message["content"], str):  # templates that read plain strings (Llama Guard 3's)
                slotted.append({**message, "content": slot(message["content"])})
                continue
            content = [
                {**it, "text": slot(it["text"])} if it.get("type") == "text" else it for it in message["content"]
            ]
            slotted.append({**message, "content": content})
        apply = self.processor.apply_chat_template
        text = apply(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        pieces = _SLOT.split(apply(slotted, add_generation_prompt=add_generation_prompt, tokenize=False))
        spans, rebuilt, pos = [], [], 0
        for k, piece in enumerate(pieces):
            if k % 2:
                piece = texts[int(piece)]
                spans.append((pos, pos + len(piece)))
            rebuilt.append(piece)
            pos += len(piece)
        return Rendered(text, tuple(spans) if "".join(rebuilt) == text else None, tuple(texts))

    # -- text is text --------------------------------------------------------------------------
    # The processor parses control tokens anywhere in the string it is given, so a data text holding "</s>" would
    # train an EOS inside an answer, and one holding "<image>" would add image tokens that no image fills (the run
    # stops at the first batch). Neutralising the strings (a zero-width character) would change the text, and
    # tokenizing everything with split_special_tokens would break the template's own markers. Instead: the rendered
    # string is split at the control tokens the template wrote (found outside the data text) and the stretches
    # between them are tokenized with split_special_tokens, exactly as the tokenizer itself tokenizes each stretch
    # between control tokens; image markers take the processor's own expansion. Text without any control string
    # takes the processor's path unchanged (the ids are today's by construction); text with one takes the split
    # path only after the split path has given the processor's ids for that very prompt with the control strings
    # taken out of the data text, and otherwise the record is rejected with a reason (a DataError).
    def control_tokens(self) -> tuple[dict[str, Any], re.Pattern | None, re.Pattern | None]:
        """({string: added token}, pattern of every control string, pattern of those matched after normalization)."""
        if self._controls is None:
            tokens: dict[str, Any] = {}
            for token in getattr(self.tokenizer, "added_tokens_decoder", {}).values():
                tokens[str(getattr(token, "content", token))] = token
            for name in ("image_token", "video_token"):  # markers the processor expands by string, token or not
                marker = getattr(self.processor, name, None) if self.processor is not self.tokenizer else None
                if isinstance(marker, str) and marker:
                    tokens.setdefault(marker, None)

            def pattern(strings: list[str]) -> re.Pattern | None:
                strings = sorted((s for s in strings if s), key=len, reverse=True)  # longest first, as the tokenizer
                return re.compile("|".join(map(re.escape, strings))) if strings else None

            normalized = [s for s, t in tokens.items() if getattr(t, "normalized", False)]
            self._controls = (tokens, pattern(list(tokens)), pattern(normalized))
        return self._controls

    def hidden_control(self, rendered: Rendered) -> str | None:
        """The first control string that the data text brings into ``rendered``; None when it brings none."""
        _, everywhere, normalized = self.control_tokens()
        if everywhere is None:
            return None
        if rendered.spans is None:
            found = next((m.group() for t in rendered.texts for m in [everywhere.search(t)] if m), None)
        else:
            found = next(
                (
                    m.group()
                    for m in everywhere.finditer(rendered.text)
                    if any(m.start() < b and a < m.end() for a, b in rendered.spans)
                ),
                None,
            )
        normalizer = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "normalizer", None)
        if found is None and normalized is not None and normalizer is not None:
            found = next(
                (m.group() for t in rendered.texts for m in [normalized.search(normalizer.normalize_str(t))] if m),
                None,
            )
        return found

    def _tokenize(self, text: str, image: Any, add_special_tokens: bool) -> list[int]:
        """The processor's own tokenization (with ``image``: image tokens expanded by its rules)."""
        if image is None:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        kwargs = {} if add_special_tokens else {"add_special_tokens": False}
        ids = self.processor(text=text, images=self._fit(image), **kwargs)["input_ids"]  # image tokens: by its size
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def text_ids(
        self, rendered: Rendered, image: Any = None, add_special_tokens: bool = True, record_id: str = "?"
    ) -> list[int]:
        """Token ids of ``rendered`` with its data text tokenized as text (see the comment above)."""
        control = self.hidden_control(rendered)
        if control is None:
            return self._tokenize(rendered.text, image, add_special_tokens)
        why = f"the text holds the control string {control!r}"
        if rendered.spans is None:
            raise DataError(
                f"record {record_id}: {why}, and the chat template changes the text it renders, so the string cannot "
                "be told from the template's own tokens",
                reason="text holds a control token's string the template hides",
            )
        ids = self._split_ids(rendered, image, add_special_tokens, record_id, why)
        _, everywhere, _ = self.control_tokens()
        plain = rendered.replace_in_data(everywhere, "")
        if self._split_ids(plain, image, add_special_tokens, record_id, why) != self._tokenize(
            plain.text, image, add_special_tokens
        ):
            raise DataError(
                f"record {record_id}: {why}, and this tokenizer does not tokenize the template's stretches apart as "
                "it tokenizes the whole prompt, so the string cannot be encoded as text exactly",
                reason="text holds a control token's string this tokenizer cannot encode as text",
            )
        return ids

    def _added_by_tokenizer(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a text when it adds special tokens (BOS for Llama)."""
        if self._special_added is None:
            bare = list(self.tokenizer("a", add_special_tokens=False)["input_ids"])
            full = list(self.tokenizer("a", add_special_tokens=True)["input_ids"])
            at = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), None)
            if at is None:
                raise ValueError("cannot tell which special tokens the tokenizer adds around a text")
            self._special_added = (full[:at], full[at + len(bare) :])
        return self._special_added

    def _split_ids(
        self, rendered: Rendered, image: Any, add_special_tokens: bool, record_id: str, why: str
    ) -> list[int]:
        """The template's control tokens as tokens, everything between them tokenized as plain text."""
        tokens, everywhere, _ = self.control_tokens()
        marks = []  # (start, end, string) of the control tokens the template wrote, whitespace they strip included
        for offset, piece in rendered.template_pieces():
            for m in everywhere.finditer(piece):
                token = tokens[m.group()]
                start, end = offset + m.start(), offset + m.end()
                if getattr(token, "lstrip", False):
                    start = len(rendered.text[:start].rstrip())
                if getattr(token, "rstrip", False):
                    end = len(rendered.text) - len(rendered.text[end:].lstrip())
                marks.append((start, end, m.group()))
        bounds = [0, *[x for s, e, _ in marks for x in (s, e)], len(rendered.text)]
        stretches = [rendered.text[bounds[i] : bounds[i + 1]] for i in range(0, len(bounds), 2)]
        encoded = self.tokenizer(stretches, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        added = {self.tokenizer.convert_tokens_to_ids(t) for t, v in tokens.items() if v is not None}
        if any(i in added for ids in encoded for i in ids):  # an added token split_special_tokens does not split
            raise DataError(
                f"record {record_id}: {why}, a token of this tokenizer that it parses even in plain text",
                reason="text holds a control token's string this tokenizer cannot encode as text",
            )
        image_token = getattr(self.processor, "image_token", None) if self.processor is not self.tokenizer else None
        image_id = self.tokenizer.convert_tokens_to_ids(image_token) if image_token else None
        runs: list[int] = []
        if image is not None:  # how many tokens the processor gives each image marker of the template
            template_only = self._tokenize("".join(p for _, p in rendered.template_pieces()), image, False)
            runs = [len(list(g)) for k, g in itertools.groupby(template_only) if k == image_id]
            if len(runs) != sum(t == image_token for _, _, t in marks):
                raise DataError(f"record {record_id}: {why}, and the image tokens of the template cannot be placed")
        before, after = self._added_by_tokenizer() if add_special_tokens else ([], [])
        out = list(before) + list(encoded[0])
        for (_, _, token), ids in zip(marks, encoded[1:], strict=True):
            n = runs.pop(0) if image is not None and token == image_token else 1
            out += [self.tokenizer.convert_tokens_to_ids(token)] * n + list(ids)
        return out + list(after)

    def image_inputs(self, image: Any) -> dict[str, Any] | None:
        """The image processor's outputs for ``image`` (``pixel_values`` (1, C, H, W) for LLaVA-1.5); None: none.
        ``image`` may be a list of a record's pictures: one entry each, in order (``pixel_values`` (N, C, H, W)).

        Every place that turns an image into model inputs goes through here, so training, blind answers,
        generation and scoring see the same pixels.
        """
        if image is None:
            return None
        return dict(self.processor.image_processor(images=self._fit(image), return_tensors="pt"))

    def several_pictures(self) -> bool:
        """Whether this encoder encodes prompts with several pictures: the LLaVA-1.5 class (one ``pixel_values`` entry
        per picture), LLaVA-NeXT (its tiles and size) and the Qwen-VL class (its patches and grid), in the order of
        the pictures' tokens."""
        return any(cls.__name__ in SEVERAL_PICTURES for cls in type(self.processor).__mro__)

    def check_pictures(self, record: Conversation, image: Any) -> None:
        """Refuse a prompt whose pictures this encoder would encode wrongly: several pictures where its family
        encodes one, or pictures that are not the record's own count (``image``: one picture, or a list of them)."""
        n = len(record.images)
        if n > 1 and not self.several_pictures():
            why = f"several pictures per record: not supported by {type(self.processor).__name__} yet"
            raise DataError(f"record {record.id}: {n} pictures; {why}", reason=why)
        given = len(image) if isinstance(image, list | tuple) else 1
        if given != max(n, 1):
            raise DataError(
                f"record {record.id}: {given} pictures given for its {n}",
                reason="pictures given differ from the record's",
            )

    def _fit(self, image: Any) -> Any:
        image_processor = getattr(self.processor, "image_processor", None)
        if isinstance(image, list | tuple):  # several pictures: each fitted alike, in order
            return [self.prompt_format.fit_image(one, image_processor) for one in image]
        return self.prompt_format.fit_image(image, image_processor)

    def prompt_ids(self, record: Conversation, image: Any, first_turn: int = 0) -> list[int]:
        """Token ids of the prompt, image tokens expanded by the processor (``image=None``: blind).

        Special tokens are added the way the tokenizer adds them at inference (BOS for Llama-family
        models); a BOS that the chat template already wrote is not doubled.
        """
        if image is not None:
            self.check_pictures(record, image)
        messages = self.messages(record, with_image=image is not None, first_turn=first_turn)
        rendered = self.render(messages, add_generation_prompt=True, record_id=record.id)
        ids = self.text_ids(rendered, image, record_id=record.id)
        bos = self.tokenizer.bos_token_id
        if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
            ids = ids[1:]
        return ids

    def answer_ids(self, record: Conversation, answer: str, finished: bool = True) -> list[int]:
        """Tokens the chat template appends for ``answer`` as the assistant turn, ending in EOS.

        ``finished=False`` (a generation cut by its token limit) scores the answer's own tokens only: no
        EOS and no end-of-turn text, which would teach that the cut-off text ends there.
        """
        messages = self.messages(record, with_image=record.image is not None)
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assistant = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
        full = self.render(messages + [assistant], add_generation_prompt=False, record_id=record.id)
        if not full.text.startswith(prompt):
            raise DataError(
                f"record {record.id}: the chat template renders the prompt differently when an answer "
                "follows it; cannot tell which tokens belong to the answer"
            )
        rest = full.text[len(prompt) :]
        if not finished and answer.strip():
            end = rest.find(answer.strip()) if answer.strip() else 0
            if end < 0:
                raise DataError(f"record {record.id}: the chat template changed the answer text; cannot cut its end")
            text = full.cut(len(prompt), len(prompt) + end + len(answer.strip()))
            return self.text_ids(text, add_special_tokens=False, record_id=record.id)
        text = full.cut(len(prompt), len(prompt) + len(rest.rstrip()))
        ids = self.text_ids(text, add_special_tokens=False, record_id=record.id)
        if not ids or ids[-1] != self.tokenizer.eos_token_id:
            ids = ids + [self.tokenizer.eos_token_id]
        return ids

    # -- records -------------------------------------------------------------------------------
    def encode(
        self, record: PreferenceRecord, image: Any, answer_keys: tuple[str, ...] = PAIR_KEYS
    ) -> EncodedPair | str:
        """Tokenize a record for scoring; returns the skip reason (a string) when it cannot fit.

        The prompt is fitted to the answers of ``answer_keys`` that are in `PAIR_KEYS` (and ``chosen_corrupted``,
        the chosen text again); the others (blind) are shortened to the budget those leave.
        """
        texts = []
        for key in answer_keys:
            text = getattr(record, ANSWER_TEXT.get(key, key))
            if text is None:
                raise DataError(f"record {record.id}: no {key!r} answer (the objective needs {list(answer_keys)})")
            texts.append(text)
        finished = [record.blind_finished if key == "blind" else True for key in answer_keys]
        fit = [ANSWER_TEXT.get(key, key) in PAIR_KEYS for key in answer_keys]
        return self.encode_answers(record, image, texts, finished=finished, fit=fit if any(fit) else None)

    def encode_answers(
        self,
        record: Conversation,
        image: Any,
        texts: list[str],
        finished: list[bool] | None = None,
        fit: list[bool] | None = None,
    ) -> EncodedPair | str:
        """Tokenize any prompt with any answers for scoring (same truncation rules as `encode`).

        ``fit[k]``: whether the prompt is fitted to answer k (default: every answer); answers not fitted
        to are shortened to the budget left. ``finished[k]=False``: answer k was cut by a token limit and
        is scored without EOS.
        """
        finished = finished or [True] * len(texts)
        if image is not None:
            self.check_pictures(record, image)
        answers = [self.answer_ids(record, text, done) for text, done in zip(texts, finished, strict=True)]
        fit = fit or [True] * len(answers)
        if record.image is not None and image is None:
            raise DataError(f"record {record.id}: image {record.image!r} was not resolved")
        longest = max(len(a) for a, f in zip(answers, fit, strict=True) if f)
        for start in record.history_starts():
            prompt = self.prompt_ids(record, image, first_turn=start)
            fitted = len(prompt) + longest <= self.max_length
            if fitted:
                break
        # not fitted: only the last user turn is left, and answers are shortened from the end
        budget = self.max_length - len(prompt)
        if not fitted and budget < self.min_answer_tokens:
            return "prompt_too_long"
        cut = [len(a) > budget for a in answers]
        return EncodedPair(
            record.id,
            prompt,
            [a[:budget] for a in answers],
            dropped_turns=start,
            truncated_answers=sum(cut),
            truncated_extra=sum(c and not f for c, f in zip(cut, fit, strict=True)),
        )


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), max(width, 1)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate_pairs(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Collate dataset items into a model-independent batch.

    Returns ``prompt_ids`` (B, P) right-padded, ``prompt_lengths`` (B,), ``answer_ids`` (K, B, A)
    right-padded, ``answer_lengths`` (K, B), ``ids`` (B,), ``has_image`` (B,), ``reference_logps`` (B, K)
    when every pair has precomputed ones, and the image
    processor's outputs (``pixel_values`` (N_img, ...) and any extras) for the records with images,
    in batch order, and, when a record has several pictures, ``image_counts`` (one per record with pictures).
    Items with ``answer_image`` (K,) (0: the real image, 1: the corrupted one, per column) add it
    as ``answer_image`` (K,) long, and their ``corrupted_image_inputs`` as ``corrupted_pixel_values`` (N_img, ...)
    and so on, in the same order as the real ones. How prompt and answers are laid out for the forward pass is the
    scorer's concern.
    """
    pairs: list[EncodedPair] = [it["pair"] for it in items]
    k = len(pairs[0].answer_ids)
    batch: dict[str, Any] = {
        "ids": [p.id for p in pairs],
        "prompt_ids": _pad([p.prompt_ids for p in pairs], pad_token_id),
        "prompt_lengths": torch.tensor([len(p.prompt_ids) for p in pairs]),
        "answer_ids": _pad_answers(pairs, k, pad_token_id),
        "answer_lengths": torch.tensor([[len(p.answer_ids[j]) for p in pairs] for j in range(k)]),
        "has_image": torch.tensor([it["image_inputs"] is not None for it in items]),
    }
    if all(p.reference_logps is not None for p in pairs):
        batch["reference_logps"] = torch.tensor([p.reference_logps for p in pairs], dtype=torch.float32)
    pictured = [it["image_inputs"] for it in items if it["image_inputs"] is not None]
    batch |= cat_image_inputs(pictured)
    counts = [picture_count(x) for x in pictured]
    if any(n > 1 for n in counts):  # several pictures in a record: how many are whose, in batch order
        batch["image_counts"] = torch.tensor(counts)
    if "answer_image" in items[0]:
        if any(list(it["answer_image"]) != list(items[0]["answer_image"]) for it in items):
            raise ValueError("items of one batch score their answers under different images")
        batch["answer_image"] = torch.tensor(items[0]["answer_image"], dtype=torch.long)
        corrupted = [it["corrupted_image_inputs"] for it in items if it["image_inputs"] is not None]
        batch |= {f"{CORRUPTED_PREFIX}{k}": v for k, v in cat_image_inputs(corrupted).items()}
    return batch


def picture_count(image_inputs: dict[str, Any]) -> int:
    """How many pictures one record's image inputs hold: Qwen-VL's grids, else one entry per picture along dim 0."""
    if "image_grid_thw" in image_inputs:
        return len(image_inputs["image_grid_thw"])
    return len(image_inputs["pixel_values"])


def inputs_digest(image_inputs: dict[str, Any] | None) -> str | None:
    """Identity of the exact image inputs a model sees (None: no image).

    A hash of every tensor the image processor returned (names, dtypes, shapes, values), so it changes with
    the image file, a rendered stand-in, its size, and every processor setting (resize, crop or pad, mean).
    """
    if image_inputs is None:
        return None
    h = hashlib.sha256()
    for key in sorted(image_inputs):
        value = torch.as_tensor(image_inputs[key]).detach().cpu().contiguous()
        h.update(f"{key} {value.dtype} {tuple(value.shape)}".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()[:20]


def cat_image_inputs(inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Concatenate per-image processor outputs along the first dimension.

    Tensors that differ beyond it (LLaVA-NeXT's per-image tile count) are zero-padded to the largest;
    the model reads the real count from ``image_sizes`` and drops the padding.
    """
    out: dict[str, torch.Tensor] = {}
    if not inputs:
        return out
    for key in inputs[0]:
        values = [torch.as_tensor(x[key]) for x in inputs]
        if len({v.shape[1:] for v in values}) > 1:
            shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
            padded = []
            for v in values:
                p = v.new_zeros((v.shape[0], *shape))
                p[tuple(slice(0, n) for n in v.shape)] = v
                padded.append(p)
            values = padded
        out[key] = torch.cat(values, dim=0)
    return out


def _pad_answers(pairs: list[EncodedPair], k: int, pad_token_id: int) -> torch.Tensor:
    width = max(len(a) for p in pairs for a in p.answer_ids)
    out = torch.full((k, len(pairs), width), pad_token_id, dtype=torch.long)
    for j in range(k):
        for i, p in enumerate(pairs):
            out[j, i, : len(p.answer_ids[j])] = torch.tensor(p.answer_ids[j], dtype=torch.long)
    return out
