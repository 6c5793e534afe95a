"""The corrupted image of chosen_corrupted: a pure, seeded function of (image, settings, record id), same size;
items, batches and reference cache keys that carry it."""

import numpy as np
import pytest
import torch
from PIL import Image

from src.data.data_settings import DataNeeds, LoaderSettings, ReaderSettings
from src.data.datamodule import PreferenceDataModule
from src.data.encoding import PromptEncoder, collate_pairs, inputs_digest
from src.data.images import check_corruption, corrupt_image, crop_box, render_stand_in
from src.data.records import PreferenceRecord, Turn
from src.errors import SettingError
from src.models.objectives import data_needs
from src.models.reference import precompute_reference_logps
from tests.helpers import compose_config
from tests.test_reference import write_data as write_reference_data

IMAGE = render_stand_in("a padlock on a door", 48).resize((60, 36))  # not square: the size must survive
GREY = (122, 116, 104)
KINDS = [{"kind": "crop"}, {"kind": "blank"}, {"kind": "noise", "std": 0.3}]


def corrupt(settings, record_id="r1", image=IMAGE):
    return corrupt_image(image, check_corruption(settings), record_id, GREY)


@pytest.mark.parametrize("settings", KINDS)
def test_same_record_same_image_and_size(settings):
    first, again = corrupt(settings), corrupt(settings)
    assert first.size == IMAGE.size and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    if settings["kind"] != "blank":  # seeded by (seed, record id)
        assert not np.array_equal(np.asarray(first), np.asarray(corrupt(settings, "r2")))
        assert not np.array_equal(np.asarray(first), np.asarray(corrupt(settings | {"seed": 1})))


def test_kinds_differ_from_each_other_and_from_the_image():
    images = [np.asarray(corrupt(s), dtype=np.int16) for s in KINDS] + [np.asarray(IMAGE, dtype=np.int16)]
    for a in range(len(images)):
        for b in range(a + 1, len(images)):
            assert np.abs(images[a] - images[b]).mean() > 5, (a, b)
    assert (images[1] == np.array(GREY)).all()  # blank: the fill colour everywhere


def test_crop_keeps_an_area_in_range():
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(200):
        left, top, right, bottom = crop_box((60, 36), [0.05, 0.2], rng)
        assert 0 <= left < right <= 60 and 0 <= top < bottom <= 36
        fractions.append((right - left) * (bottom - top) / (60 * 36))
    # rounding each side to whole pixels moves the area a little
    assert 0.04 <= min(fractions) and max(fractions) <= 0.22
    assert max(fractions) - min(fractions) > 0.1  # spread over the range, not one size
    assert crop_box((60, 36), [0.0, 0.0001], rng)[2:] != (0, 0)  # at least one pixel


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"kind": "blur"}, "objective.corruption.kind"),
        ({}, "objective.corruption.kind"),
        ({"kind": "crop", "keep": [0.3, 0.1]}, "objective.corruption.keep"),
        ({"kind": "crop", "keep": 0.2}, "objective.corruption.keep"),
        ({"kind": "crop", "keep": [0.0, 1.5]}, "objective.corruption.keep"),
        ({"kind": "crop", "std": 0}, "objective.corruption.std"),  # another kind's setting, checked all the same
        ({"kind": "crop", "strength": 0.2}, "objective.corruption.strength"),
        ({"kind": "noise", "std": 0}, "objective.corruption.std"),
        ({"kind": "noise", "seed": "x"}, "objective.corruption.seed"),
    ],
)
def test_bad_settings_name_the_key(settings, key):
    with pytest.raises(SettingError, match=key.replace(".", r"\.")):  # entry points: one line, exit 2
        check_corruption(settings)


def test_settings_of_other_kinds_are_checked_and_left_out():
    every = {"kind": "blank", "keep": [0.0, 0.2], "std": 0.5, "seed": 3}  # a config listing all kinds' settings
    assert check_corruption(every) == {"kind": "blank"}
    assert check_corruption(every | {"kind": "noise"}) == {"kind": "noise", "std": 0.5, "seed": 3}


def write_data(tmp_path):
    return write_reference_data(tmp_path, n=4, text_only=True)


ANSWERS = ["chosen", "rejected", "chosen_corrupted"]


def datamodule(path, processor, corruption, answers=ANSWERS):
    dm = PreferenceDataModule(
        ReaderSettings(str(path), missing_images="render", val_fraction=0.0),
        loader=LoaderSettings(batch_size=5),
        needs=DataNeeds(answers, corruption),
        processor=processor,
    )
    dm.setup("fit")
    return dm


def test_items_and_batches_carry_the_corrupted_image(tiny, tmp_path):
    _, processor = tiny
    dm = datamodule(write_data(tmp_path), processor, {"kind": "crop", "seed": 3})
    items = [dm.train_set[i] for i in range(len(dm.train_set))]
    for item in items:
        pair = item["pair"]
        assert pair.answer_ids[2] == pair.answer_ids[0]  # the chosen text, fitted like chosen
        assert item["answer_image"] == [0, 0, 1]
        if item["image_inputs"] is None:  # the text-only record: no second image
            assert item["corrupted_image_inputs"] is None
            continue
        real, corrupted = item["image_inputs"]["pixel_values"], item["corrupted_image_inputs"]["pixel_values"]
        assert real.shape == corrupted.shape and not torch.equal(real, corrupted)
    # another epoch, another data module: the same corrupted pixels
    again = datamodule(write_data(tmp_path), processor, {"kind": "crop", "seed": 3}).train_set
    digests = [inputs_digest(it["corrupted_image_inputs"]) for it in items]
    assert digests == [inputs_digest(again[i]["corrupted_image_inputs"]) for i in range(len(again))]
    batch = next(iter(dm.train_dataloader()))
    assert batch["answer_image"].tolist() == [0, 0, 1]
    assert batch["corrupted_pixel_values"].shape == batch["pixel_values"].shape == (4, 3, 32, 32)
    # without chosen_corrupted nothing changes
    plain = datamodule(write_data(tmp_path), processor, {"kind": "crop"}, answers=ANSWERS[:2])
    assert set(plain.train_set[0]) == {"pair", "image_inputs"}


def test_corrupted_image_keeps_the_prompt_tokens():
    from src.models.tiny import build_tiny

    _, processor = build_tiny("llava_next")  # its image token count follows the image size
    record = PreferenceRecord("r1", (Turn("user", "What is it?"),), 0, "a.png", "No.", "Yes.")
    enc = PromptEncoder(processor, max_length=4096)
    real = enc.prompt_ids(record, IMAGE)
    for settings in KINDS:
        assert enc.prompt_ids(record, corrupt(settings)) == real
    assert enc.prompt_ids(record, IMAGE.resize((36, 60))) != real  # the check can fail


def test_chosen_corrupted_needs_corruption_settings(tiny, tmp_path):
    _, processor = tiny
    with pytest.raises(SettingError, match="set objective.corruption"):
        DataNeeds(ANSWERS)
    with pytest.raises(SettingError, match=r"objective\.corruption\.kind"):
        DataNeeds(ANSWERS[:2], {"kind": "x"})  # checked even when no answer needs it
    needs = DataNeeds(ANSWERS[:2], {"kind": "blank"})
    dm = PreferenceDataModule(ReaderSettings(str(write_data(tmp_path))), needs=needs, processor=processor)
    assert dm.corruption == {"kind": "blank"} and dm.answers == ("chosen", "rejected")


def test_data_corruption_follows_the_objective():
    cfg = compose_config("train", ["+objective.corruption={kind: blank}"])
    assert data_needs(cfg.objective).corruption == {"kind": "blank"}
    assert data_needs(compose_config("train", []).objective).corruption is None


def test_reference_cache_key_follows_the_corrupted_image(tiny, tmp_path):
    model, processor = tiny
    path = write_data(tmp_path)
    for i in range(4):
        render_stand_in(f"a photo {i}", 40).save(tmp_path / f"img{i}.png")
    pad = processor.tokenizer.pad_token_id

    def run(corruption):
        dm = datamodule(path, processor, corruption)
        values, summary = precompute_reference_logps(model, [dm.train_set], pad, tmp_path / "ref")
        return summary, {p.id: row for p, row in zip(dm.train_set.pairs, values[0], strict=True)}

    # noise: every seed gives other pixels (a small crop of a stand-in can be its plain background under two seeds)
    summary, first = run({"kind": "noise", "seed": 0})
    assert summary["computed"] == 5
    assert run({"kind": "noise", "seed": 0})[0]["reused"] == 5
    summary, other = run({"kind": "noise", "seed": 1})  # other corruption settings: recomputed
    assert summary["computed"] == 4 and summary["reused"] == 1  # the text-only record has no image to corrupt
    for rid in first:
        assert other[rid][:2] == first[rid][:2]  # the columns on the real image are the same numbers
        if rid != "text":
            assert other[rid][2] != first[rid][2]


def test_collate_rejects_mixed_answer_images(tiny):
    _, processor = tiny
    enc = PromptEncoder(processor)
    record = PreferenceRecord("r1", (Turn("user", "What is it?"),), None, None, "No.", "Yes.")
    pair = enc.encode(record, None, ("chosen", "chosen_corrupted"))
    items = [
        {"pair": pair, "image_inputs": None, "answer_image": a, "corrupted_image_inputs": None}
        for a in ([0, 1], [1, 0])
    ]
    with pytest.raises(ValueError, match="different images"):
        collate_pairs(items, processor.tokenizer.pad_token_id)


def test_corruption_does_not_alter_the_given_image():
    image = Image.new("RGB", (20, 10), (10, 200, 30))
    before = np.asarray(image).copy()
    for settings in KINDS:
        corrupt(settings, image=image)
    assert np.array_equal(np.asarray(image), before)
