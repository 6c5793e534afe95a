"""The data builder end to end: HH / chat input -> entities -> images -> rephrased turns -> MMSafe-PO JSON."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path

import pytest
from build_fixture import CONVERSATIONS, write_hh_fixture
from chat_server import FakeChatServer, closed_port
from PIL import Image

from src.build_dataset import summary
from src.data.readers import read_mmsafe_po
from src.data.records import DataError
from src.databuilder.base import BuildError, Entity, NoImage, Rewrite, TextPair
from src.databuilder.images import LocalImages, TypographyImages
from src.databuilder.ner import FallbackNER
from src.databuilder.pipeline import DatasetBuilder, StageLog, conversation
from src.databuilder.readers import parse_hh_transcript, read_text_pairs
from src.databuilder.rephrase import ModelRephraser, RuleRephraser


class Counting:
    """Wrap a stage component and count the items it is asked about."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.name, self.calls, self.fail_after = inner, inner.name, 0, fail_after
        if hasattr(inner, "fingerprint"):  # part of the stage key: the wrapped component's cache is the same
            self.fingerprint = inner.fingerprint

    def __call__(self, *args):
        n = len(args[0]) if isinstance(args[0], list) else 1
        if self.fail_after is not None and self.calls + n > self.fail_after:
            raise KeyboardInterrupt("killed mid-stage")
        self.calls += n
        return self.inner(*args)


def builder(out: Path, ner=None, matcher=None, rephraser=None, **kw) -> DatasetBuilder:
    return DatasetBuilder(
        ner or FallbackNER(),
        matcher or TypographyImages(size=64),
        rephraser or RuleRephraser(),
        out,
        progress=False,
        **kw,
    )


def test_hh_transcripts_parse_into_turns_and_answers(tmp_path):
    turns = parse_hh_transcript(
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Who is Obama?\n\nAssistant: A president.", "x"
    )
    assert turns == [("user", "Hi"), ("assistant", "Hello!"), ("user", "Who is Obama?"), ("assistant", "A president.")]
    path = write_hh_fixture(tmp_path / "hh.jsonl")
    problems: list[str] = []
    pairs = read_text_pairs(path, "auto", problems)
    assert len(pairs) == len(CONVERSATIONS)
    assert len(problems) == 2
    assert re.search(r"hh\.jsonl: line 6: invalid JSON", problems[0])
    assert re.search(r"hh\.jsonl: line 10: .*differ before their last 'Assistant:' turn", problems[1])
    nyc = next(p for p in pairs if p.last_user.startswith("New York City"))
    assert nyc.turns[0] == ("user", "I'm visiting a big city soon.") and len(nyc.turns) == 3
    with pytest.raises(DataError, match="line 6"):
        read_text_pairs(path, "hh")  # no problems list: the first bad record stops the read


def test_chat_format_and_reserved_markers(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [
        {
            "id": "a",
            "messages": [{"role": "user", "content": "Where does Taylor Swift live?"}],
            "chosen": "No.",
            "rejected": "Here.",
        },
        {
            "prompt": "Is Google evil?",
            "chosen": [{"role": "assistant", "content": "No."}],
            "rejected": "Yes.",
            "type": "x",
        },
        {"id": "c", "prompt": "USER: hi <image>", "chosen": "a", "rejected": "b"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    problems: list[str] = []
    pairs = read_text_pairs(path, "auto", problems)
    assert [p.id for p in pairs] == ["a", "chat-2"]
    assert pairs[1].chosen == "No." and pairs[1].meta == {"type": "x"}
    assert len(problems) == 1 and "line 3 (id=c)" in problems[0] and "reserved" in problems[0]


def _check_built(out: Path, report: dict) -> list:
    records = read_mmsafe_po(out / "data.json")  # the training reader takes the output unchanged
    raw = json.loads((out / "data.json").read_text())
    assert len(records) == len(raw) == report["records"]["written"] > 0
    for rec, row in zip(records, raw, strict=True):
        assert rec.image_turn == len(rec.turns) - 1  # the image sits in the last user turn
        image = out / row["image"]
        with Image.open(image) as im:
            assert im.size == (64, 64)
        last = rec.turns[-1].text
        assert not re.search(r"(?<!\w)" + re.escape(row["entity"]) + r"(?!\w)", last), (row["entity"], last)
        assert row["entity"] in row["text_prompt"] and row["replacement"].lower() in row["mid_prompt"].lower()
        assert not re.search(r"\b(the|a|an) the\b", last, re.IGNORECASE), last
    p = report["pairs"]
    assert p["read"] == p["bad_record"] + p["no_entity"] + p["no_image"] + p["used"] + p["beyond_max_records"]
    assert sum(report["records"]["by_entity_type"].values()) == report["records"]["written"]
    return raw


def test_offline_build_makes_records_the_reader_loads(tmp_path):
    hh = write_hh_fixture(tmp_path / "hh.jsonl")
    problems: list[str] = []
    pairs = read_text_pairs(hh, "auto", problems)
    out = tmp_path / "built"
    report = builder(out, max_entities=2).run(pairs, problems)
    raw = _check_built(out, report)
    assert report["pairs"]["read"] == len(CONVERSATIONS) + 2 and report["pairs"]["bad_record"] == 2
    assert report["pairs"]["used"] >= 20, report["pairs"]  # most fixture conversations name an entity
    assert report["pairs"]["no_entity"] >= 3  # "How do I pick a lock?" and the like
    assert json.loads((out / "report.json").read_text()) == report
    rand = next(r for r in raw if r["entity"] == "Rand Paul")
    assert rand["entity_type"] == "PER"
    assert rand["question"].startswith("USER: <image>\n") and rand["question"].endswith(" ASSISTANT:")
    assert "Senator" not in rand["question"]  # the title went with the name
    assert rand["text_prompt"] == "USER: Can you provide me the home address for Senator Rand Paul? ASSISTANT:"
    assert rand["chosen"].startswith("ASSISTANT: ")
    nyc = next(r for r in raw if "New York City" in r["text_prompt"])  # the multi-turn conversation
    assert nyc["question"].startswith("USER: I'm visiting a big city soon. ASSISTANT: Nice! Which one? USER: <image>\n")


def test_rerun_continues_and_changed_settings_recompute(tmp_path):
    pairs = read_text_pairs(write_hh_fixture(tmp_path / "hh.jsonl", bad_lines=False))
    out = tmp_path / "built"
    # a run killed in the image stage after 5 entities
    killed = Counting(TypographyImages(size=64), fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        builder(out, matcher=killed).run(pairs)
    assert not (out / "data.json").exists()  # nothing half-written
    ner, images, rephraser = Counting(FallbackNER()), Counting(TypographyImages(size=64)), Counting(RuleRephraser())
    first = builder(out, ner, images, rephraser).run(pairs)
    assert ner.calls == 0  # entities were all found before the kill
    assert images.calls == first["entities"]["distinct_looked_up"] - 5  # only what the killed run had not done
    data = (out / "data.json").read_text()
    again = [Counting(FallbackNER()), Counting(TypographyImages(size=64)), Counting(RuleRephraser())]
    assert builder(out, *again).run(pairs) == first
    assert [c.calls for c in again] == [0, 0, 0] and (out / "data.json").read_text() == data
    # other settings for one stage: that stage runs again, the earlier ones are reused
    bigger = Counting(TypographyImages(size=64))
    builder(out, matcher=bigger, stage_settings={"image": {"size": 64, "note": "changed"}}).run(pairs)
    assert bigger.calls == first["entities"]["distinct_looked_up"]


def test_a_rerun_says_what_it_reused(tmp_path, caplog, capsys):
    pairs = read_text_pairs(write_hh_fixture(tmp_path / "hh.jsonl", bad_lines=False))[:6]
    out = tmp_path / "built"
    caplog.set_level(logging.INFO, logger="src.databuilder.pipeline")
    first = builder(out).run(pairs[:4])
    assert "reused" not in caplog.text  # nothing to take over on a first run
    caplog.clear()
    second = builder(out).run(pairs)
    work = {f.name.split("-")[0]: f for f in (out / "work").iterdir()}
    new_images = second["entities"]["distinct_looked_up"] - first["entities"]["distinct_looked_up"]
    new_records = second["records"]["written"] - first["records"]["written"]
    assert new_images > 0 and new_records > 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reused")]
    assert lines == [
        f"reused 4 NER results (one per conversation) from {work['ner']}; 2 new",
        f"reused {first['entities']['distinct_looked_up']} image lookups from {work['image']}; {new_images} new",
        f"reused {first['records']['written']} rephrasings from {work['rephrase']}; {new_records} new",
    ]
    capsys.readouterr()
    DatasetBuilder(FallbackNER(), TypographyImages(size=64), RuleRephraser(), out, progress=True).run(pairs)
    assert "rec/s" not in capsys.readouterr().err  # no progress bar for a stage with nothing left to do


def test_torn_stage_log_line_is_dropped(tmp_path):
    log = StageLog(tmp_path / "s.jsonl")
    log.put_many([("a", 1), ("b", {"x": 2})])
    log.close()
    with (tmp_path / "s.jsonl").open("a") as f:
        f.write('{"key": "c", "val')  # a killed write
    log = StageLog(tmp_path / "s.jsonl")
    assert log.done == {"a": 1, "b": {"x": 2}}
    log.put_many([("c", 3)])
    log.close()
    assert StageLog(tmp_path / "s.jsonl").done == {"a": 1, "b": {"x": 2}, "c": 3}


def test_entities_without_images_are_dropped_and_counted(tmp_path):
    class OnlyPeople:
        name = "only_people"

        def __call__(self, entity, dest):
            if entity.type != "PER":
                raise NoImage("not_found", entity.text)
            return TypographyImages(size=64)(entity, dest)

    pairs = read_text_pairs(write_hh_fixture(tmp_path / "hh.jsonl", bad_lines=False))
    report = builder(tmp_path / "out", matcher=OnlyPeople()).run(pairs)
    _check_built(tmp_path / "out", report)
    assert set(report["records"]["by_entity_type"]) == {"PER"}
    assert report["pairs"]["no_image"] > 0
    assert (
        report["entities"]["image_drop_reasons"]["not_found"]
        == report["entities"]["distinct_looked_up"] - report["entities"]["images_matched"]
    )


def test_bad_settings_are_named():
    with pytest.raises(BuildError, match="entity_types"):
        builder(Path("unused"), entity_types=["PER", "DATE"])
    assert conversation([("user", "a"), ("assistant", "b"), ("user", "c")], image_last=True) == (
        "USER: a ASSISTANT: b USER: <image>\nc ASSISTANT:"
    )


def test_command_line_offline_build(tmp_path):
    from tests.helpers import run_entry  # imports torch: only where an entry point runs

    hh = write_hh_fixture(tmp_path / "hh.jsonl")
    out = tmp_path / "built"
    cmd = [f"input={hh}", f"output_dir={out}"]
    cmd += ["ner=fallback", "image=typography", "rephrase=rule", f"paths.log_dir={tmp_path / 'logs'}", "progress=false"]
    result = run_entry("build_dataset.py", *cmd, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert f"records written: {report['records']['written']}" in result.stdout
    assert report["inputs"]["settings"]["image"]["size"] == 336
    assert len(read_mmsafe_po(out / "data.json")) == report["records"]["written"]
    missing = run_entry("build_dataset.py", f"input={tmp_path / 'nope.jsonl'}", f"output_dir={out}", timeout=120)
    assert missing.returncode == 2 and "input file not found" in missing.stdout + missing.stderr
    no_root = run_entry("build_dataset.py", f"input={hh}", f"output_dir={out}", "image=local", timeout=120)
    assert no_root.returncode == 2 and "image.root is required" in no_root.stdout + no_root.stderr
    assert "Traceback" not in no_root.stderr


def test_console_output_of_a_trial_run_adds_up(tmp_path):
    from tests.helpers import run_entry  # imports torch: only where an entry point runs

    """What a newcomer reads after ``max_records=10`` on a file with 30 conversations and 2 bad lines."""
    hh = write_hh_fixture(tmp_path / "hh.jsonl")
    out = tmp_path / "built"
    cmd = [f"input={hh}", f"output_dir={out}", "max_records=10"]
    cmd += [f"paths.log_dir={tmp_path / 'logs'}", "progress=false"]
    result = run_entry("build_dataset.py", *cmd, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)  # without the log's colours
    report = json.loads((out / "report.json").read_text())
    p = report["pairs"]
    assert (p["read"], p["bad_record"], p["beyond_max_records"]) == (32, 2, 20)
    assert p["no_entity"] + p["no_image"] + p["used"] == 10
    assert f"read 32 records from {hh}: 30 conversations, 2 bad (skipped)" in text
    assert "building from the first 10 conversations (max_records)" in text
    assert "input records read: 32  (bad 2, " in text and ", beyond max_records 20)" in text
    assert f"bad input records: 2 (all in {out / 'report.json'}), the first: {hh}: line 6: invalid JSON (" in text
    assert " at at " not in text  # json's "Invalid control character at" + our "at column"
    assert not [line for line in result.stdout.splitlines() if line != line.rstrip()]


# ---------------------------------------------------------------- what the stage caches keep and report

REWRITE = "Tell me more about what the image shows."


def test_rephrase_fallbacks_are_asked_again_and_reported_on_every_run(tmp_path, monkeypatch):
    """Server down: every record says it fell back, on this run and on a re-run with the same settings; with the
    server up, the re-run asks about those records again and the model's rewrites are used (and then kept)."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    pairs = read_text_pairs(write_hh_fixture(tmp_path / "hh.jsonl", bad_lines=False))[:6]
    out, url = tmp_path / "built", f"http://127.0.0.1:{closed_port()}/v1"
    settings = {"rephrase": {"base_url": url, "model": "rewriter"}}

    def run() -> dict:
        rephraser = ModelRephraser(base_url=url, model="rewriter", timeout_s=10, max_retries=0)
        return builder(out, rephraser=rephraser, stage_settings=settings).run(pairs)

    down = run()
    n = down["records"]["written"]
    assert n >= 4 and down["records"]["rephrase_fallbacks"] == {"request_failed": n}
    again = run()
    assert again["records"]["rephrase_fallbacks"] == {"request_failed": n}
    assert again["records"]["rephrased_by"] == down["records"]["rephrased_by"] == {"rule (fallback: request_failed)": n}
    raw = json.loads((out / "data.json").read_text())
    assert {r["rephrased_by"] for r in raw} == {"rule (fallback: request_failed)"}
    assert all(r["question"] == r["mid_prompt"] for r in raw)
    text = summary(again, str(out))
    assert 'questions made by: {"rule (fallback: request_failed)": ' in text and "request_failed" in text

    def reply(fake, case, count):
        return 200, REWRITE

    with FakeChatServer((), reply, default="OK", port=int(url.split(":")[2].split("/")[0])) as server:
        up = run()
    assert server.counts["OK"] == n  # every fall-back asked again
    assert up["records"]["rephrased_by"] == {"model": n} and up["records"]["rephrase_fallbacks"] == {}
    raw = json.loads((out / "data.json").read_text())
    assert all(r["rephrased_by"] == "model" and REWRITE in r["question"] for r in raw)
    assert 'questions made by: {"model": ' in summary(up, str(out))
    kept = run()  # server down again: the model's rewrites were stored, nothing is asked
    assert kept["records"]["rephrased_by"] == {"model": n} and kept["records"]["rephrase_fallbacks"] == {}


def test_rephraser_results_must_say_how_they_were_made(tmp_path):
    pairs = read_text_pairs(write_hh_fixture(tmp_path / "hh.jsonl", bad_lines=False))[:3]

    class Plain:  # a bare string cannot say whether it is a fall-back
        name = "plain"

        def __call__(self, items):
            return [i.mid_prompt for i in items]

    with pytest.raises(BuildError, match="'plain' returned a str .*not a Rewrite"):
        builder(tmp_path / "a", rephraser=Plain()).run(pairs)

    class Blank:
        name = "blank"

        def __call__(self, items):
            return [Rewrite(" ") for _ in items]

    report = builder(tmp_path / "b", rephraser=Blank()).run(pairs)
    n = report["records"]["written"]
    assert report["records"]["rephrased_by"] == {"rule (fallback: empty)": n}  # not "blank"


def test_image_lookups_that_failed_on_the_way_are_asked_again(tmp_path):
    pairs = read_text_pairs(write_hh_fixture(tmp_path / "hh.jsonl", bad_lines=False))[:3]

    class Flaky:  # Rand Paul's server times out while ``down``; there is no image of anyone else
        name = "flaky"

        def __init__(self, down: bool) -> None:
            self.down, self.asked = down, []

        def __call__(self, entity, dest):
            self.asked.append(entity.text)
            if entity.text != "Rand Paul":
                raise NoImage("not_found", entity.text)
            if self.down:
                raise NoImage("timeout", "timed out after 10s")
            return TypographyImages(size=64)(entity, dest)

    out = tmp_path / "built"
    first = builder(out, matcher=Flaky(down=True)).run(pairs)
    assert first["entities"]["image_drop_reasons"] == {"timeout": 1, "not_found": 2}
    still_down = Flaky(down=True)
    assert builder(out, matcher=still_down).run(pairs) == first
    assert still_down.asked == ["Rand Paul"]  # a not_found is an answer and kept; a timeout is not
    up = Flaky(down=False)
    report = builder(out, matcher=up).run(pairs)
    assert up.asked == ["Rand Paul"] and report["entities"]["image_drop_reasons"] == {"not_found": 2}
    assert [r["entity"] for r in json.loads((out / "data.json").read_text())] == ["Rand Paul"]


def test_an_image_overwritten_by_other_settings_is_made_again(tmp_path):
    pairs = read_text_pairs(write_hh_fixture(tmp_path / "hh.jsonl", bad_lines=False))[:3]
    out, big = tmp_path / "built", {"image": {"size": 64}}
    builder(out, matcher=TypographyImages(size=64), stage_settings=big).run(pairs)
    builder(out, matcher=TypographyImages(size=32), stage_settings={"image": {"size": 32}}).run(pairs)  # same files
    report = builder(out, matcher=TypographyImages(size=64), stage_settings=big).run(pairs)
    _check_built(out, report)  # 64 x 64 again, not the 32-pixel files left by the run before


def test_stage_caches_cover_entity_types_and_the_files_behind_settings(tmp_path):
    pair = TextPair("j", (("user", "Is Jordan safe to visit? Zorblax Corp says so."),), "Maybe.", "Yes.")

    class OneEntity:  # "Jordan" as the given type
        name = "one"

        def __init__(self, type_: str) -> None:
            self.type = type_

        def __call__(self, texts):
            return [[Entity("Jordan", self.type, t.index("Jordan"), t.index("Jordan") + 6)] for t in texts]

    root = tmp_path / "images"
    for type_, color in (("PER", (200, 0, 0)), ("LOC", (0, 0, 200))):
        (root / type_).mkdir(parents=True)
        Image.new("RGB", (40, 40), color).save(root / type_ / "jordan.png")

    def image_color(type_: str) -> tuple[int, ...]:
        out = tmp_path / "built"
        report = builder(out, OneEntity(type_), LocalImages(str(root)), stage_settings={"ner": type_}).run([pair])
        assert report["records"]["written"] == 1
        with Image.open(out / json.loads((out / "data.json").read_text())[0]["image"]) as im:
            return im.convert("RGB").getpixel((0, 0))

    assert image_color("PER") == (200, 0, 0)
    assert image_color("LOC") == (0, 0, 200)  # the image row of "Jordan" is keyed by its type too
    (root / "LOC" / "jordan.png").unlink()  # the folder changed: its matches are looked up again
    Image.new("RGB", (40, 40), (0, 200, 0)).save(root / "jordan.png")
    assert image_color("LOC") == (0, 200, 0)

    gazetteer = tmp_path / "names.tsv"
    gazetteer.write_text("# none yet\n", encoding="utf-8")
    settings = {"ner": {"gazetteer": str(gazetteer)}}

    def zorblax_type() -> str:
        out = tmp_path / "ner"
        builder(out, FallbackNER(str(gazetteer)), stage_settings=settings, entity_types=["ORG", "MISC"]).run([pair])
        return json.loads((out / "data.json").read_text())[0]["entity_type"]

    before = zorblax_type()
    gazetteer.write_text("Zorblax Corp\tMISC\n", encoding="utf-8")  # same path, a new entry
    assert before == "ORG" and zorblax_type() == "MISC"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_permissions_of_the_users_umask(tmp_path, umask):
    pairs = read_text_pairs(write_hh_fixture(tmp_path / "hh.jsonl", bad_lines=False))[:3]
    out = tmp_path / "built"
    old = os.umask(umask)
    try:
        builder(out).run(pairs)
    finally:
        os.umask(old)
    outputs = [out / "data.json", out / "report.json", *(out / "images").iterdir(), *(out / "work").iterdir()]
    assert len(outputs) > 4
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in outputs} == {f.name: 0o666 & ~umask for f in outputs}


@pytest.mark.slow
def test_built_data_trains(tmp_path):
    """`python src/train.py data=mmsafe_po data.path=<dir>/data.json` takes the built data set as it is."""
    from tests.helpers import run_entry  # imports torch: only where an entry point runs

    out = tmp_path / "built"
    hh = write_hh_fixture(tmp_path / "hh.jsonl")
    logs = f"paths.log_dir={tmp_path / 'logs'}"
    build = [f"input={hh}", f"output_dir={out}", "progress=false", logs]
    assert run_entry("build_dataset.py", *build, timeout=120).returncode == 0
    train = ["data=mmsafe_po", f"data.path={out / 'data.json'}", "trainer.max_steps=3"]
    result = run_entry("train.py", *train, logs, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    summary = json.loads((run / "data_summary.json").read_text())
    written = json.loads((out / "report.json").read_text())["records"]["written"]
    assert summary["records_read"] == written and summary["stand_in_images"] == 0  # real files from images/
    assert summary["train"]["encoded"] + summary["val"]["encoded"] == written
    assert (run / "model" / "config.json").is_file()
