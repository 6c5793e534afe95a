"""A small client for OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, llama.cpp server, ...).

Standard library only, so a plain evaluation or build box needs no client package. Used by the LLM judge
(``src.evaluation.judge_llm``) and the model rephraser of the data builder (``src.databuilder.rephrase``), so it
lives below both.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 60.0


class ChatRequestError(Exception):
    """A failed request with a short, key-free message; ``retryable`` for timeouts, 429 and 5xx."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def fill_template(template: str, values: dict[str, str]) -> str:
    """Substitute ``{name}`` for each key of ``values`` in one pass.

    Not ``str.format``: filled texts contain braces (code, JSON). One pass, so a placeholder written inside
    a value is left as text instead of being filled with another field.
    """
    if not values:
        return template
    pattern = re.compile(r"\{(" + "|".join(re.escape(k) for k in values) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)


def load_template(prompt_file: str | os.PathLike[str], placeholders: list[str], setting: str) -> str:
    """A prompt template file holding every one of ``placeholders``; checked at start-up, so a bad file fails
    before any generation. ``setting`` names the config key in the messages (e.g. ``judge.prompt_file``)."""
    path = Path(prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found; point {setting} at a text file")
    template = path.read_text(encoding="utf-8")
    missing = [p for p in placeholders if p not in template]
    if missing:
        raise ValueError(f"prompt file {path} ({setting}) lacks the placeholder(s) {', '.join(missing)}")
    return template


def scrub(text: str, secret: str | None) -> str:
    """``text`` with the API key masked: servers may echo request headers into error bodies or replies."""
    return text.replace(secret, "***") if secret else text


def reply_content(raw: bytes) -> str:
    """``choices[0].message.content`` of a chat-completions response body."""
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ChatRequestError(f"malformed response ({type(e).__name__}): {raw[:80]!r}", retryable=False) from None
    return content if isinstance(content, str) else ""


class ChatClient:
    """One-prompt, one-reply requests to ``{base_url}/chat/completions``.

    The API key is read from the environment variable ``api_key_env`` at each request and never stored,
    logged or put in an error message; without it no Authorization header is sent (local servers accept
    that). Timeouts, connection errors, 429 and 5xx are retried ``max_retries`` times with exponential
    back-off; other HTTP errors fail at once. ``owner`` names the config group in error messages
    (``judge``, ``rephrase``); ``label`` prefixes log lines.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 30,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        temperature: float = 0.0,
        max_tokens: int = 64,
        owner: str = "chat",
        label: str = "chat",
    ) -> None:
        if not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"{owner}.base_url must start with http:// or https://, got {base_url!r}")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or max_tokens < 1:
            raise ValueError(
                f"{owner} needs timeout_s > 0, max_retries >= 0, backoff_s >= 0 and max_tokens >= 1; "
                f"got {timeout_s=}, {max_retries=}, {backoff_s=}, {max_tokens=}"
            )
        self.url = f"{str(base_url).rstrip('/')}/chat/completions"
        self.model = str(model)
        self.api_key_env = api_key_env  # the variable's name only; the key itself is never kept
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.label = label

    def __repr__(self) -> str:
        return f"ChatClient(model={self.model!r}, url={self.url!r})"

    def complete(self, prompt: str, max_retries: int | None = None) -> str:
        """The reply text to one user message, retrying transient failures ``max_retries`` times (default: the
        client's); raises `ChatRequestError`."""
        retries = self.max_retries if max_retries is None else max_retries
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
        ).encode("utf-8")
        for attempt in range(retries + 1):
            try:
                return self._post(body)
            except ChatRequestError as e:
                if not e.retryable or attempt == retries:
                    raise
                delay = min(self.backoff_s * 2**attempt, _MAX_BACKOFF_S)
                log.warning("%s: %s; retry %d/%d in %.2fs", self.label, e, attempt + 1, retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    def _post(self, body: bytes) -> str:
        """One request; every message that leaves here has the key masked."""
        key = os.environ.get(self.api_key_env) or None
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            with e:
                detail = e.read(200).decode("utf-8", "replace").strip()
            message = scrub(f"HTTP {e.code}" + (f": {detail}" if detail else ""), key)
            raise ChatRequestError(message, retryable=e.code == 429 or e.code >= 500) from None
        except TimeoutError:
            raise ChatRequestError(f"timed out after {self.timeout_s:g}s", retryable=True) from None
        except urllib.error.URLError as e:
            timed_out = isinstance(e.reason, TimeoutError)
            message = f"timed out after {self.timeout_s:g}s" if timed_out else f"connection error: {e.reason}"
            raise ChatRequestError(scrub(message, key), retryable=True) from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise ChatRequestError(f"connection error: {type(e).__name__}", retryable=True) from None
        try:
            return scrub(reply_content(raw), key)
        except ChatRequestError as e:
            raise ChatRequestError(scrub(str(e), key), retryable=False) from None
