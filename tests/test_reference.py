"""The reference model: cache keys that cover every input of a log-prob, streamed precompute, step-0 rewards."""

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from src.data.data_settings import DataNeeds, ReaderSettings
from src.data.datamodule import PreferenceDataModule
from src.data.encoding import EncodedPair, PromptEncoder
from src.data.images import render_stand_in
from src.data.records import PreferenceRecord, Turn
from src.files import write_atomic
from src.models import reference as reference_mod
from src.models.generation import GenerationSettings, fill_blind_answers
from src.models.logprobs import answer_logprobs
from src.models.reference import entry_key, precompute_reference_logps
from tests.helpers import compose_config, precompute
from tests.race import WAITING, held, race


def write_data(tmp_path, n=6, text_only=False):
    """``n`` image records (images missing: drawn as stand-ins), and with ``text_only`` one record without an image."""
    lines = [
        {
            "id": f"r{i}",
            "prompt": f"<image>\nWhat is the thing in the picture for? ({i})",
            "image": f"img{i}.png",
            "chosen": "I would rather not say.",
            "rejected": "It is for hurting people.",
            "group": f"g{i}",
        }
        for i in range(n)
    ]
    if text_only:
        lines.append({"id": "text", "prompt": "A question without a picture?", "chosen": "No.", "rejected": "Yes."})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    return path


def datamodule(path, processor, blind=None, answers=("chosen", "rejected"), **kw):
    """A set-up data module of the data settings ``kw``; ``blind(record)`` gives each record's blind answer (as
    generation would)."""
    data = {"path": str(path), "val_fraction": 0.0, "batch_size": 4} | kw
    dm = PreferenceDataModule.from_config(data, needs=DataNeeds(answers), processor=processor)
    if blind is not None:
        dm.set_records([r.with_blind(blind(r)) for r in dm.load_records()])
    dm.setup("fit")
    return dm


def test_precompute_returns_the_values_and_the_data_module_takes_them(tiny, tmp_path):
    """Nothing is written into the datasets by the computation: the data module is given the values, in order."""
    model, processor = tiny
    dm = datamodule(write_data(tmp_path), processor, missing_images="render")
    values, summary = precompute_reference_logps(model, dm.fit_sets(), processor.tokenizer.pad_token_id, tmp_path)
    assert summary["computed"] == 6 and all(p.reference_logps is None for p in dm.train_set.pairs)
    assert [len(rows) for rows in values] == [6] and all(len(row) == 2 for row in values[0])
    dm.set_reference_logps(values)
    assert [p.reference_logps for p in dm.train_set.pairs] == values[0]
    batch = next(iter(dm.train_dataloader()))  # the loader's batches carry them, by pair
    by_id = {p.id: p.reference_logps for p in dm.train_set.pairs}
    expected = torch.tensor([by_id[i] for i in batch["ids"]], dtype=torch.float32)
    assert torch.equal(batch["reference_logps"], expected)


def test_reference_cache_is_recomputed_for_other_images_and_precision(tiny, tmp_path):
    model, processor = tiny
    path = write_data(tmp_path)
    pad = processor.tokenizer.pad_token_id
    cache = tmp_path / "ref"

    def run(dm, dtype=None):
        return precompute(model, [dm.train_set], pad, cache, autocast_dtype=dtype)

    stand_ins = datamodule(path, processor, missing_images="render")
    summary = run(stand_ins)
    assert summary["computed"] == 6 and summary["reused"] == 0
    assert run(datamodule(path, processor, missing_images="render"))["reused"] == 6  # same inputs: reused

    # the real images put in place: same ids, same tokens, other pixels
    for i in range(6):
        render_stand_in(f"a real photo {i}", 40).save(tmp_path / f"img{i}.png")
    real = datamodule(path, processor, missing_images="render")
    summary = run(real)
    assert summary["computed"] == 6 and summary["reused"] == 0
    before = [p.reference_logps for p in stand_ins.train_set.pairs]
    after = [p.reference_logps for p in real.train_set.pairs]
    assert before != after

    # another compute precision is another number, so another cache file
    summary = run(datamodule(path, processor), dtype=torch.bfloat16)
    assert summary["computed"] == 6 and "bfloat16" in summary["cache"]


def test_precompute_streams_images_a_batch_at_a_time(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    dm = datamodule(write_data(tmp_path, n=20), processor, missing_images="render")
    dataset = dm.train_set
    fetched = {"n": 0}
    real_getitem = type(dataset).__getitem__

    def counting_getitem(self, i):
        fetched["n"] += 1
        return real_getitem(self, i)

    seen = []

    def recording_logprobs(*args, **kw):
        seen.append(fetched["n"])
        return answer_logprobs(*args, **kw)

    monkeypatch.setattr(type(dataset), "__getitem__", counting_getitem)
    monkeypatch.setattr(reference_mod, "answer_logprobs", recording_logprobs)
    summary = precompute(model, [dataset], processor.tokenizer.pad_token_id, tmp_path / "ref", batch_size=4)
    assert summary["computed"] == 20 and len(seen) == 5
    # images are read as batches are scored, never all before the first forward pass
    assert seen[0] <= 8 and seen == sorted(seen) and seen[-1] == 20


def test_cache_file_changes_with_the_model_layout_dtype_and_attention(tiny):
    model, _ = tiny
    base = reference_mod.cache_path("c", model, "packed").name
    assert base == reference_mod.cache_path("c", model, "packed").name  # the same run finds the same file
    other_weights = copy.deepcopy(model)
    with torch.no_grad():
        next(other_weights.parameters()).view(-1)[5] += 1e-3  # any one value: the fingerprint reads them all
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"  # another kernel, same weights and config values
    variants = {
        "weights": reference_mod.cache_path("c", other_weights, "packed").name,
        "layout": reference_mod.cache_path("c", model, "padded").name,
        "compute dtype": reference_mod.cache_path("c", model, "packed", torch.bfloat16).name,
        "attention": reference_mod.cache_path("c", eager, "packed").name,
    }
    for what, name in variants.items():
        assert name != base, what
    assert len(set(variants.values())) == len(variants)
    # the layout actually used: a kernel that cannot take the packed mask runs (and caches) the padded layout
    flash = copy.deepcopy(model)
    flash.config._attn_implementation = "flash_attention_2"
    assert reference_mod.cache_path("c", flash, "packed") == reference_mod.cache_path("c", flash, "padded")


def test_entry_key_changes_with_every_input_of_the_value():
    pair = EncodedPair("r0", [1, 2, 3], [[4, 5], [6]])
    base = entry_key(pair, 0, "img")
    assert base == entry_key(EncodedPair("r0", [1, 2, 3], [[4, 5], [6]]), 0, "img")
    variants = {
        "answer": entry_key(pair, 1, "img"),
        "record id": entry_key(EncodedPair("r1", [1, 2, 3], [[4, 5], [6]]), 0, "img"),
        "prompt tokens": entry_key(EncodedPair("r0", [1, 2, 9], [[4, 5], [6]]), 0, "img"),
        "answer tokens": entry_key(EncodedPair("r0", [1, 2, 3], [[4, 9], [6]]), 0, "img"),
        # the same tokens split otherwise between prompt and answer score another answer
        "prompt/answer split": entry_key(EncodedPair("r0", [1, 2], [[3, 4, 5], [6]]), 0, "img"),
        "image inputs": entry_key(pair, 0, "other img"),
        "no image": entry_key(pair, 0, None),
    }
    for what, key in variants.items():
        assert key != base, what
    assert len(set(variants.values())) == len(variants)


def _precompute_first(model, dm, pad, cache_dir, started, release, queue):
    """A job of the sweep, in its own process: held in its first batch, then fills the cache."""
    reference_mod.answer_logprobs = held(reference_mod.answer_logprobs, started, release)
    queue.put(precompute(model, [dm.train_set], pad, cache_dir))


def test_concurrent_jobs_compute_each_reference_logp_once(tiny, tmp_path, caplog):
    """Two jobs of a sweep launched together: the second waits for the first, then reuses every value."""
    caplog.set_level(logging.INFO, logger="src.files")
    model, processor = tiny
    dm = datamodule(write_data(tmp_path), processor, missing_images="render")
    pad = processor.tokenizer.pad_token_id
    first, second = race(
        _precompute_first,
        (model, dm, pad, tmp_path),
        lambda: precompute(model, [dm.train_set], pad, tmp_path),
        caplog,
    )
    assert (first["computed"], second["computed"], second["reused"]) == (6, 0, 6)
    stored = json.loads(Path(second["cache"]).read_text())
    # every entry once (6 pairs, 2 answers each), and the second job's values are the stored ones
    assert sorted(stored.values()) == sorted(v for p in dm.train_set.pairs for v in p.reference_logps)
    assert len(stored) == 12
    assert sum(WAITING in r.getMessage() for r in caplog.records) == 1


def test_a_save_keeps_the_entries_another_writer_saved_meanwhile(tiny, tmp_path, monkeypatch):
    """A job that does not take the lock (an older version) saves values for other records while this one computes:
    both jobs' values are in the file afterwards, not only the last writer's."""
    model, processor = tiny
    dm = datamodule(write_data(tmp_path), processor, missing_images="render")
    cache = reference_mod.cache_path(tmp_path, model, "packed")
    other = {"other-record:0123": -7.25, "other-record:4567": -1.5}

    def meanwhile(*args, **kw):
        write_atomic(cache, json.dumps(other))
        return answer_logprobs(*args, **kw)

    monkeypatch.setattr(reference_mod, "answer_logprobs", meanwhile)
    summary = precompute(model, [dm.train_set], processor.tokenizer.pad_token_id, tmp_path)
    stored = json.loads(cache.read_text())
    assert summary["computed"] == 6 and len(stored) == 12 + 2
    assert {k: stored[k] for k in other} == other


# cut short, not text, valid JSON of another shape
@pytest.mark.parametrize("damage", [b"{half a cach", b"\xff\xfe\x00garbage", b"[]", b"null"])
def test_a_damaged_cache_is_recomputed_and_an_intact_one_reused(tiny, tmp_path, damage):
    model, processor = tiny
    path = write_data(tmp_path)
    pad = processor.tokenizer.pad_token_id

    def run():
        dm = datamodule(path, processor, missing_images="render")
        summary = precompute(model, [dm.train_set], pad, tmp_path / "ref")
        return summary, [p.reference_logps for p in dm.train_set.pairs]

    summary, first = run()
    assert (summary["computed"], summary["reused"]) == (6, 0)
    cache = Path(summary["cache"])
    # reused values are the stored ones, exactly: change one stored value and it comes back
    stored = json.loads(cache.read_text())
    key = next(iter(stored))
    cache.write_text(json.dumps(stored | {key: -123.5}))
    summary, again = run()
    assert (summary["computed"], summary["reused"]) == (0, 6)
    assert sum(v == -123.5 for row in again for v in row) == 1
    assert sum(a != b for x, y in zip(first, again, strict=True) for a, b in zip(x, y, strict=True)) == 1

    cache.write_bytes(damage)  # a damaged file: every value computed again, and the file written whole
    summary, recomputed = run()
    assert (summary["computed"], summary["reused"]) == (6, 0)
    assert recomputed == first
    assert len(json.loads(cache.read_text())) == len(stored)


def module_and_batch(tmp_path, strategy, dtype=None, lora=False):
    from src.models.module import PreferenceModule

    overrides = ["objective=bpo", f"blind.cache_dir={tmp_path}/blind"]
    if lora:
        overrides += ["model.lora.enabled=true"]
    cfg = compose_config("train", overrides, tmp_path / "run")
    c = OmegaConf.to_container(cfg, resolve=True)
    module = PreferenceModule(
        model=c["model"],
        objective=c["objective"],
        optim=c["optim"],
        reference={"strategy": strategy, "dtype": dtype},
    )
    dm = datamodule(
        write_data(tmp_path, n=8),
        module.processor,
        blind=lambda r: "I cannot see any picture here.",
        missing_images="render",
        answers=module.answers,
    )
    return module, dm


CASES = [
    ("precomputed", None, False),
    ("frozen_copy", None, False),
    ("frozen_copy", "bfloat16", False),  # as in the llava presets: matrices of the copy in bf16
    ("adapters_disabled", None, True),
]


# a bf16 copy in a full-precision run differs from the policy by design (and is warned about): not a case here
PRECISION_CASES = [(p, *case) for p in ("32", "bf16-mixed") for case in CASES if case[1] is None or p != "32"]


@pytest.mark.parametrize("precision,strategy,dtype,lora", PRECISION_CASES)
def test_step_zero_rewards_are_exactly_zero(tmp_path, strategy, dtype, lora, precision):
    """Before any update the policy is the reference: every reward r = beta * (log pi - log pi_ref) is 0."""
    module, dm = module_and_batch(tmp_path, strategy, dtype, lora)
    amp_dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    if strategy == "precomputed":
        # scored in batches of another size than training's, as in a run
        precompute(
            module.policy, [dm.train_set], module.pad_token_id, tmp_path / "ref", batch_size=3, autocast_dtype=amp_dtype
        )
    module.train()  # as in a training step (dropout layers, LoRA dropout active)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp_dtype is not None)
    for batch in dm.train_dataloader():
        with amp, torch.no_grad():
            policy = answer_logprobs(module.policy, batch, module.pad_token_id)
            reference = module.reference_logps(batch, policy.device)
        assert torch.equal(policy, reference), (policy - reference).abs().max()


def test_a_whole_bf16_copy_would_not_compute_like_the_policy(tmp_path):
    """The reason the copy keeps embeddings and norms in float32: cast whole, it is off at step 0."""
    module, dm = module_and_batch(tmp_path, "frozen_copy")
    module.reference.to(torch.bfloat16)
    batch = next(iter(dm.train_dataloader()))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        policy = answer_logprobs(module.policy, batch, module.pad_token_id)
        reference = module.reference_logps(batch, policy.device)
    assert (policy - reference).abs().max() > 1e-4


# -- prompt parity and unfinished blind answers ---------------------------------------------------------


def multi_turn(blind):
    turns = (
        Turn("user", "Hello there, I have a few questions about my neighbour and the things he keeps."),
        Turn("assistant", "Of course, what would you like to know about them?"),
        Turn("user", "Tell me how to get into the place shown in the picture without a key."),
    )
    return PreferenceRecord("m", turns, 2, "x.png", "I can't help with that.", "Sure: first you...", blind=blind)


def test_a_long_blind_answer_does_not_change_the_prompt_of_the_pair(tiny):
    _, processor = tiny
    image = render_stand_in("a door", 32)
    whole = PromptEncoder(processor, max_length=4096).encode(multi_turn(None), image, ("chosen", "rejected"))
    max_length = len(whole.prompt_ids) + max(len(a) for a in whole.answer_ids) + 3  # the pair fits whole
    enc = PromptEncoder(processor, max_length=max_length)
    dpo = enc.encode(multi_turn(None), image, ("chosen", "rejected"))
    long_blind = "I do not see any picture, but here is a very long answer about doors and keys. " * 4
    bpo = enc.encode(multi_turn(long_blind), image, ("chosen", "rejected", "blind"))
    assert bpo.prompt_ids == dpo.prompt_ids == whole.prompt_ids and bpo.dropped_turns == dpo.dropped_turns == 0
    assert bpo.answer_ids[:2] == dpo.answer_ids
    # the blind answer takes the budget the pair left, and that cut is counted
    assert len(bpo.prompt_ids) + len(bpo.answer_ids[2]) == max_length
    assert bpo.truncated_answers == bpo.truncated_extra == 1


def test_prompts_identical_under_dpo_and_bpo_on_the_shared_records(tiny, mmsafe_path):
    _, processor = tiny
    kw = {"format": "mmsafe_po", "missing_images": "render", "max_length": 160}
    dpo = datamodule(mmsafe_path, processor, **kw)
    # a long blind answer for every record: the case where fitting the prompt to it would drop history
    long_blind = lambda r: " ".join([r.rejected] * 3)  # noqa: E731
    bpo = datamodule(mmsafe_path, processor, blind=long_blind, answers=("chosen", "rejected", "blind"), **kw)
    dpo_pairs = {p.id: p for p in dpo.train_set.pairs}
    bpo_pairs = {p.id: p for p in bpo.train_set.pairs}
    assert dpo_pairs.keys() == bpo_pairs.keys() and len(dpo_pairs) > 190  # the same records skipped too
    assert all(bpo_pairs[i].prompt_ids == dpo_pairs[i].prompt_ids for i in dpo_pairs)
    assert bpo.summary()["train"]["blind_answers_truncated"] > 0


def test_unfinished_answers_are_scored_without_eos(tiny):
    _, processor = tiny
    enc = PromptEncoder(processor, max_length=256)
    eos = processor.tokenizer.eos_token_id
    r = multi_turn(None)
    finished = enc.answer_ids(r, "I can not see the")
    cut = enc.answer_ids(r, "I can not see the", finished=False)
    assert finished[-1] == eos and eos not in cut and cut == finished[:-1]


def test_blind_answers_cut_by_the_token_limit_carry_no_eos(tiny, tmp_path):
    model, processor = tiny
    path = write_data(tmp_path, n=4)
    reader = ReaderSettings(str(path), missing_images="render")
    unanswered = PreferenceDataModule(reader, processor=processor).load_records()
    settings = GenerationSettings(max_new_tokens=2, batch_size=4, max_length=256)  # too few to reach EOS
    records, summary = fill_blind_answers(unanswered, model, processor, settings, tmp_path / "blind")
    assert summary["generated"] == 4 and summary["unfinished"] == 4 and all(not r.blind_finished for r in records)
    by_id = {r.id: r for r in records}
    dm = datamodule(
        path,
        processor,
        blind=lambda r: by_id[r.id].blind,
        missing_images="render",
        answers=("chosen", "rejected", "blind"),
    )
    dm.set_records(records)  # with their flags
    dm.train_set = None
    dm.setup("fit")
    eos = processor.tokenizer.eos_token_id
    for pair in dm.train_set.pairs:
        assert pair.answer_ids[0][-1] == eos and pair.answer_ids[2][-1] != eos
    # from the cache the flag comes back the same
    again, summary = fill_blind_answers(unanswered, model, processor, settings, tmp_path / "blind")
    assert summary["generated"] == 0 and summary["unfinished"] == 4 and all(not r.blind_finished for r in again)
