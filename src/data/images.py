"""Image resolution against an image root, with deterministic typographic stand-ins.

A stand-in is the record's entity (or referring phrase) drawn as black text on a plain background,
the way MM-SafetyBench draws its TYPO images. It is a function of the text only, so runs repeat.

Every picture read from a file is read by `open_image`, within `IMAGE_LIMITS`: training, blind answers,
generation, scoring and evaluation all resolve images through `ImageResolver`, which calls it.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from src.data.records import Conversation, DataError
from src.errors import SettingError
from src.files import NOT_FOUND, FileRefused, file_problem, open_regular

MISSING_POLICIES = ("error", "render")
RENDER_PREFIX = "render:"  # an image reference that is always drawn from its text, never looked up on disk
# draws the image a reference names at a size in pixels (square); ValueError for a reference it cannot draw
Drawer = Callable[[str, int], Image.Image]
# what a reference that names a drawer looks like: a word of two or more characters and a colon ("C:" is a drive)
DRAWER_PREFIX = re.compile(r"[A-Za-z][\w.+-]+:")
_DRAWERS: dict[str, Drawer] = {}


def register_drawer(prefix: str, draw: Drawer) -> None:
    """Image references starting with ``prefix`` (a word and a colon) are pictures ``draw`` makes, not files: every
    `ImageResolver` built from now on draws them. A plug-in registers its drawers when it is imported (the entry
    points import the plug-ins: src/plugins.py), so that this floor knows nothing of what they draw. Registering
    the same function again is a no-op; another function for a prefix already taken is an error."""
    if not DRAWER_PREFIX.fullmatch(prefix) or prefix == RENDER_PREFIX:
        raise ValueError(f"drawer prefix {prefix!r}: expected a word and a colon, other than {RENDER_PREFIX!r}")
    known = _DRAWERS.get(prefix)
    if known is not None and (known.__module__, known.__qualname__) != (draw.__module__, draw.__qualname__):
        raise ValueError(f"drawer prefix {prefix!r} is taken by {known.__module__}.{known.__qualname__}")
    _DRAWERS[prefix] = draw


def registered_drawers() -> dict[str, Drawer]:
    """The drawers registered so far, by prefix."""
    return dict(_DRAWERS)


@dataclass(frozen=True)
class ImageLimits:
    """What a picture file may be, so that one file costs a bounded time and memory (docs/reliability.md#bounds).

    ``max_bytes``: the file's size, looked at before it is opened. ``max_pixels``: width x height, read from the
    header before any pixel is decoded (PIL's own decompression-bomb check allows ~179 M and is a global the
    user may change). ``max_aspect``: longer side / shorter side; beyond it a picture is refused, since padding
    it to a square (``prompt_format.image_aspect_ratio=pad``) or resizing its short side to the model's
    (``crop``) makes a canvas of its long side squared. ``max_side``: a larger picture is shrunk to this longest
    side before it is converted or padded (JPEGs are decoded shrunk); no model here looks at more.
    """

    max_bytes: int = 128 * 2**20
    max_pixels: int = 8192 * 8192
    max_aspect: float = 20.0
    max_side: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingError(f"ImageLimits.{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_aspect, bool) or not isinstance(self.max_aspect, (int, float)) or self.max_aspect < 1:
            raise SettingError(f"ImageLimits.max_aspect must be a number >= 1, got {self.max_aspect!r}")


IMAGE_LIMITS = ImageLimits()


def open_image(path: str | Path, limits: ImageLimits = IMAGE_LIMITS) -> Image.Image:
    """The RGB picture in the file at ``path``, within ``limits``; a `DataError` naming the path otherwise.

    The path is looked at before it is opened (a FIFO, a device, a folder or an empty file is refused, never
    read), the picture's size is checked from its header before its pixels are decoded, and a large one is
    shrunk before it is converted, so neither conversion nor padding ever builds a canvas beyond ``max_side``
    squared. 16-bit grey levels are scaled to 8 bits (not clipped to white), CMYK and palette pictures are
    converted, alpha is dropped as LLaVA drops it, and of an animated picture the first frame is used. The
    error's ``reason`` is the problem without the path, so that many records failing alike group as one.
    """
    problem = file_problem(path, limits.max_bytes)
    if problem == NOT_FOUND:
        raise DataError(f"image file not found: {path}", reason="image file not found")
    if problem is not None:
        raise DataError(f"image path is {problem}: {path}", reason=f"image path is {problem}")
    try:
        with open_regular(path, limits.max_bytes) as f, Image.open(f) as im:
            check_image_size(im.size, path, limits)
            return _to_rgb(im, limits)
    except (DataError, MemoryError):  # a refusal of ours, or this process out of memory: no bad picture
        raise
    except FileRefused as e:
        raise DataError(f"image path is {e}: {path}", reason=f"image path is {e}") from None
    except UnidentifiedImageError:  # its own message names the file object, not the path
        raise DataError(f"cannot read image {path}: not a picture in any format PIL reads") from None
    except Exception as e:  # PIL raises many types on bad input (OSError, SyntaxError, struct.error, bombs, ...)
        raise DataError(f"cannot read image {path}: {e}") from None


def check_image_size(size: tuple[int, int], where: str | Path, limits: ImageLimits = IMAGE_LIMITS) -> None:
    """Refuse a picture whose header says it is too large or too long and thin to decode, pad or resize (also
    for pictures that are no files: embedded in a hub data set, downloaded by the data builder)."""
    width, height = size
    if width * height > limits.max_pixels:
        reason = f"image too large: more than {limits.max_pixels} pixels"
        raise DataError(f"image too large: {width} x {height} pixels > {limits.max_pixels}: {where}", reason=reason)
    if min(width, height) < 1 or max(width, height) > limits.max_aspect * min(width, height):
        reason = f"image too long and thin: aspect ratio beyond {limits.max_aspect:g}:1"
        raise DataError(f"{reason} ({width} x {height} pixels): {where}", reason=reason)


def _to_rgb(im: Image.Image, limits: ImageLimits) -> Image.Image:
    """``im`` (opened, not decoded: its first frame) as RGB, its longest side at most ``limits.max_side``; shrunk
    before any conversion, so no full-size copy of a large picture is made."""
    target = _shrunk(im.size, limits.max_side)
    if target != im.size:
        im.draft(None, target)  # JPEG: decoded at 1/2, 1/4 or 1/8 scale, never whole
    im = _expanded(im)
    if im.size != target:
        im = im.resize(target, Image.Resampling.BICUBIC, reducing_gap=2.0)
    return _eight_bit(im).convert("RGB")


def _shrunk(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` scaled down to a longest side of ``max_side`` (each side at least 1); unchanged when within it."""
    width, height = size
    scale = max_side / max(width, height)
    if scale >= 1:
        return size
    return max(1, round(width * scale)), max(1, round(height * scale))


def _expanded(im: Image.Image) -> Image.Image:
    """``im`` decoded, in a mode that resizes faithfully and without extra copies: a palette expanded (it resizes
    only by nearest neighbour), alpha dropped as LLaVA's ``convert("RGB")`` drops it (resizing with alpha makes
    premultiplied copies). The decoded original is released once converted."""
    im.load()
    mode = {"P": "RGB", "PA": "RGB", "RGBA": "RGB", "RGBa": "RGB", "RGBX": "RGB", "1": "L", "LA": "L", "La": "L"}
    if im.mode not in mode:
        return im
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Palette images with Transparency expressed in bytes ...": dropped here
        out = im.convert(mode[im.mode])
    im.close()  # frees its pixels now, not when the caller's `with` ends
    return out


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _eight_bit(im: Image.Image) -> Image.Image:
    """16- and 32-bit grey scaled to 8 bits: PIL converts them to RGB by clipping at 255, which turns a 16-bit
    picture white. 32-bit values within 0-255 are kept as they are; other modes are returned unchanged."""
    if im.mode not in _SIXTEEN_BIT and im.mode not in ("I", "F"):
        return im
    pixels = np.asarray(im, dtype=np.float32)
    if im.mode in _SIXTEEN_BIT or (pixels.size and pixels.max() > 255):
        pixels = pixels / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@lru_cache(maxsize=4096)
def render_stand_in(text: str, size: int = 336) -> Image.Image:
    """Draw ``text`` centred on a square pastel background whose colour is a hash of the text."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    background = tuple(160 + b % 96 for b in digest[:3])
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    font = _font(max(10, size // 10))
    lines = textwrap.wrap(text, width=16)[:6] or [" "]
    line_h = font.getbbox("Ag")[3] + size // 40
    y = (size - line_h * len(lines)) // 2
    for line in lines:
        w = draw.textlength(line, font=font)
        draw.text(((size - w) / 2, y), line, fill=(0, 0, 0), font=font)
        y += line_h
    return image


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """``image`` centred on a square RGB canvas of colour ``fill`` (side: its longer side); squares unchanged."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image.convert("RGB"), ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(image_processor: Any) -> tuple[int, int, int]:
    """The processor's normalisation mean as 0-255 RGB: padding of this colour normalises to ~0."""
    return tuple(int(x * 255) for x in image_processor.image_mean)


class ImageResolver:
    """Turn a record's image reference into an RGB PIL image.

    ``missing="error"`` fails on a missing file with the record and path named; ``missing="render"``
    returns a typographic stand-in of the record's entity instead, and counts it. Messages name the settings
    the user gives as ``<prefix>.<root_key>`` and ``<prefix>.missing_images`` (training's ``data.image_root``, a
    benchmark's ``benchmark.image_root`` or ``benchmark.root``). References that start with a drawer's prefix are
    drawn at ``stand_in_size`` by the drawers registered when the resolver is built (`register_drawer`), and by
    ``drawers`` (prefix -> function) beside them; the error for a missing file whose reference starts as a drawer's
    would says that no drawer is registered for it. Files are read by `open_image` within ``limits``.
    """

    def __init__(
        self,
        image_root: str | Path | None = None,
        missing: str = "error",
        stand_in_size: int = 336,
        default_root: str | Path | None = None,
        prefix: str = "data",
        root_key: str = "image_root",
        drawers: Mapping[str, Drawer] | None = None,
        limits: ImageLimits = IMAGE_LIMITS,
    ):
        if missing not in MISSING_POLICIES:
            raise ValueError(f"{prefix}.missing_images must be one of {MISSING_POLICIES}, got {missing!r}")
        # without an image root, relative image paths are relative to `default_root` (the data file's folder)
        self.image_root = Path(image_root) if image_root else (Path(default_root) if default_root else None)
        root_setting = f"{prefix}.{root_key}"
        self._root_note = (
            f"{root_setting}={image_root}"
            if image_root
            else f"relative to the data file's folder {default_root}; {root_setting} is not set"
            if default_root
            else f"{root_setting} is not set"
        )
        self._advice = f"Point {root_setting} at the image folder, or set {prefix}.missing_images=render"
        self.missing = missing
        self.stand_in_size = stand_in_size
        self.rendered: set[str] = set()
        self.drawers = registered_drawers() | dict(drawers or {})  # held: pickled with the resolver for workers
        self.limits = limits

    def path_for(self, record: Conversation) -> Path | None:
        if not record.image or record.image.startswith((RENDER_PREFIX, *self.drawers)):
            return None
        path = Path(record.image)
        if not path.is_absolute() and self.image_root is not None:
            path = self.image_root / path
        return path

    def check(self, records: list[Conversation]) -> int:
        """Fail fast, before any expensive step, when images are missing and cannot be rendered.

        Returns how many images are missing (each will be rendered as a stand-in).
        """
        # only what is not there is missing: a folder, FIFO or device is refused when the record is read
        pictures = [one for r in records for one in each_picture(r)]
        missing = [r for r in pictures if (p := self.path_for(r)) is not None and file_problem(p) == NOT_FOUND]
        if missing and self.missing == "error":
            first = missing[0]
            raise DataError(
                f"{len(missing)} of {len(pictures)} images not found; first: record {first.id}: "
                f"{self.path_for(first)} ({self._root_note}). {self._advice} to draw the entity as a stand-in image."
                + self._no_drawer(first)
            )
        return len(missing)

    def _no_drawer(self, record: Conversation) -> str:
        """For a missing file whose reference starts like a drawer's (a word and a colon): that no drawer is
        registered for it, in case it names one (file names hold colons too: MMSafe-PO's ``tbn:...``)."""
        found = DRAWER_PREFIX.match(record.image or "")
        if not found:
            return ""
        return (
            f" If {found.group()!r} names a picture drawer, none is registered for it (registered: "
            f"{', '.join(sorted(self.drawers)) or 'none'}): a plug-in registers its drawers when imported "
            "(src/plugins.py)."
        )

    def pictures(self, record: Conversation) -> list[Image.Image]:
        """Every picture of ``record``, in order, each resolved as `__call__` resolves a record's one picture (a file,
        a stand-in, a drawer's picture); ``[]`` for a text-only prompt."""
        found = [self(one) for one in each_picture(record)]
        return [image for image in found if image is not None]

    def resolve(self, record: Conversation) -> Image.Image | list[Image.Image] | None:
        """What an encoder takes for ``record``: None (text-only), its one picture, or the list of its pictures."""
        if len(record.images) <= 1:
            return self(record)
        return self.pictures(record)

    def __call__(self, record: Conversation) -> Image.Image | None:
        """The record's first picture (the only one of a one-picture prompt); None for a text-only prompt."""
        if record.image and record.image.startswith(RENDER_PREFIX):
            return render_stand_in(record.image[len(RENDER_PREFIX) :], self.stand_in_size)
        for prefix, draw in self.drawers.items():
            if record.image and record.image.startswith(prefix):
                try:
                    return draw(record.image, self.stand_in_size)
                except ValueError as e:
                    raise DataError(f"record {record.id}: {e}") from None
        path = self.path_for(record)
        if path is None:
            return None
        if file_problem(path) != NOT_FOUND:  # read, or refused with what it is (a folder, a FIFO, too large)
            try:
                return open_image(path, self.limits)
            except DataError as e:
                raise DataError(f"record {record.id}: {e}", reason=e.reason) from None
        if self.missing == "render":
            self.rendered.add(record.id)
            return render_stand_in(record.stand_in_text(), self.stand_in_size)
        # relative paths of many records share one root (the reason they are grouped by); absolute ones their folder
        relative = self.image_root is not None and not Path(record.image).is_absolute()
        under = self.image_root if relative else path.parent
        raise DataError(
            f"record {record.id}: image file not found: {path} ({self._root_note}). {self._advice} to draw the entity "
            "as a stand-in image." + self._no_drawer(record),
            reason=f"image file not found under {under} ({self._root_note}). {self._advice}",
        )


def each_picture(record: Conversation) -> list[Conversation]:
    """``record`` once per picture, as a one-picture record holding that picture (the record itself for one)."""
    if len(record.images) <= 1:
        return [record]
    return [
        replace(record, image=image, image_turn=turn, images=(image,), image_turns=(turn,))
        for image, turn in zip(record.images, record.image_turns, strict=True)
    ]


# the second image of mDPO's conditional term: the record's image made uninformative, at the same size
CORRUPTIONS = ("crop", "blank", "noise")
_DEFAULTS = {"crop": {"keep": [0.0, 0.2], "seed": 0}, "blank": {}, "noise": {"std": 0.5, "seed": 0}}


def check_corruption(corruption: Mapping[str, Any]) -> dict[str, Any]:
    """``objective.corruption`` checked, its defaults filled in; a `SettingError` names the setting that is wrong.

    ``crop``: ``keep`` [lo, hi], the range of the kept area's fraction (mDPO: [0, 0.2]); ``blank``: no setting;
    ``noise``: ``std``, the standard deviation of the Gaussian noise as a fraction of the 0-255 range.
    """
    if not isinstance(corruption, Mapping):
        raise SettingError(f"objective.corruption must be a mapping with a kind, got {corruption!r}")
    kind = corruption.get("kind")
    if kind not in CORRUPTIONS:
        raise SettingError(f"objective.corruption.kind must be one of {CORRUPTIONS}, got {kind!r}")
    settings = {key for defaults in _DEFAULTS.values() for key in defaults}
    unknown = set(corruption) - {"kind", *settings}
    if unknown:
        raise SettingError(f"objective.corruption.{sorted(unknown)[0]} is not a corruption setting {sorted(settings)}")
    # every value given is checked, but only the kind's own are kept: a config that lists the settings of all kinds
    # (hydra merges an override into it) switches kind with one override, objective.corruption.kind=blank
    given = {"kind": kind} | _DEFAULTS[kind] | dict(corruption)
    out = {key: given[key] for key in ("kind", *_DEFAULTS[kind])}
    keep = given.get("keep", [0.0, 1.0])
    if not (isinstance(keep, (list, tuple)) and len(keep) == 2 and all(isinstance(x, (int, float)) for x in keep)):
        raise SettingError(f"objective.corruption.keep must be [lo, hi], got {keep!r}")
    if not 0 <= keep[0] <= keep[1] <= 1 or keep[1] == 0:
        raise SettingError(f"objective.corruption.keep must have 0 <= lo <= hi <= 1 and hi > 0, got {list(keep)}")
    if "keep" in out:
        out["keep"] = [float(x) for x in keep]
    if not isinstance(given.get("std", 1), (int, float)) or given.get("std", 1) <= 0:
        raise SettingError(f"objective.corruption.std must be a positive number, got {given['std']!r}")
    if not isinstance(given.get("seed", 0), int):
        raise SettingError(f"objective.corruption.seed must be an integer, got {given['seed']!r}")
    return out


def _rng(seed: int, record_id: str) -> np.random.Generator:
    """A generator seeded from (corruption seed, record id) alone: the same record, the same image, every time."""
    digest = hashlib.sha256(f"{seed}\0{record_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def crop_box(size: tuple[int, int], keep: list[float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random box of the image's aspect ratio whose area is a uniform fraction in
    ``keep`` of the image's (at least one pixel), at a uniform place."""
    width, height = size
    side = float(np.sqrt(rng.uniform(keep[0], keep[1])))
    w, h = max(1, min(width, round(width * side))), max(1, min(height, round(height * side)))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    return left, top, left + w, top + h


def corrupt_image(
    image: Image.Image, corruption: Mapping[str, Any], record_id: str, fill: tuple[int, int, int]
) -> Image.Image:
    """The record's image made uninformative by ``corruption`` (checked by `check_corruption`), same size and mode.

    crop: a random part, resized back to the whole (mDPO's corrupted image); blank: a flat image of ``fill`` (the
    processor's mean colour); noise: Gaussian noise added to every pixel, clipped to 0-255. The same size keeps the
    prompt's image tokens, so the prompt ids of the real image hold for the corrupted one.
    """
    image = image.convert("RGB")
    kind = corruption["kind"]
    if kind == "blank":
        out = Image.new("RGB", image.size, fill)
    elif kind == "crop":
        box = crop_box(image.size, corruption["keep"], _rng(corruption["seed"], record_id))
        out = image.crop(box).resize(image.size, Image.Resampling.BICUBIC)
    else:
        pixels = np.asarray(image, dtype=np.float32)
        noise = _rng(corruption["seed"], record_id).normal(0.0, corruption["std"] * 255, pixels.shape)
        out = Image.fromarray(np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8), "RGB")
    assert out.size == image.size, (out.size, image.size)
    return out
