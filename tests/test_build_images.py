"""Image matchers of the data builder: typography, a local folder, and Wikipedia against a loopback server."""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from src.databuilder.base import BuildError, Entity, NoImage
from src.databuilder.images import LocalImages, TypographyImages, WikipediaImages, normalize_name

ROOT = Path(__file__).resolve().parents[1]
IMAGE_CONFIGS = ROOT / "configs" / "image"


def entity(text: str, type_: str = "PER") -> Entity:
    return Entity(text=text, type=type_, start=0, end=len(text))


def image_bytes(fmt: str = "PNG", size: int = 80, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def pixel(path: Path) -> tuple[int, ...]:
    with Image.open(path) as im:
        return im.convert("RGB").getpixel((0, 0))


# ---------------------------------------------------------------- configs


def test_configs_target_the_matchers(tmp_path):
    typography = instantiate(OmegaConf.load(IMAGE_CONFIGS / "typography.yaml"))
    assert isinstance(typography, TypographyImages) and typography.size == 336

    local = OmegaConf.load(IMAGE_CONFIGS / "local.yaml")
    assert local._target_ == "src.databuilder.images.LocalImages" and OmegaConf.is_missing(local, "root")
    local.root = str(tmp_path)
    assert isinstance(instantiate(local), LocalImages)

    cfg = OmegaConf.merge(
        {"paths": {"cache_dir": str(tmp_path / "cache")}}, {"image": OmegaConf.load(IMAGE_CONFIGS / "wikipedia.yaml")}
    )
    wikipedia = instantiate(cfg.image)
    assert isinstance(wikipedia, WikipediaImages) and wikipedia.enabled is False
    assert wikipedia.cache_dir == tmp_path / "cache" / "wikipedia"


# ---------------------------------------------------------------- typography


def test_typography_is_deterministic(tmp_path):
    matcher = TypographyImages(size=64)
    first = matcher(entity("Rand Paul"), tmp_path / "rec.1_e0")
    second = matcher(entity("Rand Paul"), tmp_path / "other" / "rec2")
    other = matcher(entity("Ron Paul"), tmp_path / "rec3")

    assert first.path == tmp_path / "rec.1_e0.png" and first.source == "typography"
    assert first.path.read_bytes() == second.path.read_bytes() != other.path.read_bytes()
    with Image.open(first.path) as im:
        assert im.format == "PNG" and im.size == (64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "rec.1_e0.png", "rec3.png"]  # no temp files left


# ---------------------------------------------------------------- local folder


def test_normalize_name():
    assert normalize_name("Rand_Paul") == normalize_name("rand-paul") == normalize_name(" RAND  Paul ") == "rand paul"
    assert normalize_name("Zoë Saldaña") == "zoe saldana"
    assert normalize_name("Straße") == "strasse"


@pytest.mark.parametrize("name", ["rand_paul.jpg", "Rand-Paul.PNG", "Rand Paul.jpeg", "RAND__paul.webp"])
def test_local_matches_name_variants(tmp_path, name):
    root = tmp_path / "root"
    root.mkdir()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[Path(name).suffix.lower()]
    data = image_bytes(fmt)
    (root / name).write_bytes(data)

    match = LocalImages(str(root))(entity("Rand Paul"), tmp_path / "out" / "r0")
    assert match.source == str(root / name)
    if fmt == "WEBP":  # converted
        assert match.path == tmp_path / "out" / "r0.png" and pixel(match.path) == (200, 30, 30)
    else:  # copied as it is
        assert match.path == tmp_path / "out" / f"r0{'.png' if fmt == 'PNG' else '.jpg'}"
        assert match.path.read_bytes() == data


def test_local_accents_type_folders_and_failures(tmp_path):
    root = tmp_path / "root"
    (root / "PER").mkdir(parents=True)
    (root / "mercury.png").write_bytes(image_bytes(color=(0, 0, 255)))
    (root / "PER" / "Mercury.png").write_bytes(image_bytes(color=(0, 255, 0)))
    (root / "zoe_saldana.png").write_bytes(image_bytes())
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "tiny.png").write_bytes(image_bytes(size=8))
    (root / "notes.txt").write_text("not an image")
    matcher = LocalImages(str(root), extensions=["jpg", ".PNG"])
    out = tmp_path / "out"

    assert matcher(entity("Zoë Saldaña"), out / "a").source == str(root / "zoe_saldana.png")
    assert pixel(matcher(entity("Mercury", "PER"), out / "b").path) == (0, 255, 0)  # the type's folder first
    assert pixel(matcher(entity("Mercury", "LOC"), out / "c").path) == (0, 0, 255)  # else the root
    index = matcher.index()
    assert matcher.index() is index and len(index) == 5  # indexed once; notes.txt ignored

    failures = {}
    for text in ("broken", "tiny", "notes", "Nobody"):
        with pytest.raises(NoImage) as caught:
            matcher(entity(text), out / text)
        failures[text] = caught.value
    assert {text: e.reason for text, e in failures.items()} == {
        "broken": "bad_image",
        "tiny": "bad_image",
        "notes": "not_found",
        "Nobody": "not_found",
    }
    assert "smaller than min_size=32" in failures["tiny"].detail


def test_local_missing_root(tmp_path):
    with pytest.raises(BuildError, match="image.root=.*is not a folder"):
        LocalImages(str(tmp_path / "nowhere"))


def test_local_fingerprint_follows_the_folder(tmp_path):
    """The fingerprint is part of the image stage's cache key: a file added or replaced changes it."""
    (tmp_path / "PER").mkdir()
    (tmp_path / "PER" / "rand_paul.png").write_bytes(image_bytes())
    matcher = LocalImages(str(tmp_path))
    before = matcher.fingerprint()
    assert LocalImages(str(tmp_path)).fingerprint() == before
    (tmp_path / "taylor_swift.png").write_bytes(image_bytes())
    added = matcher.fingerprint()
    (tmp_path / "PER" / "rand_paul.png").write_bytes(image_bytes(size=90))
    assert len({before, added, matcher.fingerprint()}) == 3


# ---------------------------------------------------------------- Wikipedia


class FakeWikipedia:
    """A REST summary API and an image host on 127.0.0.1; requests counted per path."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.user_agents: list[str | None] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.base_url = f"{self.origin}/api/rest_v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.images = {
            "red.png": image_bytes(color=(200, 30, 30)),
            "thumb.jpg": image_bytes("JPEG", color=(30, 200, 30)),
            "broken.png": b"\x89PNG\r\n\x1a\n truncated",
            "logo.gif": image_bytes("GIF", color=(30, 30, 200)),
        }

    def page(self, title: str, count: int) -> tuple[int, dict | None]:
        """(HTTP status, summary JSON) of a title."""
        red = {"source": f"{self.origin}/img/red.png", "width": 80, "height": 80}
        thumb = {"source": "/img/thumb.jpg", "width": 80, "height": 80}  # relative: resolved against base_url
        pages = {
            "Rand_Paul": {"type": "standard", "originalimage": red, "thumbnail": thumb},
            "AC/DC": {"type": "standard", "thumbnail": {"source": f"{self.origin}/img/logo.gif"}},
            "Plain_Text": {"type": "standard", "extract": "No picture here."},
            "Mercury": {"type": "disambiguation", "thumbnail": thumb},
            "Huge_Original": {"type": "standard", "originalimage": {**red, "width": 9000}, "thumbnail": thumb},
            "Svg_Logo": {"type": "standard", "originalimage": {"source": "/img/logo.svg"}, "thumbnail": thumb},
            "Broken_Original": {
                "type": "standard",
                "originalimage": {"source": f"{self.origin}/img/broken.png"},
                "thumbnail": thumb,
            },
            "Broken_Image": {"type": "standard", "thumbnail": {"source": f"{self.origin}/img/broken.png"}},
        }
        if title == "Slow_Page":
            time.sleep(0.6)
        if title == "Flaky_Page":
            return (503, None) if count == 1 else (200, pages["Rand_Paul"])
        if title in pages:
            return 200, {"title": title.replace("_", " "), **pages[title]}
        return 404, None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (timeout case)
                    pass

            def do_GET(self) -> None:
                with fake.lock:
                    fake.counts[self.path] += 1
                    fake.user_agents.append(self.headers.get("User-Agent"))
                    count = fake.counts[self.path]
                prefix = "/api/rest_v1/page/summary/"
                if self.path == prefix + "Rand_paul":  # a redirect page
                    self.send(302, b"", "text/plain", {"Location": prefix + "Rand_Paul"})
                elif self.path.startswith(prefix):
                    status, page = fake.page(unquote(self.path[len(prefix) :]), count)
                    body = json.dumps(page or {"type": "https://mediawiki.org/wiki/HyperSwitch/errors/not_found"})
                    self.send(status, body.encode(), "application/json")
                elif self.path.startswith("/img/") and self.path[5:] in fake.images:
                    self.send(200, fake.images[self.path[5:]], "image/png")
                else:
                    self.send(404, b"no such file", "text/plain")

        return Handler

    def requests(self) -> int:
        with self.lock:
            return sum(self.counts.values())


@pytest.fixture()
def wiki() -> Iterator[FakeWikipedia]:
    fake = FakeWikipedia()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def make_wikipedia(fake: FakeWikipedia, cache_dir: Path | None, **kwargs) -> WikipediaImages:
    settings = dict(
        enabled=True,
        base_url=fake.base_url,
        cache_dir=str(cache_dir) if cache_dir else None,
        timeout_s=0.3,
        max_retries=1,
        backoff_s=0,
        user_agent="test-agent/1.0 (test@example.org)",
    )
    return WikipediaImages(**{**settings, **kwargs})


def no_image(matcher: WikipediaImages, text: str, dest: Path) -> NoImage:
    with pytest.raises(NoImage) as caught:
        matcher(entity(text), dest)
    return caught.value


def test_wikipedia_found_redirect_and_user_agent(wiki, tmp_path):
    matcher = make_wikipedia(wiki, None)
    match = matcher(entity("Rand Paul"), tmp_path / "r0")
    assert match.path == tmp_path / "r0.png" and match.path.read_bytes() == wiki.images["red.png"]
    assert match.source == f"{wiki.origin}/img/red.png"  # the original image, preferred to the thumbnail
    assert matcher(entity("Rand paul"), tmp_path / "r1").source == match.source  # a redirect is followed
    assert wiki.counts["/api/rest_v1/page/summary/Rand_paul"] == 1
    assert set(wiki.user_agents) == {"test-agent/1.0 (test@example.org)"}


def test_wikipedia_picks_and_converts_images(wiki, tmp_path):
    matcher = make_wikipedia(wiki, None)
    thumb = f"{wiki.origin}/img/thumb.jpg"
    for text in ("Huge Original", "Svg Logo", "Broken Original"):  # too big, not raster, does not decode
        match = matcher(entity(text), tmp_path / text)
        assert match.source == thumb and match.path.suffix == ".jpg"
    assert wiki.counts["/img/logo.svg"] == 0

    logo = matcher(entity("AC/DC", "ORG"), tmp_path / "acdc")  # "/" is quoted in the title
    assert wiki.counts["/api/rest_v1/page/summary/AC%2FDC"] == 1
    assert logo.path == tmp_path / "acdc.png" and pixel(logo.path) == (30, 30, 200)  # GIF converted to PNG


def test_wikipedia_reasons(wiki, tmp_path):
    matcher = make_wikipedia(wiki, None)
    assert no_image(matcher, "Nobody Here", tmp_path / "a").reason == "not_found"
    assert no_image(matcher, "Plain Text", tmp_path / "b").reason == "no_image_on_page"
    assert no_image(matcher, "Mercury", tmp_path / "c").reason == "disambiguation"
    assert no_image(matcher, "Broken Image", tmp_path / "d").reason == "bad_image"
    too_large = no_image(make_wikipedia(wiki, None, max_bytes=100), "Rand Paul", tmp_path / "e")
    assert too_large.reason == "too_large"
    small = no_image(make_wikipedia(wiki, None, min_size=100), "Rand Paul", tmp_path / "f")
    assert small.reason == "bad_image" and "smaller than min_size=100" in small.detail
    assert not list(tmp_path.iterdir())


def test_wikipedia_timeout_and_retry(wiki, tmp_path):
    matcher = make_wikipedia(wiki, tmp_path / "cache")
    started = time.monotonic()
    timeout = no_image(matcher, "Slow Page", tmp_path / "a")
    assert timeout.reason == "timeout" and "after 2 attempts" in timeout.detail
    assert wiki.counts["/api/rest_v1/page/summary/Slow_Page"] == 2 and time.monotonic() - started < 3

    match = matcher(entity("Flaky Page"), tmp_path / "b")  # 503, then the page
    assert match.path.read_bytes() == wiki.images["red.png"]
    assert wiki.counts["/api/rest_v1/page/summary/Flaky_Page"] == 2

    failing = make_wikipedia(wiki, None, max_retries=0)
    wiki.counts.clear()
    assert no_image(failing, "Flaky Page", tmp_path / "c").reason == "network_error"


def test_wikipedia_cache(wiki, tmp_path):
    cache = tmp_path / "cache"
    first = make_wikipedia(wiki, cache)
    found = first(entity("Rand Paul"), tmp_path / "out" / "a")
    for text in ("Nobody Here", "Plain Text", "Mercury"):
        no_image(first, text, tmp_path / "out" / text)
    asked = wiki.requests()
    assert asked == 5  # four summaries and one image

    second = make_wikipedia(wiki, cache)  # a re-run: everything from the cache, missing pages included
    again = second(entity("Rand Paul"), tmp_path / "out" / "b")
    assert again.source == found.source and again.path.read_bytes() == found.path.read_bytes()
    assert [no_image(second, t, tmp_path / "x").reason for t in ("Nobody Here", "Plain Text", "Mercury")] == [
        "not_found",
        "no_image_on_page",
        "disambiguation",
    ]
    assert wiki.requests() == asked
    assert not list(cache.rglob("*.tmp"))

    uncached = make_wikipedia(wiki, None)
    uncached(entity("Rand Paul"), tmp_path / "out" / "c")
    assert wiki.requests() == asked + 2


def test_wikipedia_disabled_makes_no_request(wiki, tmp_path):
    matcher = make_wikipedia(wiki, tmp_path / "cache", enabled=False)
    with pytest.raises(BuildError, match=r"image\.enabled=true"):
        matcher(entity("Rand Paul"), tmp_path / "a")
    assert wiki.requests() == 0
    with pytest.raises(BuildError, match="base_url"):
        WikipediaImages(base_url="ftp://example.org")
