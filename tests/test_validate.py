"""Hostile input: every case gives a clear message or a counted skip, through validate.py and training."""

import json

import pytest
from PIL import Image

from tests.helpers import compose_config, run_entry


def rec(rid, **kw):
    base = {
        "id": rid,
        "messages": [{"role": "user", "content": "<image>\nWhat is shown?"}],
        "image": "ok.png",
        "chosen": "I can't help with that.",
        "rejected": "Sure, here is how.",
    }
    return json.dumps(base | kw)


@pytest.fixture
def hostile(tmp_path):
    """A data set with one of each problem, plus good records, in the generic JSONL format."""
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (40, 30), (200, 20, 20)).save(img / "ok.png")
    Image.new("L", (40, 30), 90).save(img / "gray.png")
    Image.new("RGBA", (40, 30), (0, 0, 255, 120)).save(img / "rgba.png")
    Image.new("P", (40, 30)).save(img / "palette.png")
    (img / "truncated.png").write_bytes((img / "ok.png").read_bytes()[:60])
    Image.new("RGB", (300, 300)).save(img / "huge.png")
    lines = [
        rec("good-1"),
        rec("good-2"),
        rec("gray", image="gray.png"),
        rec("rgba", image="rgba.png"),
        rec("palette", image="palette.png"),
        rec("no-marker", messages=[{"role": "user", "content": "What is shown?"}]),  # image -> last user turn
        '{"id": "broken", "messages": [',
        json.dumps({"id": "no-rejected", "prompt": "<image>\nq", "image": "ok.png", "chosen": "c"}),
        rec("wrong-type", chosen=123),
        rec("blank", chosen="   "),
        rec("same", rejected="I can't help with that."),
        rec("good-1"),  # duplicate id
        rec("missing-image", image="nope.png"),
        rec("truncated-image", image="truncated.png"),
        rec("huge-image", image="huge.png"),
        rec("two-markers", messages=[{"role": "user", "content": "<image> and <image>"}]),
        rec("too-long", messages=[{"role": "user", "content": "<image>\n" + "word " * 3000}]),
        rec("null-image", image=None),
    ]
    path = tmp_path / "hostile.jsonl"
    data = "\n".join(lines).encode() + b'\n{"id": "latin1", "prompt": "caf\xe9"}\n'
    path.write_bytes(data)
    return path, img


EXPECTED = {
    "invalid JSON": ":7:",
    "missing field 'rejected'": "no-rejected",
    "field 'chosen' must be a string": "wrong-type",
    "field 'chosen' is empty": "blank",
    "'chosen' and 'rejected' are identical": "same",
    "duplicate record id 'good-1'": "hostile.jsonl",
    "image file not found": "missing-image",
    "cannot read image": "truncated-image",
    "2 <image> markers": "two-markers",
    "not valid UTF-8": ":19:",
    "<image> marker but no 'image'": "null-image",
}
MISSING_ADVICE = "Point data.image_root at the image folder, or set data.missing_images=render"
# how each record that is not usable is named, once, in the problems or the skipped list
NOT_USABLE = [
    ":7: invalid JSON",
    "id=no-rejected",
    "id=wrong-type",
    "id=blank",
    "id=same",
    ":12: duplicate record id 'good-1'",
    "record missing-image:",
    "record truncated-image:",
    "record huge-image:",
    "id=two-markers",
    "record too-long:",
    "id=null-image",
    ":19: not valid UTF-8",
]


def test_validate_reports_every_problem(tmp_path, hostile, monkeypatch):
    from src.validate import report, validate

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # makes huge.png a decompression bomb
    path, img = hostile
    cfg = compose_config(
        "validate",
        ["data=jsonl", f"data.path={path}", f"data.image_root={img}", "data.val_fraction=0", "data.max_length=512"],
        tmp_path / "run",
    )
    summary = validate(cfg)
    assert "fatal" not in summary, summary.get("fatal")
    problems = "\n".join(summary["problems"])
    for message, where in EXPECTED.items():
        assert any(message in p and where in p for p in summary["problems"]), (message, problems)
    assert any("cannot read image" in p and "huge-image" in p for p in summary["problems"])
    # good, converted-mode and marker-less records are usable; the long one is a counted skip
    assert summary["usable"] == 6 and summary["skipped_by_reason"] == {"prompt_too_long": 1}
    assert summary["rejected_records"] == 12 and not summary["ok"]
    groups = {g["reason"]: g["first"] for g in summary["problems_by_reason"]}  # each record once, by what is wrong
    assert sum(g["records"] for g in summary["problems_by_reason"]) == 12
    assert groups["invalid JSON (Expecting value at column 31)"] == ["line 7"] and ["blank"] in groups.values()
    assert groups[f"image file not found under {img} (data.image_root={img}). {MISSING_ADVICE}"] == ["missing-image"]
    counts = "the prompt holds 2 <image> markers but 1 picture; give one marker per picture, in the pictures' order"
    assert groups[counts] == ["two-markers"]
    text = report(summary, show=50)
    assert "NOT OK" in text and "usable:            6" in text


def _console_counts(text):
    """The figures `report` prints, by label."""
    labels = {"records in file": "records_in_file", "records read": "records_read", "usable": "usable"}
    labels |= {"rejected (errors)": "rejected_records", "skipped": "skipped", "stand-in images": "stand_in_images"}
    out = {}
    for line in text.splitlines():
        label, _, value = line.partition(":")
        if label in labels and value.strip():
            out[labels[label]] = int(value.split()[0])
    return out


@pytest.mark.parametrize("missing, usable, stand_ins", [("error", 6, 0), ("render", 7, 1)])
def test_every_record_is_counted_once(tmp_path, hostile, monkeypatch, missing, usable, stand_ins):
    """records in the file = usable + rejected + skipped, each record named once, console == validation.json."""
    from src.validate import report, validate

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    path, img = hostile
    overrides = ["data=jsonl", f"data.path={path}", f"data.image_root={img}", "data.val_fraction=0"]
    overrides += ["data.max_length=512", f"data.missing_images={missing}"]
    summary = validate(compose_config("validate", overrides, tmp_path / "run"))
    assert summary["records_in_file"] == summary["records_read"] == 19 and summary["not_selected"] == {}
    assert summary["usable"] == usable and summary["stand_in_images"] == stand_ins
    assert summary["rejected_records"] == 19 - usable - 1 and summary["skipped"] == 1
    named = summary["problems"] + summary["skipped_records"]
    assert len(named) == summary["rejected_records"] + summary["skipped"]
    expected = [n for n in NOT_USABLE if missing == "error" or n != "record missing-image:"]
    for name in expected:
        assert sum(name in line for line in named) == 1, (name, named)
    assert len(named) == len(expected)
    counts = _console_counts(report(summary, show=50))
    assert counts == {k: summary[k] for k in counts} and len(counts) == 6
    assert counts["records_read"] == counts["usable"] + counts["rejected_records"] + counts["skipped"]


def test_selected_records_and_a_bookkeeping_bug(tmp_path, tiny):
    """ids_file / max_records leave records out on purpose: counted apart; a mismatch raises, never prints."""
    from src.data.data_settings import ReaderSettings
    from src.data.datamodule import PreferenceDataModule

    lines = [rec(f"r{i}", group=f"g{i}") for i in range(6)] + ['{"id": "broken"']
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "ids.txt").write_text("r0\nr1\nr2\nr3\n")
    reader = ReaderSettings(
        str(tmp_path / "d.jsonl"),
        missing_images="render",
        ids_file=str(tmp_path / "ids.txt"),
        max_records=3,
        val_fraction=0.0,
        on_error="skip",
    )
    dm = PreferenceDataModule(reader, processor=tiny[1])
    dm.setup("fit")
    summary = dm.summary()
    assert summary["records_in_file"] == 7 and summary["not_selected"] == {"ids_file": 2, "max_records": 1}
    assert summary["records_read"] == 4 and summary["usable"] == 3 and summary["rejected_records"] == 1
    assert summary["stand_in_images"] == 3
    dm.records_in_file += 1
    with pytest.raises(RuntimeError, match="does not add up: 5 records read != 3 usable"):
        dm.summary()


def test_validate_exit_codes_and_strict(tmp_path):
    good = tmp_path / "good.jsonl"
    long = rec("long", messages=[{"role": "user", "content": "<image>\n" + "word " * 3000}])
    good.write_text("\n".join([rec("a"), rec("b"), long]) + "\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")

    def run(*extra):
        return run_entry(
            "validate.py",
            "data=jsonl",
            f"data.path={good}",
            f"data.image_root={tmp_path}",
            "data.val_fraction=0",
            f"hydra.run.dir={tmp_path}/v",
            *extra,
            timeout=300,
        )

    out = run()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "usable:            2" in out.stdout and "prompt_too_long" in out.stdout
    assert run("strict=true").returncode == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = run_entry("validate.py", "data=jsonl", f"data.path={empty}", f"hydra.run.dir={tmp_path}/e", timeout=300)
    assert out.returncode == 1 and "no records" in out.stdout


def test_training_skips_and_counts_or_stops_with_a_clear_message(tmp_path, hostile, monkeypatch):
    from tests.test_train import run_train

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    path, img = hostile
    common = [
        "data=jsonl",
        f"data.path={path}",
        f"data.image_root={img}",
        "data.val_fraction=0",
        "data.max_length=512",
        "trainer.max_steps=1",
        "logger=csv",
        "objective=dpo",
    ]
    _, metrics = run_train(tmp_path, [*common, "data.on_error=skip"])
    summary = json.loads((tmp_path / "run/run_summary.json").read_text())
    assert summary["data"]["rejected_records"] == 12 and summary["data"]["train"]["encoded"] == 6
    data = json.loads((tmp_path / "run/data_summary.json").read_text())
    assert data["records_in_file"] == data["records_read"] == 19
    assert (data["usable"], data["rejected_records"], data["skipped"]) == (6, 12, 1)
    out = run_entry("train.py", *common, f"hydra.run.dir={tmp_path}/r2", timeout=300)
    assert out.returncode == 2 and "data error" in out.stdout + out.stderr and "Traceback" not in out.stderr


def test_duplicate_ids_across_train_and_validation_files(tmp_path):
    from src.data.data_settings import ReaderSettings
    from src.data.datamodule import PreferenceDataModule
    from src.data.records import DataError
    from src.models.tiny import build_tiny_llava

    _, processor = build_tiny_llava()
    (tmp_path / "train.jsonl").write_text(rec("a") + "\n" + rec("b") + "\n")
    (tmp_path / "val.jsonl").write_text(rec("b") + "\n" + rec("c") + "\n")
    kwargs = {
        "path": str(tmp_path / "train.jsonl"),
        "val_path": str(tmp_path / "val.jsonl"),
        "missing_images": "render",
    }
    with pytest.raises(DataError, match=r"val.jsonl: record id 'b' is also in .*train.jsonl"):
        PreferenceDataModule(ReaderSettings(**kwargs), processor=processor).load_records()
    dm = PreferenceDataModule(ReaderSettings(**kwargs, on_error="skip"), processor=processor)
    assert [r.id for r in dm.load_records()] == ["a", "b", "c"] and len(dm.problems) == 1


def test_validate_names_missing_images_grouped(tmp_path):
    """Every image missing: one line per reason with a count and the root, no max_length advice, all in the JSON."""
    records = [
        {
            "id": str(i),
            "question": "USER: <image>\nWho is this? ASSISTANT:",
            "image": f"photo_{i}.jpg",
            "chosen": "I can't identify people from photos.",
            "rejected": f"That is person number {i}.",
            "text_prompt": f"Who is person {i}?",
        }
        for i in range(12)
    ]
    path = tmp_path / "mmsafe.json"
    path.write_text(json.dumps(records))
    images = tmp_path / "no_images_here"
    out = run_entry(
        "validate.py",
        "data=mmsafe_po",
        f"data.path={path}",
        f"data.image_root={images}",
        f"hydra.run.dir={tmp_path}/v",
        timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert f"image file not found under {images}" in text and "data.missing_images=render" in text
    assert "max_length" not in text
    lines = [line for line in text.splitlines() if "image file not found" in line]
    assert 1 <= len(lines) <= 3, lines  # grouped, not one line per record
    assert any("12 records" in line for line in lines), lines
    report_path = tmp_path / "v" / "validation.json"
    assert out.stdout.strip().splitlines()[-1] == f"validation report: {report_path}"
    summary = json.loads(report_path.read_text())
    assert len(summary["problems"]) == 12 and all("image file not found" in p for p in summary["problems"])
    assert {p.split(":")[0] for p in summary["problems"]} == {f"record {i}" for i in range(12)}
    assert summary["problems_by_reason"][0]["records"] == 12 and not summary["ok"]


def test_nothing_usable_names_the_reasons(tmp_path, tiny):
    """A split with no usable record stops with its reasons and counts; max_length is advised only for length skips."""
    from src.data.datamodule import PreferenceDataModule

    (tmp_path / "d.jsonl").write_text("\n".join(rec(f"r{i}", image=f"gone{i}.png") for i in range(4)) + "\n")
    data = {"path": str(tmp_path / "d.jsonl"), "val_fraction": 0.0, "on_error": "skip"}
    dm = PreferenceDataModule.from_config(data | {"image_root": str(tmp_path / "img")}, processor=tiny[1])
    with pytest.raises(
        ValueError, match=r"none of the 4 records is usable: 4 records: image file not found under"
    ) as e:
        dm.setup("fit")
    assert "max_length" not in str(e.value)
    assert dm.summary()["problems_by_reason"] == [
        {"reason": dm.problem_groups()[0]["reason"], "records": 4, "first": ["r0", "r1", "r2", "r3"]}
    ]
    dm = PreferenceDataModule.from_config(data | {"missing_images": "render", "max_length": 8}, processor=tiny[1])
    with pytest.raises(ValueError, match=r"4 records skipped: prompt_too_long .*; raise data.max_length \(now 8\)"):
        dm.setup("fit")
