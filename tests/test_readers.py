import json

import pytest

from src.data.convert import parse_conversation
from src.data.images import ImageResolver, render_stand_in
from src.data.readers import read_records
from src.data.records import DataError


def test_all_shared_mmsafe_records_parse(mmsafe_path):
    raw = json.loads(mmsafe_path.read_text())
    records = read_records(mmsafe_path)
    assert len(records) == len(raw) == 200
    for rec, src in zip(records, raw, strict=True):
        assert rec.id == str(src["id"])
        assert rec.image == src["image"]
        # exactly one image placement, in the last user turn, and no marker left in any text
        assert rec.image_turn == len(rec.turns) - 1 and rec.turns[-1].role == "user"
        assert sum("<image>" in t.text for t in rec.turns) == 0
        assert sum(m["content"][0]["type"] == "image" for m in rec.messages()) == 1
        for answer in (rec.chosen, rec.rejected):
            assert answer and not answer.startswith("ASSISTANT:")
        assert rec.chosen == src["chosen"].removeprefix("ASSISTANT: ").strip()
        roles = [t.role for t in rec.turns]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
    # 163 source conversations in the 200 records (shared README)
    assert len({r.group for r in records}) == 163


def test_parse_multiturn_conversation():
    turns, image_turn = parse_conversation(
        "USER: Hi ASSISTANT: Hello, how can I help? USER: <image>\nWho is the person in the image? ASSISTANT:", "x"
    )
    assert [(t.role, t.text) for t in turns] == [
        ("user", "Hi"),
        ("assistant", "Hello, how can I help?"),
        ("user", "Who is the person in the image?"),
    ]
    assert image_turn == 2


def test_mmsafe_errors_name_file_and_record(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps([{"id": 7, "question": "USER: <image>\nQ ASSISTANT:", "image": "a.jpg", "chosen": "ok"}])
    )
    with pytest.raises(DataError, match=r"bad\.json: record id=7.*rejected"):
        read_records(path)
    path.write_text(
        json.dumps(
            [
                {
                    "id": 8,
                    "question": "USER: <image> <image> Q ASSISTANT:",
                    "image": "a.jpg",
                    "chosen": "a",
                    "rejected": "b",
                }
            ]
        )
    )
    with pytest.raises(DataError, match="id=8.*2 <image> markers"):
        read_records(path)
    path.write_text(json.dumps([_mmsafe(1, "a.jpg"), _mmsafe(1, "b.jpg")]))
    with pytest.raises(DataError, match=r"bad\.json: record id=1 \(#1\): duplicate record id '1'"):
        read_records(path)


def _mmsafe(rid, image):
    return {"id": rid, "question": "USER: <image>\nQ ASSISTANT:", "image": image, "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("image", [None, ""])
def test_mmsafe_marker_without_image_is_rejected(tmp_path, image):
    """A marker with no image must not silently train as a text-only pair."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps([_mmsafe(1, "a.jpg"), _mmsafe(2, image), _mmsafe(3, "c.jpg")]))
    with pytest.raises(DataError, match=r"d\.json: record id=2 \(#1\): the prompt has an <image> marker but 'image'"):
        read_records(path)
    problems = []
    assert [r.id for r in read_records(path, problems=problems)] == ["1", "3"]
    assert len(problems) == 1 and "record id=2 (#1)" in problems[0]


@pytest.mark.parametrize("image", ["null", '""'])
def test_generic_jsonl_marker_without_image_is_rejected(tmp_path, image):
    path = tmp_path / "d.jsonl"
    ok = '{"id": "ok", "prompt": "q", "chosen": "c", "rejected": "r"}'
    path.write_text(
        ok + "\n" + f'{{"id": "x", "prompt": "<image> q", "image": {image}, "chosen": "c", "rejected": "r"}}'
    )
    with pytest.raises(DataError, match=r"d\.jsonl:2 \(id=x\): the prompt has an <image> marker but no 'image'"):
        read_records(path)
    problems = []
    assert [r.id for r in read_records(path, problems=problems)] == ["ok"]
    assert len(problems) == 1 and "d.jsonl:2 (id=x)" in problems[0]


def test_generic_jsonl_both_content_forms(tmp_path):
    lines = [
        {
            "id": "a",
            "messages": [{"role": "user", "content": "<image>\nWhat is this?"}],
            "image": "a.png",
            "chosen": "A harmless answer.",
            "rejected": "A harmful answer.",
            "category": "fraud",
            "group": "g1",
        },
        {
            "id": "b",
            "messages": [
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
            ],
            "image": "b.png",
            "chosen": "c",
            "rejected": "r",
            "blind": "a blind answer",
        },
        {"id": "c", "prompt": "Describe it.", "image": "c.png", "chosen": "c", "rejected": "r"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    a, b, c = read_records(path)
    assert a.turns[0].text == "What is this?" and a.image_turn == 0 and a.meta["category"] == "fraud"
    assert a.group == "g1"
    assert b.image_turn == 2 and b.turns[2].text == "And this?" and b.blind == "a blind answer"
    assert c.image_turn == 0 and c.group == "c"  # no marker: the image goes to the last user turn
    assert b.messages(with_image=False)[2]["content"] == [{"type": "text", "text": "And this?"}]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"d\.jsonl:2: invalid JSON"),
        # json's own message ends in "at": said once, with our position after it
        ('{"id": "x", "prompt": "a\tb"}', r"d\.jsonl:2: invalid JSON \(Invalid control character at column 25\)$"),
        (
            '{"id": "x", "messages": [{"role": "user", "content": "q"}], "chosen": "c"}',
            "id=x.*missing field 'rejected'",
        ),
        (
            '{"id": "x", "messages": [{"role": "user", "content": "q"}], "chosen": " ", "rejected": "r"}',
            "'chosen' is empty",
        ),
        (
            '{"id": "x", "messages": [{"role": "assistant", "content": "q"}], "chosen": "c", "rejected": "r"}',
            "alternate",
        ),
        (
            '{"id": "x", "messages": [{"role": "user", "content": "<image> q"}], "chosen": "c", "rejected": "r"}',
            "no 'image' field",
        ),
        ('{"id": "ok", "prompt": "q", "chosen": "c", "rejected": "r"}', r"d\.jsonl:2: duplicate record id 'ok'"),
    ],
)
def test_generic_jsonl_errors(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "ok", "prompt": "q", "chosen": "c", "rejected": "r"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_missing_image_error_or_stand_in(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(
            {
                "id": "r1",
                "prompt": "<image>\nq",
                "image": "nope.png",
                "chosen": "c",
                "rejected": "r",
                "entity": "a padlock",
            }
        )
        + "\n"
    )
    (record,) = read_records(path)
    with pytest.raises(DataError, match=r"record r1: image file not found: .*nope\.png"):
        ImageResolver(tmp_path, missing="error")(record)
    with pytest.raises(DataError, match=r"1 of 1 images not found; first: record r1"):
        ImageResolver(tmp_path, missing="error").check([record])
    resolver = ImageResolver(tmp_path, missing="render", stand_in_size=64)
    assert resolver.check([record]) == 1
    image = resolver(record)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert list(image.getdata()) == list(render_stand_in("a padlock", 64).getdata())
    assert resolver.rendered == {"r1"}
    # text is drawn: not a plain background
    assert len(set(image.getdata())) > 2


def test_existing_image_is_read_and_converted(tmp_path):
    from PIL import Image

    Image.new("L", (20, 10), 128).save(tmp_path / "g.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "r1", "prompt": "q", "image": "g.png", "chosen": "c", "rejected": "r"}) + "\n")
    (record,) = read_records(path)
    image = ImageResolver(tmp_path)(record)
    assert image.mode == "RGB" and image.size == (20, 10)


def test_embedded_data_set_is_usable():
    from src.data.datamodule import grouped_split
    from tests.conftest import ROOT

    records = read_records(ROOT / "src/data/embedded/safety_pairs.jsonl")
    assert len(records) >= 64
    assert all(r.image and r.image_turn is not None for r in records)
    train, val = grouped_split(records, 0.125)
    assert val and not {r.group for r in train} & {r.group for r in val}
    assert len(train) + len(val) == len(records)


def _two_pictures(rid, content, **extra):
    raw = {"id": rid, "messages": [{"role": "user", "content": content}], "chosen": "c", "rejected": "r"}
    return raw | {"images": ["a.png", "b.png"]} | extra


def test_generic_jsonl_several_pictures(tmp_path):
    """An ``images`` list places one picture per marker, in order, in any user turn; blind prompts drop them all."""
    recs = [
        _two_pictures("str", "<image>\nCompare <image> these."),
        _two_pictures("parts", [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare these."}]),
        {
            "id": "turns",
            "messages": [
                {"role": "user", "content": "<image>\nWhat is this?"},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "And <image> this?"},
            ],
            "images": ["a.png", "b.png"],
            "chosen": "c",
            "rejected": "r",
        },
        _two_pictures("no-marker", "Compare these."),
        {"id": "one", "prompt": "<image> q", "images": ["a.png"], "chosen": "c", "rejected": "r"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    by_id = {r.id: r for r in read_records(path)}
    for rid in ("str", "parts", "no-marker"):
        rec = by_id[rid]
        assert rec.images == ("a.png", "b.png") and rec.image_turns == (0, 0), rid
        assert rec.image == "a.png" and rec.image_turn == 0  # the first picture, for one-picture code
        assert rec.turns[0].text == "Compare these." and "images" not in rec.meta
        parts = rec.messages()[0]["content"]
        assert parts == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare these."}]
        assert rec.messages(with_image=False)[0]["content"] == [{"type": "text", "text": "Compare these."}]
    turns = by_id["turns"]
    assert turns.image_turns == (0, 2) and turns.history_starts() == [0]  # every picture's turn is kept
    assert [sum(p["type"] == "image" for p in m["content"]) for m in turns.messages()] == [1, 0, 1]
    assert all(p["type"] == "text" for m in turns.messages(with_image=False) for p in m["content"])
    assert by_id["one"].images == ("a.png",) and by_id["one"].image == "a.png"


@pytest.mark.parametrize(
    "raw, message",
    [
        (_two_pictures("x", "<image> q"), r"d\.jsonl:1 \(id=x\): the prompt holds 1 <image> marker but 2 pictures"),
        (
            {"id": "x", "prompt": "<image> <image> <image> q", "images": ["a.png"], "chosen": "c", "rejected": "r"},
            r"\(id=x\): the prompt holds 3 <image> markers but 1 picture",
        ),
        (_two_pictures("x", "q", image="c.png"), r"give 'image' \(one picture\) or 'images' \(a list\), not both"),
        (_two_pictures("x", "q", images=["a.png", 3]), r"'images' must be a list of non-empty path strings"),
        (_two_pictures("x", "q", images="a.png"), r"'images' must be a list"),
    ],
)
def test_generic_jsonl_picture_count_must_match(tmp_path, raw, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=message):
        read_records(path)
    problems = []
    with pytest.raises(DataError, match="no records"):
        read_records(path, problems=problems)
    assert len(problems) == 1


def test_picture_count_error_has_a_record_independent_reason():
    from src.data.convert import generic_record

    with pytest.raises(DataError) as caught:
        generic_record(_two_pictures("x", "<image> q"), "f.jsonl:1", "line-1")
    assert caught.value.reason == "the prompt holds 1 <image> marker but 2 pictures"


def test_a_record_keeps_its_first_picture_in_the_single_fields():
    from dataclasses import replace

    from src.data.records import PreferenceRecord, Turn

    base = dict(id="r", turns=(Turn("user", "q"),), chosen="c", rejected="r")
    one = PreferenceRecord(image_turn=0, image="a.png", **base)
    assert one.images == ("a.png",) and one.image_turns == (0,)
    assert replace(one, image="b.png").images == ("b.png",)  # one picture: the single field changes it
    assert replace(one, image=None, image_turn=None).images == ()
    two = PreferenceRecord(image_turn=0, image="a.png", images=("a.png", "b.png"), image_turns=(0, 0), **base)
    assert replace(two, images=("c.png", "b.png"), image="c.png").images == ("c.png", "b.png")
    with pytest.raises(ValueError, match="differ from the first of its 2 pictures"):
        replace(two, image="c.png")
    with pytest.raises(ValueError, match="2 pictures but 1 picture turns"):
        PreferenceRecord(image_turn=0, image="a.png", images=("a.png", "b.png"), image_turns=(0,), **base)
    text = PreferenceRecord(image_turn=None, image=None, **base)
    assert text.images == () and text.messages()[0]["content"] == [{"type": "text", "text": "q"}]


def test_resolver_gives_every_picture_in_order(tmp_path):
    """One picture per reference, in the record's order: a file, a stand-in for a missing one, a rendered one."""
    from PIL import Image

    from src.data.images import RENDER_PREFIX

    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "red.png")
    raw = {
        "id": "r1",
        "prompt": "<image> <image> <image> q",
        "images": ["red.png", "nope.png", RENDER_PREFIX + "a key"],
        "chosen": "c",
        "rejected": "r",
        "entity": "a padlock",
    }
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(raw))
    (record,) = read_records(path)
    with pytest.raises(DataError, match=r"1 of 3 images not found; first: record r1: .*nope\.png"):
        ImageResolver(tmp_path, missing="error").check([record])
    with pytest.raises(DataError, match=r"record r1: image file not found: .*nope\.png"):
        ImageResolver(tmp_path, missing="error").pictures(record)
    resolver = ImageResolver(tmp_path, missing="render", stand_in_size=64)
    assert resolver.check([record]) == 1
    red, missing, drawn = resolver.pictures(record)
    assert red.size == (20, 10) and red.getpixel((0, 0)) == (255, 0, 0)
    assert list(missing.getdata()) == list(render_stand_in("a padlock", 64).getdata())  # the entity, as for one
    assert list(drawn.getdata()) == list(render_stand_in("a key", 64).getdata())
    assert resolver(record).size == (20, 10)  # the first picture, for one-picture code
    text_only = read_records(_write(tmp_path, {"id": "t", "prompt": "q", "chosen": "c", "rejected": "r"}))[0]
    assert resolver.pictures(text_only) == []


def _write(folder, raw):
    path = folder / "t.jsonl"
    path.write_text(json.dumps(raw))
    return path
