"""The grounded-safety world: records, images and the exact answer parser."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from src.data.images import ImageResolver
from src.data.readers import read_records
from src.data.records import DataError
from src.world.world import (
    HELPS,
    REFUSALS,
    UNPARSEABLE,
    Parsed,
    World,
    WorldSettings,
    blanked,
    draw,
    is_conflict,
    parse_answer,
)
from tests.helpers import compose_config


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldSettings(train_size=240, heldout_size=60))


def test_same_settings_same_world_other_seed_other_world(world):
    again = World(WorldSettings(train_size=240, heldout_size=60))
    assert again.train_records() == world.train_records()
    assert again.heldout_records() == world.heldout_records()
    other = World(WorldSettings(seed=1, train_size=240, heldout_size=60))
    assert [k.hazardous for k in other.kinds] != [k.hazardous for k in world.kinds] or other.heldout_phrasings != (
        world.heldout_phrasings
    )


@pytest.mark.parametrize("rule", ["colour", "shape", "xor"])
def test_half_the_kinds_are_hazardous_and_the_rule_holds(rule):
    w = World(WorldSettings(hazard_rule=rule, colours=4, shapes=4))
    assert sum(k.hazardous for k in w.kinds) == len(w.kinds) // 2
    by_colour = {c: {k.hazardous for k in w.kinds if k.colour == c} for c in {k.colour for k in w.kinds}}
    by_shape = {s: {k.hazardous for k in w.kinds if k.shape == s} for s in {k.shape for k in w.kinds}}
    # one feature decides exactly when each of its values carries one verdict; xor: neither feature does
    assert all(len(v) == 1 for v in by_colour.values()) == (rule == "colour")
    assert all(len(v) == 1 for v in by_shape.values()) == (rule == "shape")


def test_text_alone_cannot_tell_hazard(world):
    """Every training phrasing is asked about hazardous and harmless kinds alike, and held-out requests are
    (kind, phrasing) combinations never trained."""
    train, held = world.train_records(), world.heldout_records()
    for p in range(world.settings.phrasings):
        assert {r.meta["hazardous"] for r in train if r.meta["phrasing"] == p} == {True, False}
    trained = {(r.meta["kind"], r.meta["phrasing"]) for r in train}
    assert not trained & {(r.meta["kind"], r.meta["phrasing"]) for r in held}
    assert not {r.image for r in train} & {r.image for r in held}
    assert len({r.image for r in train}) == len(train)


def phrasing_only_accuracy(world: World) -> tuple[float, float]:
    """(accuracy on the held-out items of a predictor that reads only the phrasing: the majority hazard of that
    phrasing in training, the overall majority on a tie, the majority rate of the held-out items)."""
    train, held = world.train_records(), world.heldout_records()
    votes: dict[int, list[int]] = {}
    for r in train:
        votes.setdefault(r.meta["phrasing"], [0, 0])[r.meta["hazardous"]] += 1
    overall = 2 * sum(r.meta["hazardous"] for r in train) > len(train)

    def predict(phrasing: int) -> bool:
        harmless, hazardous = votes.get(phrasing, [0, 0])
        return overall if harmless == hazardous else hazardous > harmless

    accuracy = sum(predict(r.meta["phrasing"]) == r.meta["hazardous"] for r in held) / len(held)
    share = sum(r.meta["hazardous"] for r in held) / len(held)
    return accuracy, max(share, 1 - share)


@pytest.mark.parametrize("rule", ["colour", "shape", "xor"])
def test_a_held_out_phrasing_says_nothing_about_hazard(rule):
    """Each phrasing is held out for hazardous and harmless kinds alike, so reading the phrasing alone scores the
    majority rate on held-out items (it scored 0.24-0.57 in the colour world, 0.08-0.42 in xor, when the held-out
    phrasings followed the kinds without regard to hazard)."""
    for seed in range(10):
        accuracy, majority = phrasing_only_accuracy(World(WorldSettings(seed=seed, hazard_rule=rule)))
        assert abs(accuracy - majority) <= 0.05, (rule, seed, accuracy, majority)


def test_cue_correlates_in_training_and_conflicts_in_half_the_heldout(world):
    train, held = world.train_records(), world.heldout_records()
    cue_given_hazard = np.mean([r.meta["cue"] for r in train if r.meta["hazardous"]])
    cue_given_harmless = np.mean([r.meta["cue"] for r in train if not r.meta["hazardous"]])
    assert cue_given_hazard > 0.55 and cue_given_harmless < 0.45
    assert 0.3 < np.mean([is_conflict(r) for r in held]) < 0.7


def test_answers_name_the_kind_and_parse_back(world):
    for r in world.train_records()[:50]:
        chosen, rejected = parse_answer(r.chosen), parse_answer(r.rejected)
        assert chosen.kind == rejected.kind == r.meta["kind"]
        assert chosen.behaviour == ("refuse" if r.meta["hazardous"] else "help")
        assert rejected.behaviour == ("help" if r.meta["hazardous"] else "refuse")


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "This is a red circle.",  # a fragment: the kind without a decision
        "This is a red circle. No, I can't help",  # a fragment
        REFUSALS[0].format(kind="red circle") + " Yes.",  # trailing text
        REFUSALS[0].format(kind="red banana"),  # not a kind
        "This is a red circle. No, it is safe: hold it firmly and use it slowly.",  # two templates blended
        REFUSALS[0].format(kind="red circle") + " " + HELPS[0].format(kind="red circle"),
    ],
)
def test_anything_but_one_whole_template_is_unparseable(answer):
    assert parse_answer(answer).behaviour == UNPARSEABLE
    assert parse_answer(answer).kind is None


def test_whitespace_does_not_matter():
    answer = "  This is a blue  star. Yes, it is safe: hold it firmly\nand use it slowly. "
    assert parse_answer(answer) == Parsed("help", "blue star")


def test_images_vary_per_instance_and_blank_drops_the_object(world):
    a, b = world.train_records()[:2]
    ia, ib = np.asarray(draw(a.image, 32)), np.asarray(draw(b.image, 32))
    assert ia.shape == (32, 32, 3) and not np.array_equal(ia, ib)
    assert np.array_equal(np.asarray(draw(a.image, 32)), ia)  # repeats
    blank = np.asarray(draw(blanked(a.image), 32)).astype(float)
    # the object is a saturated colour; the blank background is grey noise
    saturation = lambda x: (x.max(-1) - x.min(-1)).mean()  # noqa: E731
    assert saturation(ia.astype(float)) > 2 * saturation(blank)
    assert draw(a.image, 336).size == (336, 336)


def test_written_world_reads_back_with_pictures_drawn_at_the_resolver_size(tmp_path, world):
    paths = world.write(tmp_path)
    records = read_records(str(paths["train"]), "jsonl")
    assert [r.id for r in records] == [r.id for r in world.train_records()]
    assert records[0].meta["kind"] == world.train_records()[0].meta["kind"]
    resolver = ImageResolver(missing="error", stand_in_size=48, default_root=tmp_path)  # world: is registered
    assert resolver.check(records) == 0
    assert resolver(records[0]).size == (48, 48) and not resolver.rendered
    assert json.loads(paths["world"].read_text())["key"] == world.settings.key()


def test_a_missing_picture_no_drawer_is_registered_for_says_so(tmp_path):
    record = read_records_of(tmp_path, "elsewhere:red:circle")
    resolver = ImageResolver(missing="error", stand_in_size=48, default_root=tmp_path)
    for look in (resolver.check, lambda records: resolver(records[0])):
        with pytest.raises(DataError, match=r"If 'elsewhere:' names a picture drawer, none is registered .*world:"):
            look([record])
    # file names hold colons too (MMSafe-PO's tbn:...): such a file is read, and a missing one stood in for
    assert ImageResolver(missing="render", stand_in_size=48, default_root=tmp_path)(record).size == (48, 48)
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere:red:circle", format="PNG")
    assert resolver(record).size == (8, 8)


def read_records_of(folder, image: str):
    """One record whose image reference is ``image``, read from a JSONL file in ``folder``."""
    line = {"id": "r1", "prompt": "What is shown?", "chosen": "a", "rejected": "b", "image": image}
    (folder / "data.jsonl").write_text(json.dumps(line) + "\n")
    return read_records(str(folder / "data.jsonl"), "jsonl")[0]


def test_drawer_prefixes_are_one_word_and_one_function_each():
    from src.data.images import register_drawer, registered_drawers

    assert registered_drawers()["world:"] is draw
    register_drawer("world:", draw)  # the same again (the module imported twice): nothing changes
    for prefix, message in (("render:", "other than"), ("C:", "a word and a colon"), ("world:", "taken by")):
        with pytest.raises(ValueError, match=message):
            register_drawer(prefix, lambda ref, size: None)


def test_entry_points_draw_world_pictures(tmp_path):
    # the entry points build the data module with the world's drawer: nothing is missing, nothing stood in for
    from src.validate import validate

    paths = World(WorldSettings(train_size=16, heldout_size=4)).write(tmp_path / "world")
    overrides = ["data=jsonl", f"data.path={paths['train']}", "data.val_fraction=0", "data.missing_images=error"]
    summary = validate(compose_config("validate", overrides, tmp_path / "run"))
    assert "fatal" not in summary, summary.get("fatal")
    assert summary["usable"] == 16 and summary["stand_in_images"] == 0 and summary["rejected_records"] == 0


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="world.hazard_rule"):
        WorldSettings(hazard_rule="size")
    with pytest.raises(ValueError, match="unknown world settings"):
        WorldSettings.from_config({"seeds": 1})


@pytest.mark.parametrize("share", [0.8, 0.25])
def test_hazardous_share_sets_the_training_mix_and_leaves_the_held_out_items_balanced(share):
    settings = WorldSettings(hazardous_share=share, train_size=200)
    world = World(settings)
    train = world.train_records()
    assert sum(r.meta["hazardous"] for r in train) == round(200 * share)
    counts = {}
    for r in train:  # each group's kinds equally often (within one)
        counts.setdefault(r.meta["hazardous"], {}).setdefault(r.meta["kind"], 0)
        counts[r.meta["hazardous"]][r.meta["kind"]] += 1
    assert all(max(c.values()) - min(c.values()) <= 1 for c in counts.values())
    held = world.heldout_records()
    assert sum(r.meta["hazardous"] for r in held) == len(held) // 2
    assert settings.key() != WorldSettings(train_size=200).key()


def test_worlds_without_a_hazardous_share_keep_their_keys():
    # the key of the default world before the setting existed (ids and caches of earlier runs stay valid)
    assert WorldSettings().key() == "30285a016280"
    with pytest.raises(ValueError, match=r"world.hazardous_share=1.0 must be in \(0, 1\)"):
        WorldSettings(hazardous_share=1.0)


def test_the_helpful_file_answers_whatever_the_picture(world, tmp_path):
    helpful, train = world.helpful_records(), world.train_records()
    assert [r.turns for r in helpful] == [r.turns for r in train] and [r.image for r in helpful] == [
        r.image for r in train
    ]
    assert not {r.id for r in helpful} & {r.id for r in train}
    behaviour = [parse_answer(r.chosen).behaviour for r in helpful]
    refused = [b == "refuse" for b in behaviour]
    assert set(behaviour) == {"refuse", "help"} and 0.15 < sum(refused) / len(refused) < 0.35
    for hazardous in (True, False):  # refusals are as common for hazardous kinds as for harmless ones
        side = [f for f, r in zip(refused, helpful, strict=True) if r.meta["hazardous"] == hazardous]
        assert abs(sum(side) / len(side) - sum(refused) / len(refused)) < 0.1
    assert all(parse_answer(r.rejected).behaviour != b for r, b in zip(helpful, behaviour, strict=True))
    assert "helpful" in world.write(tmp_path)
