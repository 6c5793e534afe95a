"""One corpus of hostile records goes through `src/validate.py` and `src/train.py data.on_error=skip` as a user runs
them: no hang, no crash, every record accounted for (usable or rejected with its reason), and each process within
the memory budget docs/reliability.md states (validation 3 GB, training of the tiny model 4 GB)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import ROOT

VALIDATE_BUDGET_MB = 3 * 1024
TRAIN_BUDGET_MB = 4 * 1024


def build_corpus(folder: Path) -> tuple[Path, Path, dict[str, str | None]]:
    """The data file (generic JSONL saved with a byte-order mark and CRLF line ends), its image folder, and each
    record's id -> the reason it must be rejected for (None: usable)."""
    img = folder / "img"
    img.mkdir(parents=True)
    Image.new("RGB", (48, 40), (20, 160, 90)).save(img / "ok.png")
    os.mkfifo(img / "fifo.png")
    (img / "folder.png").mkdir()
    os.symlink("/dev/zero", img / "link-zero.png")
    (img / "notes.txt").write_text("not a picture\n")
    os.symlink(img / "notes.txt", img / "link-text.png")
    (img / "empty.png").write_bytes(b"")
    Image.new("L", (30000, 1), 128).save(img / "strip.png")  # 172 bytes; padded to a square: 30000 x 30000
    Image.fromarray(np.full((24, 32), 40000, dtype=np.uint16)).save(img / "deep.png")  # 16-bit grey
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(img / "cmyk.jpg")
    frames = [Image.new("P", (32, 32), i) for i in (1, 2, 3)]
    frames[0].save(img / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)

    expected: dict[str, str | None] = {}
    lines = []

    def add(rid: str, reason: str | None, image: str = "ok.png", question: str = "What is shown here?", **kw):
        answers = {"chosen": f"I can't help with that ({rid}).", "rejected": f"Sure, here is how ({rid})."} | kw
        messages = [{"role": "user", "content": f"<image>\n{question}"}]
        lines.append(json.dumps({"id": rid, "messages": messages, "image": image, "group": rid} | answers))
        expected[rid] = reason

    for i in range(6):
        add(f"good-{i}", None)
    add("fifo", "not a regular file", image="fifo.png")
    add("folder", "not a regular file", image="folder.png")
    add("dev-zero", "not a regular file", image="/dev/zero")
    add("link-to-dev-zero", "not a regular file", image="link-zero.png")
    add("link-to-text", "cannot read image", image="link-text.png")
    add("empty-file", "empty file", image="empty.png")
    add("strip-30000x1", "too long and thin", image="strip.png")
    add("sixteen-bit", None, image="deep.png")
    add("cmyk", None, image="cmyk.jpg")
    add("animated", None, image="animated.gif")
    add("image-in-answers", None, chosen="No. <image> stays text.", rejected="Yes: <image><image> here.")
    add("eos-bos-in-answers", None, chosen="No.</s> Still the answer <s> goes on.", rejected="<s>Sure</s></s>")
    add("eos-bos-in-prompt", None, question="What is this </s><s> thing? <|im_start|>system")
    add("two-markers", "holds 2 <image> markers", question="and this <image> too?")
    add("long-answer", "text too long", chosen="word " * 40_000)  # 200,000 characters
    data = folder / "hostile.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    return data, img, expected


def run_measured(script: str, *overrides: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """``python src/<script> <overrides>`` in a fresh interpreter; returns it and its own peak resident memory (MB)."""
    code = (
        "import os, resource, runpy, sys\n"
        "sys.argv = sys.argv[1:]\n"
        "sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python src/<script>` puts its folder first\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n"
        "    print(f'PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)\n"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "src" / script), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    peak = [line for line in out.stderr.splitlines() if line.startswith("PEAK_RSS_KB ")]
    assert peak, (out.stdout + out.stderr)[-3000:]
    return out, int(peak[-1].split()[1]) / 1024


def data_settings(data: Path, img: Path) -> list[str]:
    return [
        "data=jsonl",
        f"data.path={data}",
        f"data.image_root={img}",
        "prompt_format.image_aspect_ratio=pad",  # the paper's presets: the 30000 x 1 strip would be padded to a square
        "data.max_length=512",
    ]


def check_accounting(summary: dict, expected: dict[str, str | None]) -> None:
    """Every record is counted once: the usable ones are the expected ones, and each rejection has its reason."""
    rejected = {rid: reason for rid, reason in expected.items() if reason}
    assert summary["records_in_file"] == len(expected)
    assert summary["records_read"] == summary["usable"] + summary["rejected_records"] + summary["skipped"]
    assert summary["usable"] == len(expected) - len(rejected) and summary["skipped"] == 0, summary
    assert summary["rejected_records"] == len(rejected), summary["problems"]
    for rid, reason in rejected.items():
        lines = [p for p in summary["problems"] if f"id={rid})" in p or f"record {rid}:" in p]
        assert len(lines) == 1 and reason in lines[0], (rid, reason, lines, summary["problems"])


def test_validate_accounts_for_every_hostile_record_within_budget(tmp_path):
    data, img, expected = build_corpus(tmp_path / "corpus")
    run = tmp_path / "validate"
    out, peak_mb = run_measured("validate.py", *data_settings(data, img), f"hydra.run.dir={run}", timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]  # 1: the data has bad records (validate.py's "NOT OK"), not a crash
    assert "Traceback" not in text and "NOT OK" in text, text[-3000:]
    check_accounting(json.loads((run / "validation.json").read_text()), expected)
    print(f"validation peak memory: {peak_mb:.0f} MB")  # shown with pytest -s
    assert peak_mb < VALIDATE_BUDGET_MB, f"validation peaked at {peak_mb:.0f} MB"


def test_training_skips_every_hostile_record_and_trains_on_the_rest_within_budget(tmp_path):
    data, img, expected = build_corpus(tmp_path / "corpus")
    run = tmp_path / "train"
    overrides = [*data_settings(data, img), "data.on_error=skip", "data.val_fraction=0.2", "trainer.max_steps=2"]
    overrides += ["logger=csv", f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={run}"]
    out, peak_mb = run_measured("train.py", *overrides, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    check_accounting(json.loads((run / "data_summary.json").read_text()), expected)
    assert (run / "model" / "config.json").is_file() and not (run / "FAILED").exists()
    print(f"training peak memory: {peak_mb:.0f} MB")
    assert peak_mb < TRAIN_BUDGET_MB, f"training peaked at {peak_mb:.0f} MB"
