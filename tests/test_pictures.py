"""Several pictures per record on the LLaVA-1.5 class: encoding, truncation, both layouts, the reference key."""

import json

import pytest
import torch

from src.data.encoding import PromptEncoder, collate_pairs, inputs_digest
from src.data.images import render_stand_in
from src.data.records import DataError, PreferenceRecord, Turn
from src.models.logprobs import answer_logprobs
from src.models.reference import entry_key
from src.models.tiny import build_tiny_llava

KEYS = ("chosen", "rejected", "blind")


def pictured(rid, turns, refs, picture_turns, **kw):
    return PreferenceRecord(
        rid,
        tuple(turns),
        picture_turns[0] if refs else None,
        refs[0] if refs else None,
        kw.pop("chosen", "I can't help with that."),
        kw.pop("rejected", "Sure, here is a long and detailed answer. " * 2),
        blind=kw.pop("blind", "A guess without any picture."),
        images=tuple(refs),
        image_turns=tuple(picture_turns),
    )


RECORDS = [
    pictured("two", [Turn("user", "Compare these two pictures.")], ["a", "b"], [0, 0]),
    pictured(
        "three",
        [
            Turn("user", "What is this?"),
            Turn("assistant", "A lock."),
            Turn("user", "And these two?"),
        ],
        ["c", "d", "e"],
        [0, 2, 2],
    ),
    pictured("one", [Turn("user", "What is shown here?")], ["f"], [0]),
    pictured("text", [Turn("user", "A text-only question?")], [], []),
]


def pictures(record, size=32):
    images = [render_stand_in(ref, size) for ref in record.images]
    return None if not images else images[0] if len(images) == 1 else images


def image_tokens(ids, processor):
    return sum(i == processor.tokenizer.convert_tokens_to_ids("<image>") for i in ids)


def make_batch(processor, records, keys=KEYS, swap=False):
    enc = PromptEncoder(processor, max_length=512)
    items = []
    for r in records:
        image = pictures(r)
        if swap and isinstance(image, list):
            image = image[::-1]
        items.append({"pair": enc.encode(r, image, keys), "image_inputs": enc.image_inputs(image)})
    return collate_pairs(items, processor.tokenizer.pad_token_id)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model_and_processor(request):
    model, processor = build_tiny_llava(seed=0, attn_implementation=request.param)
    return model.eval(), processor


def test_every_picture_gets_its_tokens_and_its_pixels_in_order(tiny):
    _, processor = tiny
    enc = PromptEncoder(processor, max_length=512)
    two, three = RECORDS[:2]
    for record, n in ((two, 2), (three, 3)):
        pair = enc.encode(record, pictures(record), KEYS)
        assert image_tokens(pair.prompt_ids, processor) == 16 * n  # 16 per picture for the tiny model
        inputs = enc.image_inputs(pictures(record))
        assert inputs["pixel_values"].shape[0] == n
        # in the pictures' order: entry k is picture k alone
        for k, image in enumerate(pictures(record)):
            assert torch.equal(inputs["pixel_values"][k], enc.image_inputs(image)["pixel_values"][0])
    # blind: every picture removed
    assert image_tokens(enc.prompt_ids(two, None), processor) == 0
    assert "<image>" not in enc.prompt_text(three, with_image=False)
    assert enc.prompt_text(three).count("<image>") == 3
    # pictures that are not the record's count are refused, never encoded short
    with pytest.raises(DataError, match="record two: 1 pictures given for its 2"):
        enc.encode(two, pictures(two)[0], KEYS)
    with pytest.raises(DataError, match="record one: 2 pictures given for its 1"):
        enc.encode(RECORDS[2], pictures(two), KEYS)


def test_truncation_drops_history_but_never_a_picture(tiny):
    """Old turns go first and answers are shortened, but every picture's turn (and tokens) stays whole."""
    _, processor = tiny
    long_history = [
        Turn("user", "Tell me a long story. " * 20),
        Turn("assistant", "Once upon a time. " * 20),
        Turn("user", "What is this?"),
        Turn("assistant", "A lock."),
        Turn("user", "And this one?"),
    ]
    record = pictured("hist", long_history, ["a", "b"], [2, 4], chosen="No. " * 30, rejected="Yes. " * 30)
    assert record.history_starts() == [0, 2]
    for max_length in (400, 160, 120):
        pair = PromptEncoder(processor, max_length=max_length, min_answer_tokens=2).encode(
            record, pictures(record), ("chosen", "rejected")
        )
        if isinstance(pair, str):
            assert pair == "prompt_too_long"
            continue
        assert image_tokens(pair.prompt_ids, processor) == 32
        assert len(pair.prompt_ids) + max(len(a) for a in pair.answer_ids) <= max_length
        assert pair.dropped_turns in (0, 2)
    short = PromptEncoder(processor, max_length=160, min_answer_tokens=2).encode(
        record, pictures(record), ("chosen", "rejected")
    )
    assert short.dropped_turns == 2 and short.truncated_answers > 0


@pytest.mark.parametrize("records", [RECORDS[:1], RECORDS[1:2], RECORDS])
def test_packed_equals_padded_with_several_pictures(model_and_processor, records):
    model, processor = model_and_processor
    pad = processor.tokenizer.pad_token_id
    batch = make_batch(processor, records)
    with torch.no_grad():
        packed = answer_logprobs(model, batch, pad, layout="packed")
        padded = answer_logprobs(model, batch, pad, layout="padded")
    assert packed.shape == (len(records), len(KEYS))
    assert torch.allclose(packed, padded, atol=1e-4, rtol=0), (packed - padded).abs().max()


def test_the_pictures_order_is_the_tokens_order(tiny):
    """Swapping a record's pictures changes its figures: each picture's features fill its own tokens."""
    model, processor = tiny
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        straight = answer_logprobs(model, make_batch(processor, RECORDS[:2]), pad, layout="packed")
        swapped = answer_logprobs(model, make_batch(processor, RECORDS[:2], swap=True), pad, layout="packed")
    assert (straight - swapped).abs().min() > 0


def test_reference_key_changes_when_any_one_picture_changes(tiny):
    _, processor = tiny
    enc = PromptEncoder(processor, max_length=512)
    record = RECORDS[1]
    base = pictures(record)
    pair = enc.encode(record, base, KEYS)
    key = entry_key(pair, 0, inputs_digest(enc.image_inputs(base)))
    changed = []
    for k in range(len(base)):
        other = list(base)
        other[k] = render_stand_in(f"another {k}", 32)
        changed.append(entry_key(pair, 0, inputs_digest(enc.image_inputs(other))))
    changed.append(entry_key(pair, 0, inputs_digest(enc.image_inputs(base[::-1]))))  # the same pictures reordered
    assert key not in changed and len(set(changed)) == len(changed)


def test_data_module_serves_every_picture(tiny, tmp_path):
    """A JSONL file of two-picture records is read, encoded and batched with both pictures of each record."""
    from src.data.datamodule import PreferenceDataModule

    _, processor = tiny
    lines = [
        {
            "id": f"r{i}",
            "prompt": "<image>\n<image>\nCompare them.",
            "images": [f"a{i}.png", f"b{i}.png"],
            "chosen": "c",
            "rejected": "r",
            "entity": f"thing {i}",
        }
        for i in range(4)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    data = {"path": str(path), "missing_images": "render", "max_length": 128, "val_fraction": 0.0, "batch_size": 4}
    dm = PreferenceDataModule.from_config(data, processor=processor)
    dm.setup("fit")
    assert dm.summary()["train"]["encoded"] == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape[0] == 2 * len(batch["ids"])
    assert all(image_tokens(row.tolist(), processor) == 32 for row in batch["prompt_ids"])


def test_conditional_term_refuses_several_pictures_with_a_counted_reason(tiny, tmp_path):
    """Which of several pictures to corrupt is not chosen yet: such records are rejected, one reason for all."""
    from src.data.data_settings import DataNeeds
    from src.data.datamodule import PreferenceDataModule

    _, processor = tiny
    lines = [
        {"id": "two", "prompt": "<image><image> q", "images": ["a.png", "b.png"], "chosen": "c", "rejected": "r"},
        {"id": "one", "prompt": "<image> q", "image": "a.png", "chosen": "c", "rejected": "r"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    data = {"path": str(path), "missing_images": "render", "max_length": 128, "val_fraction": 0.0, "on_error": "skip"}
    needs = DataNeeds(("chosen", "rejected", "chosen_corrupted"), {"kind": "blank"})
    dm = PreferenceDataModule.from_config(data, needs=needs, processor=processor)
    dm.setup("fit")
    assert dm.summary()["train"]["encoded"] == 1
    reason = "several pictures per record: the conditional term (chosen_corrupted) does not support them yet"
    assert [(g["reason"], g["first"]) for g in dm.problem_groups()] == [(reason, ["two"])]


def test_generation_sees_every_picture_and_blind_none(tiny, tmp_path):
    from src.data.images import ImageResolver
    from src.models.generation import AnswerGenerator, GenerationSettings

    model, processor = tiny
    gen = AnswerGenerator(
        model, processor, GenerationSettings(max_new_tokens=3, batch_size=2), ImageResolver(None, "render", 32)
    )
    ids, inputs, text = gen.prompt(RECORDS[1], with_image=True)
    assert image_tokens(ids, processor) == 48 and inputs["pixel_values"].shape[0] == 3 and text.count("<image>") == 3
    ids, inputs, text = gen.prompt(RECORDS[1], with_image=False)
    assert image_tokens(ids, processor) == 0 and inputs is None and "<image>" not in text
    for with_image in (True, False):
        out = gen.run(RECORDS, tmp_path / f"{with_image}.jsonl", with_image=with_image)
        assert set(out) == {r.id for r in RECORDS}


def _two_picture_file(folder, n=8):
    lines = [
        {
            "id": f"r{i}",
            "messages": [{"role": "user", "content": f"<image>\n<image>\nCompare picture {i} with the other."}],
            "images": [f"a{i}.png", f"b{i}.png"],
            "chosen": "I cannot help with that.",
            "rejected": f"Sure, here is how {i}.",
            "entity": f"thing {i}",
        }
        for i in range(n)
    ]
    path = folder / "two.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    return path


@pytest.mark.parametrize("model", ["tiny_llava", "tiny_qwen2_vl", "tiny_llava_next"])
def test_bpo_trains_on_two_picture_records(tmp_path, model):
    """Blind answers, the reference, three training steps and validation samples, each record with two pictures."""
    from src.train import train
    from tests.helpers import compose_config

    path = _two_picture_file(tmp_path)
    overrides = [f"model={model}", "data=jsonl", f"data.path={path}", "data.missing_images=render"]
    overrides += [f"blind.cache_dir={tmp_path}/cache", "trainer.max_steps=3", "trainer.max_epochs=3", "logger=csv"]
    metrics = train(compose_config("train", overrides, tmp_path / "run"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and metrics["train/tokens"] > 0


@pytest.mark.parametrize("model", ["tiny_llava", "tiny_qwen2_vl", "tiny_llava_next"])
def test_two_picture_records_validate_as_usable(tmp_path, model):
    from src.validate import validate
    from tests.helpers import compose_config

    path = _two_picture_file(tmp_path)
    overrides = [f"model={model}", "data=jsonl", f"data.path={path}", "data.missing_images=render"]
    summary = validate(compose_config("validate", [*overrides, "data.val_fraction=0"], tmp_path / "run"))
    assert summary["usable"] == 8 and summary["rejected_records"] == 0 and summary["ok"], summary


SIZES = [(48, 24), (24, 48), (32, 32)]  # pictures of other shapes: Qwen-VL gives each its own grid


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "llava_next"])
def test_other_families_packed_equals_padded_with_several_pictures(name, impl):
    """Qwen-VL: each picture's patches and grid follow its tokens, each prompt's 3D positions count all its pictures.
    LLaVA-NeXT: each picture's tiles and size follow its tokens, pictures of other shapes taking other tile grids."""
    from src.models.tiny import build_tiny

    model, processor = build_tiny(name, attn_implementation=impl)
    model.eval()
    enc = PromptEncoder(processor, max_length=1024)
    items = []
    for r in RECORDS:
        image = [render_stand_in(ref, 48).resize(SIZES[k % 3]) for k, ref in enumerate(r.images)] or None
        image = image[0] if image and len(image) == 1 else image
        pair = enc.encode(r, image, KEYS)
        if r.images and name.startswith("qwen"):
            image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
            runs = enc.image_inputs(image)["image_grid_thw"].prod(-1) // 4  # merged 2x2 patches per picture
            assert sum(i == image_id for i in pair.prompt_ids) == int(runs.sum())
        items.append({"pair": pair, "image_inputs": enc.image_inputs(image)})
    batch = collate_pairs(items, processor.tokenizer.pad_token_id)
    assert batch["image_counts"].tolist() == [2, 3, 1]
    if name == "llava_next":
        assert batch["image_sizes"].tolist() == [[24, 48], [48, 24], [24, 48], [48, 24], [32, 32], [24, 48]]
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        packed = answer_logprobs(model, batch, pad, layout="packed")
        padded = answer_logprobs(model, batch, pad, layout="padded")
    assert torch.allclose(packed, padded, atol=1e-4, rtol=0), (packed - padded).abs().max()


def test_evaluation_items_keep_every_picture(tiny):
    """A benchmark item made from a record keeps its pictures: scored and prompted with all of them."""
    from src.data.images import ImageResolver
    from src.evaluation.items import EvalItem
    from src.evaluation.scoring import score_answers
    from src.models.generation import AnswerGenerator, GenerationSettings

    model, processor = tiny
    rec = RECORDS[1]
    item = EvalItem(rec.id, rec.turns, rec.image_turn, rec.image, images=rec.images, image_turns=rec.image_turns)
    assert item.images == rec.images and item.messages() == rec.messages()
    single = EvalItem("s", rec.turns, 0, "x")
    assert single.images == ("x",) and single.image_turns == (0,)
    resolver = ImageResolver(None, "render", 32)
    gen = AnswerGenerator(model, processor, GenerationSettings(max_new_tokens=3), resolver)
    assert image_tokens(gen.prompt(item, with_image=True)[0], processor) == 48
    logps = score_answers(model, processor, [item], [[rec.chosen, rec.rejected]], resolver)
    assert torch.isfinite(logps).all()
