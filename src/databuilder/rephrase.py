"""Rephrasers: turn ``mid_prompt`` (the turn with its entity replaced, `src.databuilder.phrases`) into the
final ``question``.

`RuleRephraser` keeps it; `ModelRephraser` has a language model (an OpenAI-compatible endpoint or a local
transformers model) rewrite it fluently and falls back to ``mid_prompt`` when the rewrite is unusable.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from src.databuilder.base import BuildError, RephraseItem, Rewrite
from src.databuilder.phrases import is_plural
from src.errors import SettingError
from src.llm.chat_client import ChatClient, ChatRequestError, fill_template, load_template
from src.llm.local_lm import LocalLM
from src.models.device import DTYPE_CHOICES
from src.models.source import path_fingerprint

log = logging.getLogger(__name__)

DEFAULT_PROMPT_FILE = Path(__file__).resolve().parents[2] / "configs" / "rephrase" / "prompts" / "rephrase.txt"

# what the model rephraser's prompt calls the replaced entity ({entity_type})
TYPE_WORDS = {
    "PER": "a person",
    "ORG": "an organization",
    "LOC": "a place",
    "MISC": "a thing",
    "PLURAL": "a group of people",
}


class RuleRephraser:
    """The rule-based turn is the question: ``mid_prompt`` unchanged."""

    def __init__(self, name: str = "rule") -> None:
        self.name = name
        self.fallbacks: Counter[str] = Counter()  # stays empty; there for callers that report every rephraser

    def __repr__(self) -> str:
        return f"RuleRephraser(name={self.name!r})"

    def __call__(self, items: list[RephraseItem]) -> list[Rewrite]:
        return [Rewrite(item.mid_prompt) for item in items]


# labels a model may put before its answer ("Rewritten request:", "Here is the rewritten text:")
_LABEL = re.compile(
    r"^\s*(?:here\s+is\s+|here's\s+)?(?:the\s+)?(?:rewritten|rephrased|revised|rewrite|output|answer)"
    r"(?:\s+(?:text|request|question|turn|version|prompt))?\s*:\s*",
    re.IGNORECASE,
)
# a model declining the task instead of rewriting the request
_REFUSAL = re.compile(
    r"\W*(?:i'?m sorry|i am sorry|sorry, but|i apologi[sz]e|as an ai\b|i (?:can ?not|can't|won't|will not|"
    r"am unable to|'m unable to|am not able to) (?:help|assist|comply|fulfil|provide|rewrite|rephrase|do that|"
    r"create|generate|support))",
    re.IGNORECASE,
)
_QUOTES = (('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("`", "`"), ("«", "»"))


def clean_reply(reply: str, mid_prompt: str) -> str:
    """The reply without surrounding quotes and "Rewritten:"-style labels the input did not have."""
    text = reply.strip()
    while True:
        label = _LABEL.match(text)
        if label is not None and _LABEL.match(mid_prompt) is None:
            text = text[label.end() :].strip()
            continue
        quoted = next((q for q in _QUOTES if _wrapped(text, *q)), None)
        if quoted is not None and not mid_prompt.strip().startswith(quoted[0]):
            text = text[1:-1].strip()
            continue
        return text


def _wrapped(text: str, left: str, right: str) -> bool:
    """Whether ``text`` is one quotation: opened and closed by the marks, with none inside."""
    inner = text[1:-1]
    return len(text) >= 2 and text[0] == left and text[-1] == right and left not in inner and right not in inner


def _mentions(text: str, name: str, ignore_case: bool = True) -> int:
    flags = re.IGNORECASE if ignore_case else 0
    return len(re.findall(rf"(?<!\w){re.escape(name)}(?!\w)", text, flags))


def check_reply(reply: str | None, item: RephraseItem, max_length_ratio: float = 3.0) -> tuple[str, str | None]:
    """(the question, None) for a usable reply, else (``item.mid_prompt``, the reason it was rejected).

    Rejected: no reply (``request_failed``), an empty one (``empty``), one with control or replacement
    characters (``garbled``), a refusal to rewrite (``refused``), one naming the entity more often than
    ``mid_prompt`` does (``names_entity``: the full name, any case, or a person's last name as written), and
    one longer than ``max_length_ratio`` times ``mid_prompt`` (``too_long``).
    """
    if reply is None:
        return item.mid_prompt, "request_failed"
    text = clean_reply(reply, item.mid_prompt)
    if not text:
        return item.mid_prompt, "empty"
    if "\ufffd" in text or any(unicodedata.category(c) == "Cc" and c not in "\n\t\r" for c in text):
        return item.mid_prompt, "garbled"
    if _REFUSAL.match(text) and not _REFUSAL.match(item.mid_prompt):
        return item.mid_prompt, "refused"
    name = re.sub(r"['’]s?$", "", item.entity.text) or item.entity.text
    names = [(name, True)]
    surname = name.split()[-1] if item.entity.type == "PER" and name.split() else ""
    if len(surname) >= 3 and surname != name:
        names.append((surname, False))
    if any(_mentions(text, n, ic) > _mentions(item.mid_prompt, n, ic) for n, ic in names):
        return item.mid_prompt, "names_entity"
    if len(text) > max_length_ratio * len(item.mid_prompt):
        return item.mid_prompt, "too_long"
    return text, None


class ModelRephraser:
    """Rewrite each ``mid_prompt`` fluently with a language model; unusable rewrites fall back to it.

    Exactly one back end: ``base_url`` (+ ``model``, the served model's name) for an OpenAI-compatible
    chat-completions endpoint, through `ChatClient` (API key from the environment variable ``api_key_env``
    only, retries with back-off, ``max_workers`` requests at a time); or ``path``, a local folder or hub id
    of a transformers causal LM, loaded on first use and run batched with greedy decoding, through the
    tokenizer's chat template when it has one. The prompt comes from ``prompt_file`` with the placeholders
    ``{text}`` (``mid_prompt``), ``{phrase}`` (the referring phrase) and ``{entity_type}`` ("a person",
    "an organization", "a place", "a thing", "a group of people"). The model sees text only.

    A rejected reply (see `check_reply`) gives ``Rewrite(mid_prompt, fallback=<reason>)`` and is counted by
    reason in ``fallbacks`` across calls.
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        path: str | None = None,
        prompt_file: str | Path = DEFAULT_PROMPT_FILE,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 60,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_workers: int = 4,
        temperature: float = 0.0,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        max_length_ratio: float = 3.0,
        name: str = "model",
    ) -> None:
        if (base_url is None) == (path is None):
            raise BuildError(
                "rephrase: set exactly one of rephrase.base_url (an OpenAI-compatible endpoint) and "
                f"rephrase.path (a local transformers model); got base_url={base_url!r}, path={path!r}"
            )
        if base_url is not None and not model:
            raise BuildError("rephrase.model (the served model's name) is required with rephrase.base_url")
        if max_workers < 1 or batch_size < 1 or max_new_tokens < 1 or max_length_ratio <= 0:
            raise BuildError(
                "rephrase needs max_workers >= 1, batch_size >= 1, max_new_tokens >= 1 and max_length_ratio > 0; "
                f"got {max_workers=}, {batch_size=}, {max_new_tokens=}, {max_length_ratio=}"
            )
        if dtype not in DTYPE_CHOICES:
            raise BuildError(f"rephrase.dtype must be one of {list(DTYPE_CHOICES)}, got {dtype!r}")
        self.name = name
        try:
            self.template = load_template(prompt_file, ["{text}", "{phrase}"], "rephrase.prompt_file")
        except (OSError, ValueError) as e:
            raise BuildError(str(e)) from None
        self.client = (
            ChatClient(
                base_url,
                str(model),
                api_key_env=api_key_env,
                timeout_s=timeout_s,
                max_retries=max_retries,
                backoff_s=backoff_s,
                temperature=temperature,
                max_tokens=max_new_tokens,
                owner="rephrase",
                label=f"rephrase {name}",
            )
            if base_url is not None
            else None
        )
        self.path = None if path is None else str(path)
        self.lm = None if path is None else LocalLM(str(path), "rephrase.path", device, dtype, trust_remote_code)
        self.max_workers = int(max_workers)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.max_length_ratio = float(max_length_ratio)
        self.fallbacks: Counter[str] = Counter()
        self._chat = False  # whether prompts go through the tokenizer's chat template

    def __repr__(self) -> str:
        backend = repr(self.client) if self.client is not None else f"path={self.path!r}"
        return f"ModelRephraser(name={self.name!r}, {backend})"

    def fingerprint(self) -> str:
        """What the rewrites depend on beyond the settings: the prompt text and, for ``path``, the model folder."""
        return hashlib.sha256(f"{self.template}\0{path_fingerprint(self.path)}".encode()).hexdigest()[:16]

    def build_prompt(self, item: RephraseItem) -> str:
        """The filled rephrasing prompt for one item."""
        kind = "PLURAL" if is_plural(item.entity.type, item.entity.text) else item.entity.type
        values = {"text": item.mid_prompt, "phrase": item.replacement, "entity_type": TYPE_WORDS.get(kind, "a thing")}
        return fill_template(self.template, values)

    def __call__(self, items: list[RephraseItem]) -> list[Rewrite]:
        """One question per item, in order: the model's, or ``mid_prompt`` with the reason it fell back."""
        if not items:
            return []
        prompts = [self.build_prompt(item) for item in items]
        replies = self._generate(prompts) if self.client is None else self._ask_endpoint(self.client, prompts)
        questions = []
        reasons: Counter[str] = Counter()
        for item, reply in zip(items, replies, strict=True):
            question, reason = check_reply(reply, item, self.max_length_ratio)
            if reason is not None:
                reasons[reason] += 1
            questions.append(Rewrite(question, reason))
        self.fallbacks.update(reasons)
        if reasons:
            log.info(
                "rephrase %s: %d of %d rewrites fell back to mid_prompt %s",
                self.name,
                sum(reasons.values()),
                len(items),
                dict(reasons),
            )
        return questions

    def _ask_endpoint(self, client: ChatClient, prompts: list[str]) -> list[str | None]:
        """Replies from the endpoint, ``None`` for a failed request (logged, key-free)."""

        def ask(prompt: str) -> str | None:
            try:
                return client.complete(prompt)
            except ChatRequestError as e:
                log.warning("rephrase %s: request failed: %s", self.name, e)
                return None

        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(prompts))) as pool:
            return list(pool.map(ask, prompts))

    @property
    def _model(self) -> Any:
        """The local model; None until first use and for an endpoint."""
        return None if self.lm is None else self.lm.model

    @property
    def _tokenizer(self) -> Any:
        return None if self.lm is None else self.lm.tokenizer

    def _load(self, lm: LocalLM) -> None:
        try:
            lm.load()
        except (OSError, SettingError) as e:
            raise BuildError(f"could not load the rephrasing model from rephrase.path={self.path!r}: {e}") from e
        self._chat = bool(getattr(lm.tokenizer, "chat_template", None))
        log.info(
            "rephrase %s: loaded %s on %s (%s, chat template: %s)",
            self.name,
            self.path,
            lm.model.device,
            lm.model.dtype,
            self._chat,
        )

    def _generate(self, prompts: list[str]) -> list[str]:
        """Greedy continuations of the prompts by the local model, decoded without special tokens."""
        lm = self.lm  # set whenever no endpoint is: the constructor takes exactly one back end
        if lm.model is None:
            self._load(lm)
        texts = prompts
        if self._chat:
            chats = [[{"role": "user", "content": p}] for p in prompts]
            texts = [lm.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        # a chat template writes any BOS token itself, so the tokenizer must not add another
        return lm.generate(texts, self.batch_size, self.max_new_tokens, add_special_tokens=not self._chat)
