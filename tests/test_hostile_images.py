"""Hostile pictures and data files: every one is read within a bounded time and memory, or refused with what it is.

A tiny PNG that is 30000 x 1 pixels, a FIFO, a folder or /dev/zero given as an image, an empty file, a 16-bit or
CMYK or animated picture, data files with a byte-order mark or Windows line ends (docs/reliability.md#bounds).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.data.images import IMAGE_LIMITS, ImageLimits, ImageResolver, open_image, pad_to_square
from src.data.readers import read_ids, read_records
from src.data.records import DataError, PreferenceRecord, Turn
from src.errors import SettingError
from src.files import file_problem, read_regular
from tests.helpers import compose_config

ROOT = Path(__file__).resolve().parents[1]


def within(seconds, fn, *args):
    """``fn(*args)`` in a thread that must finish in ``seconds`` (a read of a FIFO would block for ever)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # handed to the test thread
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__}{args} still running after {seconds} s: it opened what it must not"
    if "error" in out:
        raise out["error"]
    return out["value"]


def record(image: str, rid: str = "r1") -> PreferenceRecord:
    return PreferenceRecord(rid, (Turn("user", "What is shown?"),), 0, image, "no", "yes")


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels and holds none: only its header is ever read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# -- bounds -------------------------------------------------------------------------------------

PEAK_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # the old code's 30000 x 30000 canvas cannot fit
from PIL import Image
from src.data.images import ImageResolver, pad_to_square
from src.data.records import DataError, PreferenceRecord, Turn
from src.errors import SettingError
folder = sys.argv[1]
Image.new("RGB", (30000, 1), (9, 9, 9)).save(folder + "/wide.png")
record = PreferenceRecord("wide", (Turn("user", "q"),), 0, "wide.png", "no", "yes")
try:
    image = pad_to_square(ImageResolver(folder)(record), (122, 116, 104))  # prompt_format.image_aspect_ratio=pad
    print("padded", image.size)
except DataError as e:
    print("refused", e)
print("peak_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_a_30000_by_1_png_under_pad_is_refused_within_bounded_memory(tmp_path):
    """172 bytes on disk, a 30000 x 30000 canvas (2.7 GB) once padded: refused from its header, in little memory."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "wide.png").stat().st_size < 1000
    assert "refused record wide: image too long and thin: aspect ratio beyond 20:1 (30000 x 1 pixels)" in run.stdout
    peak = int(run.stdout.split("peak_mb")[1])
    assert peak < 1500, run.stdout


def test_a_refused_picture_is_a_counted_reason_not_a_crash(tmp_path):
    Image.new("RGB", (30000, 1)).save(tmp_path / "wide.png")
    with pytest.raises(DataError) as e:
        ImageResolver(tmp_path)(record("wide.png"))
    assert str(e.value) == (
        f"record r1: image too long and thin: aspect ratio beyond 20:1 (30000 x 1 pixels): {tmp_path / 'wide.png'}"
    )
    assert e.value.reason == "image too long and thin: aspect ratio beyond 20:1"


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_large_picture_is_shrunk_before_it_is_converted_or_padded(tmp_path, suffix):
    path = tmp_path / f"big{suffix}"
    Image.new("RGB", (9000, 600), (200, 20, 20)).save(path)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (IMAGE_LIMITS.max_side, 273)
    assert np.abs(np.asarray(image, dtype=int)[100, 2000] - (200, 20, 20)).max() <= 3
    assert pad_to_square(image, (0, 0, 0)).size == (IMAGE_LIMITS.max_side, IMAGE_LIMITS.max_side)


def test_more_pixels_than_the_limit_are_refused_from_the_header(tmp_path):
    """9000 x 9000 is under PIL's own bomb check but over ours; the file holds no pixels, so nothing is decoded."""
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(9000, 9000))
    with pytest.raises(DataError, match=r"image too large: 9000 x 9000 pixels > 67108864: .*huge\.png") as e:
        open_image(path)
    assert e.value.reason == "image too large: more than 67108864 pixels"
    Image.new("RGB", (40, 30)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match="image too large: 40 x 30 pixels > 1000"):
        open_image(tmp_path / "small.png", ImageLimits(max_pixels=1000))


@pytest.mark.parametrize("bad", [{"max_pixels": 0}, {"max_side": 1.5}, {"max_aspect": 0.5}, {"max_bytes": True}])
def test_limits_are_checked_for_range(bad):
    with pytest.raises(SettingError, match=f"ImageLimits.{next(iter(bad))} must be"):
        ImageLimits(**bad)


def test_a_file_over_the_byte_limit_is_not_opened(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"image path is larger than 10 bytes: .*a\.png"):
        open_image(tmp_path / "a.png", ImageLimits(max_bytes=10))


# -- files that are not files -------------------------------------------------------------------


def _fifo(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    return "pipe.png", "a named pipe (FIFO)"


def _folder(tmp_path):
    (tmp_path / "folder.png").mkdir()
    return "folder.png", "a directory"


def _dev_zero(tmp_path):
    return "/dev/zero", "a character device"


def _link_to_dev_zero(tmp_path):
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    return "zero.png", "a character device, through a symbolic link"


@pytest.mark.parametrize("make", [_fifo, _folder, _dev_zero, _link_to_dev_zero])
def test_a_path_that_is_not_a_regular_file_is_refused_unopened(tmp_path, make):
    image, kind = make(tmp_path)
    path = Path(image) if Path(image).is_absolute() else tmp_path / image
    resolver = ImageResolver(tmp_path, missing="render")  # not missing: never drawn as a stand-in instead
    assert within(5, resolver.check, [record(image)]) == 0
    with pytest.raises(DataError) as e:
        within(5, resolver, record(image))
    assert str(e.value) == f"record r1: image path is not a regular file ({kind}): {path}"
    assert e.value.reason == f"image path is not a regular file ({kind})" and not resolver.rendered


def test_an_empty_file_and_a_link_to_text_are_clear_rejections(tmp_path):
    (tmp_path / "empty.png").touch()
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "notes.png").symlink_to(tmp_path / "notes.txt")
    resolver = ImageResolver(tmp_path)
    with pytest.raises(DataError, match=r"^record r1: image path is an empty file: .*empty\.png$"):
        resolver(record("empty.png"))
    with pytest.raises(DataError, match=r"^record r1: cannot read image .*notes\.png: not a picture"):
        resolver(record("notes.png"))


def test_a_missing_file_is_still_missing(tmp_path):
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    assert ImageResolver(tmp_path, missing="render").check([record("dangling.png"), record("nope.png")]) == 2
    with pytest.raises(DataError, match="record r1: image file not found: .*dangling.png"):
        ImageResolver(tmp_path)(record("dangling.png"))


def test_file_bytes_are_read_only_from_regular_files_within_a_limit(tmp_path):
    """What digests image bytes (the data builder's cache) reads no FIFO, no device and no more than the limit."""
    from src.databuilder.pipeline import _file_digest

    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "a.png").write_bytes(b"x" * 100)
    assert within(5, _file_digest, tmp_path / "pipe.png") is None
    assert within(5, _file_digest, Path("/dev/zero")) is None
    assert _file_digest(tmp_path / "a.png") is not None
    assert read_regular(tmp_path / "a.png", 100) == b"x" * 100
    with pytest.raises(OSError, match="larger than 99 bytes"):
        read_regular(tmp_path / "a.png", 99)
    assert file_problem(tmp_path / "nope") == "not found"


# -- picture modes ------------------------------------------------------------------------------


def test_a_16_bit_picture_is_scaled_not_clipped_to_white(tmp_path):
    pixels = np.array([[0, 30000, 65535]], dtype=np.uint16).repeat(3, axis=0)
    Image.fromarray(pixels).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    image = open_image(tmp_path / "g16.png")
    assert image.mode == "RGB" and [image.getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (117,) * 3, (255,) * 3]


def test_cmyk_palette_la_and_animated_pictures_come_out_rgb(tmp_path, recwarn):
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("LA", (40, 30), (100, 50)).save(tmp_path / "la.png")
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.save(tmp_path / "transparent.png", transparency=0)
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 3
    expected = {"cmyk.jpg": (255, 0, 0), "la.png": (100, 100, 100), "transparent.png": (0, 200, 0)}
    expected["anim.gif"] = (255, 0, 0)  # the first frame
    for name, colour in expected.items():
        image = open_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == (40, 30), name
        assert np.abs(np.asarray(image, dtype=int)[15, 20] - colour).max() <= 3, (name, image.getpixel((20, 15)))
    assert not [w for w in recwarn if "Palette" in str(w.message)]


# -- data files ---------------------------------------------------------------------------------

BOM = b"\xef\xbb\xbf"


def _generic(rid):
    return {"id": rid, "prompt": "<image>\nq", "image": "a.png", "chosen": "c", "rejected": "r"}


def test_jsonl_and_json_with_a_byte_order_mark_and_crlf_are_read(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(BOM + b"\r\n".join(json.dumps(_generic(r)).encode() for r in ("a", "b")) + b"\r\n")
    assert [r.id for r in read_records(jsonl)] == ["a", "b"]
    mmsafe = tmp_path / "d.json"
    record = {"id": 1, "question": "USER: <image>\nQ ASSISTANT:", "image": "a.jpg", "chosen": "x", "rejected": "y"}
    mmsafe.write_bytes(BOM + json.dumps([record], indent=1).replace("\n", "\r\n").encode())
    assert [r.id for r in read_records(mmsafe)] == ["1"]
    ids = tmp_path / "ids.txt"
    ids.write_bytes(BOM + b"a\r\nb\r\n")
    assert read_ids(ids) == {"a", "b"}


def test_other_readers_take_a_byte_order_mark_too(tmp_path):
    from src.databuilder.readers import read_text_pairs
    from src.evaluation.benchmarks import MMSafetyBench

    pairs = tmp_path / "hh.jsonl"
    pair = {"id": "p", "prompt": "Where is Paris?", "chosen": "In France.", "rejected": "No idea."}
    pairs.write_bytes(BOM + json.dumps(pair).encode() + b"\r\n")
    assert [p.id for p in read_text_pairs(pairs)] == ["p"]
    (tmp_path / "mm" / "processed_questions").mkdir(parents=True)
    question = {"1": {"Question": "q?", "Rephrased Question": "r?", "Key Phrase": "k"}}
    (tmp_path / "mm" / "processed_questions" / "01-Illegal_Activitiy.json").write_bytes(
        BOM + json.dumps(question).encode()
    )
    bench = MMSafetyBench(str(tmp_path / "mm"), settings=["text_only"])
    assert [i.id for i in bench.items()] == ["01-Illegal_Activitiy/1/text_only"]


def test_a_fifo_as_data_file_is_refused_not_read(tmp_path):
    from src.data.datamodule import check_data_paths

    os.mkfifo(tmp_path / "data.jsonl")
    with pytest.raises(DataError, match=r"data\.jsonl: the data file is not a regular file \(a named pipe \(FIFO\)\)"):
        within(5, read_records, tmp_path / "data.jsonl")
    with pytest.raises(DataError, match=r"not a regular file \(a named pipe \(FIFO\)\) \(data\.path\)"):
        within(5, check_data_paths, {"path": str(tmp_path / "data.jsonl"), "format": "jsonl"})


# -- validate.py and training's on_error=skip ---------------------------------------------------


def test_validate_counts_each_hostile_picture_as_a_rejection_with_its_reason(tmp_path):
    from src.validate import report, validate

    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (40, 30), (200, 20, 20)).save(img / "ok.png")
    Image.fromarray(np.full((30, 40), 30000, dtype=np.uint16)).save(img / "g16.png")
    Image.new("RGB", (30000, 1)).save(img / "wide.png")
    os.mkfifo(img / "pipe.png")
    (img / "folder.png").mkdir()
    (img / "zero.png").symlink_to("/dev/zero")
    (img / "empty.png").touch()
    names = ["ok", "g16", "wide", "pipe", "folder", "zero", "empty"]
    lines = [json.dumps(_generic(name) | {"image": f"{name}.png"}) for name in names]
    path = tmp_path / "d.jsonl"
    path.write_bytes(BOM + "\r\n".join(lines).encode() + b"\r\n")
    overrides = ["data=jsonl", f"data.path={path}", f"data.image_root={img}", "data.val_fraction=0"]
    summary = within(120, validate, compose_config("validate", overrides, tmp_path / "run"))
    assert summary["records_in_file"] == 7 and summary["usable"] == 2 and summary["rejected_records"] == 5
    reasons = {g["reason"]: g["first"] for g in summary["problems_by_reason"]}
    assert reasons == {
        "image too long and thin: aspect ratio beyond 20:1": ["wide"],
        "image path is not a regular file (a named pipe (FIFO))": ["pipe"],
        "image path is not a regular file (a directory)": ["folder"],
        "image path is not a regular file (a character device, through a symbolic link)": ["zero"],
        "image path is an empty file": ["empty"],
    }
    assert any(
        p == f"record pipe: image path is not a regular file (a named pipe (FIFO)): {img / 'pipe.png'}"
        for p in summary["problems"]
    )
    assert "NOT OK" in report(summary, show=10)


def test_training_stops_at_a_hostile_picture_with_one_line_naming_record_and_path(tiny, tmp_path):
    from src.data.data_settings import ReaderSettings
    from src.data.datamodule import PreferenceDataModule

    os.mkfifo(tmp_path / "pipe.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_generic("pipe") | {"image": "pipe.png"}) + "\n")
    dm = PreferenceDataModule(ReaderSettings(str(path), image_root=str(tmp_path), val_fraction=0), processor=tiny[1])
    with pytest.raises(DataError) as e:
        within(60, dm.setup, "fit")
    assert (
        str(e.value) == f"record pipe: image path is not a regular file (a named pipe (FIFO)): {tmp_path / 'pipe.png'}"
    )
