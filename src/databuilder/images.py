"""Image matchers of the data builder: one image file per entity, or `NoImage` with a reason.

- `TypographyImages`: offline, the entity drawn as text (the same entity always gives the same PNG).
- `LocalImages`: a folder of images named after entities (``rand_paul.jpg``), optionally per entity type.
- `WikipediaImages`: the image of the entity's Wikipedia page (REST summary API), cached on disk. It uses the
  network only when enabled in the config.

JPEG and PNG files are written as they are; other formats are converted to PNG.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import re
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from src.data.images import IMAGE_LIMITS, check_image_size, render_stand_in
from src.data.records import DataError
from src.databuilder.base import ENTITY_TYPES, BuildError, Entity, ImageMatch, NoImage
from src.files import read_regular, write_atomic
from src.models.source import path_fingerprint

log = logging.getLogger(__name__)

_KEPT_FORMATS = {"JPEG": ".jpg", "PNG": ".png"}
_SEPARATORS = re.compile(r"[\s_\-]+")
_MAX_BACKOFF_S = 60.0
_MAX_SUMMARY_BYTES = 2_000_000
_SUMMARY_FIELDS = ("type", "title", "thumbnail", "originalimage")


def _with_suffix(dest: Path, suffix: str) -> Path:
    """``dest`` + ``suffix``; not `Path.with_suffix`, which would cut a name that contains a dot."""
    return dest.parent / f"{dest.name}{suffix}"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _check_image(data: bytes, min_size: int, what: str) -> tuple[Image.Image, str]:
    """(RGB image, PIL format) of encoded image bytes; `NoImage("bad_image")` if they do not decode or are small."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_image_size(im.size, what)  # from the header: a picture too large to decode is never decoded
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            rgb = im.convert("RGB")  # decodes every pixel: catches truncated files that verify() lets through
    except DataError as e:
        raise NoImage("too_large", str(e)) from None
    except Exception as e:  # PIL raises many types on bad input (OSError, SyntaxError, struct.error, ...)
        raise NoImage("bad_image", f"{what}: cannot decode image ({type(e).__name__}: {e})") from None
    if min(rgb.size) < min_size:
        raise NoImage("bad_image", f"{what}: {rgb.width}x{rgb.height} is smaller than min_size={min_size}")
    return rgb, fmt


def _save_image(data: bytes, image: Image.Image, fmt: str, dest: Path) -> Path:
    """Write a checked image to ``dest`` + suffix: JPEG / PNG bytes unchanged, anything else as PNG."""
    suffix = _KEPT_FORMATS.get(fmt)
    path = _with_suffix(dest, suffix or ".png")
    write_atomic(path, data if suffix else _png_bytes(image))
    return path


class TypographyImages:
    """The entity's text drawn on a plain background (`render_stand_in`); offline and deterministic."""

    name = "typography"

    def __init__(self, size: int = 336) -> None:
        if size < 16:
            raise BuildError(f"image.size must be at least 16 pixels, got {size}")
        self.size = int(size)

    def __call__(self, entity: Entity, dest: Path) -> ImageMatch:
        path = _with_suffix(Path(dest), ".png")
        write_atomic(path, _png_bytes(render_stand_in(entity.text, self.size)))
        return ImageMatch(path=path, source="typography")


def normalize_name(name: str) -> str:
    """The lookup key of a name: accents removed (NFKD), case folded, runs of spaces / ``_`` / ``-`` as one space."""
    decomposed = unicodedata.normalize("NFKD", name)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _SEPARATORS.sub(" ", stripped.casefold()).strip()


class LocalImages:
    """Images from a folder, matched by file name: ``root/Rand Paul.jpg`` or ``root/rand_paul.png`` is "Rand Paul".

    Names are compared by `normalize_name`. A subfolder named after the entity's type (``root/PER/``,
    ``root/ORG/``, ...) is searched before the root. The folder is indexed once, on first use; when two files
    have the same key, the first in sorted order wins.
    """

    name = "local"

    def __init__(
        self, root: str, extensions: Iterable[str] = (".jpg", ".jpeg", ".png", ".webp"), min_size: int = 32
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise BuildError(
                f"image.root={root!r} is not a folder; point it at a folder of images named after entities "
                "(e.g. rand_paul.jpg), or choose another matcher (image=typography)"
            )
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        if not self.extensions:
            raise BuildError("image.extensions is empty; list the image file suffixes to look for (.jpg, .png, ...)")
        self.min_size = int(min_size)
        self._index: dict[tuple[str | None, str], Path] | None = None
        self._lock = threading.Lock()

    def fingerprint(self) -> str | None:
        """The folder's files (names, sizes, times): an added, removed or replaced image changes the matches."""
        return path_fingerprint(self.root)

    def _scan(self, folder: Path, entity_type: str | None, index: dict[tuple[str | None, str], Path]) -> None:
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in self.extensions:
                index.setdefault((entity_type, normalize_name(path.stem)), path)

    def index(self) -> dict[tuple[str | None, str], Path]:
        """``(entity type or None for the root, name key) -> file``; built on the first call."""
        with self._lock:
            if self._index is None:
                index: dict[tuple[str | None, str], Path] = {}
                self._scan(self.root, None, index)
                for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
                    if folder.name.upper() in ENTITY_TYPES:
                        self._scan(folder, folder.name.upper(), index)
                self._index = index
                log.info("image root %s: %d images indexed", self.root, len(index))
            return self._index

    def find(self, entity: Entity) -> Path | None:
        """The file for ``entity``: its type's subfolder first, then the root."""
        key = normalize_name(entity.text)
        index = self.index()
        return index.get((entity.type.upper(), key)) or index.get((None, key))

    def __call__(self, entity: Entity, dest: Path) -> ImageMatch:
        source = self.find(entity)
        if source is None:
            raise NoImage("not_found", f"no file named {entity.text!r} under {self.root}")
        try:
            data = read_regular(source, IMAGE_LIMITS.max_bytes)  # a FIFO or device named like a picture is refused
        except OSError as e:
            raise NoImage("bad_image", f"{source}: {e}") from None
        image, fmt = _check_image(data, self.min_size, str(source))
        return ImageMatch(path=_save_image(data, image, fmt, Path(dest)), source=str(source))


@dataclass(frozen=True)
class _Response:
    status: int
    data: bytes


class _Transient(Exception):
    """A failure worth retrying (timeout, connection error, 429, 5xx); ``reason`` is its `NoImage` key."""

    def __init__(self, reason: str, detail: str, retry_after: float = 0.0) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:  # an HTTP date: fall back to the back-off
        return 0.0


class WikipediaImages:
    """The image of the entity's Wikipedia page, via ``GET {base_url}/page/summary/{title}``.

    The title is the entity text with spaces as underscores; redirects are followed. The page's original image
    is used when it is a raster file of at most ``max_side`` pixels a side, else (or when it fails) the page's
    thumbnail. Reasons: ``not_found`` (no such page, or not a valid title), ``disambiguation``,
    ``no_image_on_page``, ``bad_image`` (does not decode, or smaller than ``min_size``), ``too_large`` (over
    ``max_bytes``), ``timeout`` and ``network_error`` (after ``max_retries`` retries with exponential back-off
    for timeouts, connection errors, 429 and 5xx; other HTTP errors at once).

    With ``cache_dir`` set, page summaries (missing pages included) and image bytes are kept on disk, so a
    re-run asks the server only about what it has not seen. No request is made unless ``enabled``.
    """

    name = "wikipedia"

    def __init__(
        self,
        enabled: bool = False,
        base_url: str = "https://en.wikipedia.org/api/rest_v1",
        cache_dir: str | None = None,
        timeout_s: float = 10,
        max_retries: int = 2,
        backoff_s: float = 1.0,
        user_agent: str = "mllm-bpo-dataset-builder/0.1 (https://github.com/; research)",
        min_size: int = 64,
        max_bytes: int = 20_000_000,
        max_side: int = 4096,
    ) -> None:
        if not str(base_url).startswith(("http://", "https://")):
            raise BuildError(f"image.base_url must start with http:// or https://, got {base_url!r}")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or max_bytes < 1 or max_side < 1:
            raise BuildError(
                "WikipediaImages needs timeout_s > 0, max_retries >= 0, backoff_s >= 0, max_bytes >= 1 and "
                f"max_side >= 1; got {timeout_s=}, {max_retries=}, {backoff_s=}, {max_bytes=}, {max_side=}"
            )
        if not str(user_agent).strip():
            raise BuildError("image.user_agent is empty; Wikimedia requires a User-Agent naming the tool and a contact")
        self.enabled = bool(enabled)
        self.base_url = str(base_url).rstrip("/")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.user_agent = str(user_agent)
        self.min_size = int(min_size)
        self.max_bytes = int(max_bytes)
        self.max_side = int(max_side)

    def __repr__(self) -> str:
        return f"WikipediaImages(enabled={self.enabled}, base_url={self.base_url!r}, cache_dir={self.cache_dir})"

    def __call__(self, entity: Entity, dest: Path) -> ImageMatch:
        if not self.enabled:
            raise BuildError(
                f"the wikipedia image matcher asks {self.base_url} for images and network access is off; set "
                "image.enabled=true to allow it, or use image=local / image=typography to build offline"
            )
        title = entity.text.strip().replace(" ", "_")
        if not title:
            raise NoImage("not_found", "empty entity text")
        candidates = self.image_urls(title, self.summary(title))
        for i, url in enumerate(candidates):
            try:
                data, cached = self._image_bytes(url)
                image, fmt = _check_image(data, self.min_size, url)
            except NoImage as e:
                if i == len(candidates) - 1:
                    raise
                log.debug("wikipedia: %s: %s; trying the thumbnail", title, e)
                continue
            if not cached:
                self._cache_write(self._cache_path("images", url), data)
            return ImageMatch(path=_save_image(data, image, fmt, Path(dest)), source=url)
        raise AssertionError("unreachable: image_urls returns at least one URL")

    # ------------------------------------------------------------------ page summary

    def summary(self, title: str) -> dict[str, Any]:
        """The page summary's image fields, from the cache or the server; `NoImage` for a missing page."""
        cache = self._cache_path("summaries", title)
        record = self._cache_read_json(cache)
        if record is None:
            url = f"{self.base_url}/page/summary/{urllib.parse.quote(title, safe='')}"
            response = self._get(url, _MAX_SUMMARY_BYTES, accept="application/json")
            if response.status == 200:
                try:
                    body = json.loads(response.data)
                    if not isinstance(body, dict):
                        raise ValueError(f"a JSON {type(body).__name__}, not an object")
                except ValueError as e:
                    raise NoImage("network_error", f"malformed summary for {title!r}: {e}") from None
                record = {"status": 200, "summary": {k: body[k] for k in _SUMMARY_FIELDS if k in body}}
            elif response.status in (400, 404):  # 400: not a valid title (e.g. it contains "[" or "|")
                record = {"status": response.status}
            else:
                raise NoImage("network_error", f"HTTP {response.status} for the summary of {title!r}")
            self._cache_write(cache, json.dumps(record, ensure_ascii=False).encode("utf-8"))
        if record.get("status") != 200:
            detail = "not a valid page title" if record.get("status") == 400 else "no such page"
            raise NoImage("not_found", f"{title}: {detail}")
        summary = record["summary"]
        if summary.get("type") == "disambiguation":
            raise NoImage("disambiguation", str(summary.get("title", title)))
        return summary

    def image_urls(self, title: str, summary: dict[str, Any]) -> list[str]:
        """Absolute image URLs to try, best first: the original image when usable, then the thumbnail."""
        urls = []
        for field, check_size in (("originalimage", True), ("thumbnail", False)):
            info = summary.get(field)
            if not isinstance(info, dict) or not isinstance(info.get("source"), str):
                continue
            url = urllib.parse.urljoin(f"{self.base_url}/", info["source"])
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                continue
            if check_size:
                raster = urllib.parse.urlsplit(url).path.lower().endswith((".jpg", ".jpeg", ".png", ".gif", ".webp"))
                sides = [s for s in (info.get("width"), info.get("height")) if isinstance(s, int | float)]
                if not raster or any(s > self.max_side for s in sides):
                    continue
            if url not in urls:
                urls.append(url)
        if not urls:
            raise NoImage("no_image_on_page", title)
        return urls

    # ------------------------------------------------------------------ HTTP

    def _image_bytes(self, url: str) -> tuple[bytes, bool]:
        """(the image's bytes, whether they came from the cache)."""
        path = self._cache_path("images", url)
        if path is not None and path.is_file():
            return path.read_bytes(), True
        response = self._get(url, self.max_bytes, accept="image/*")
        if response.status != 200:
            raise NoImage("network_error", f"image {url}: HTTP {response.status}")
        return response.data, False

    def _get(self, url: str, limit: int, accept: str) -> _Response:
        """GET with retries; a 4xx other than 429 is returned for the caller to read, other failures raise."""
        for attempt in range(self.max_retries + 1):
            try:
                return self._get_once(url, limit, accept)
            except _Transient as e:
                if attempt == self.max_retries:
                    raise NoImage(e.reason, f"{url}: {e} (after {attempt + 1} attempts)") from None
                delay = min(max(self.backoff_s * 2**attempt, e.retry_after), _MAX_BACKOFF_S)
                log.warning("wikipedia: %s: %s; retry %d/%d in %.2fs", url, e, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    def _get_once(self, url: str, limit: int, accept: str) -> _Response:
        request = urllib.request.Request(url, headers={"User-Agent": self.user_agent, "Accept": accept})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > limit:
                    raise NoImage("too_large", f"{url}: {length} bytes, more than max_bytes={limit}")
                data = response.read(limit + 1)
                if len(data) > limit:
                    raise NoImage("too_large", f"{url}: more than max_bytes={limit} bytes")
                return _Response(response.status, data)
        except urllib.error.HTTPError as e:
            with e:
                if e.code == 429 or e.code >= 500:
                    retry_after = _retry_after(e.headers.get("Retry-After"))
                    raise _Transient("network_error", f"HTTP {e.code}", retry_after) from None
                return _Response(e.code, b"")
        except TimeoutError:
            raise _Transient("timeout", f"timed out after {self.timeout_s:g}s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _Transient("timeout", f"timed out after {self.timeout_s:g}s") from None
            raise _Transient("network_error", f"connection error: {e.reason}") from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise _Transient("network_error", f"connection error: {type(e).__name__}") from None

    # ------------------------------------------------------------------ cache

    def _cache_path(self, kind: str, key: str) -> Path | None:
        """The cache file of a title or URL; the base URL is part of the key, so wikis do not mix."""
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(f"{self.base_url}\n{key}".encode()).hexdigest()
        return self.cache_dir / kind / digest[:2] / digest

    @staticmethod
    def _cache_read_json(path: Path | None) -> dict[str, Any] | None:
        if path is None or not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # a damaged entry is asked again and overwritten
            return None
        return record if isinstance(record, dict) and isinstance(record.get("status"), int) else None

    @staticmethod
    def _cache_write(path: Path | None, data: bytes) -> None:
        if path is not None:
            write_atomic(path, data)
