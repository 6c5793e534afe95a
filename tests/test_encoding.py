import torch

from src.data.encoding import PromptEncoder, collate_pairs
from src.data.images import render_stand_in
from src.data.records import PreferenceRecord, Turn
from src.models.logprobs import packed_rows, padded_rows

IMAGE = render_stand_in("a padlock", 32)


def record(
    turns=None, chosen="I can't help with that, but a locksmith can.", rejected="Sure, here is how.", blind=None
):
    turns = turns or [Turn("user", "How do I open the lock in the picture?")]
    return PreferenceRecord(
        id="r1",
        turns=tuple(turns),
        image_turn=len(turns) - 1,
        image="p.png",
        chosen=chosen,
        rejected=rejected,
        blind=blind,
    )


def image_tokens(ids, processor):
    return sum(i == processor.tokenizer.convert_tokens_to_ids("<image>") for i in ids)


def test_prompt_through_chat_template_and_answers_end_with_eos(tiny):
    _, processor = tiny
    enc = PromptEncoder(processor, max_length=256)
    pair = enc.encode(record(), IMAGE, ("chosen", "rejected"))
    tok = processor.tokenizer
    # the processor expanded the single image marker into the model's image tokens, none added by hand
    assert image_tokens(pair.prompt_ids, processor) == 16
    # BOS first, as the tokenizer adds it at inference, then the rendered template
    assert pair.prompt_ids[0] == tok.bos_token_id and pair.prompt_ids.count(tok.bos_token_id) == 1
    text = tok.decode([i for i in pair.prompt_ids[1:] if tok.convert_ids_to_tokens(i) != "<image>"])
    assert text == "USER: \nHow do I open the lock in the picture? ASSISTANT:"
    for ids, answer in zip(
        pair.answer_ids, ("I can't help with that, but a locksmith can.", "Sure, here is how."), strict=True
    ):
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids) == " " + answer + "</s>"


def test_collation_masks_prompt_and_padding(tiny):
    _, processor = tiny
    enc = PromptEncoder(processor, max_length=256)
    r_long = record(
        turns=[Turn("user", "Hi"), Turn("assistant", "Hello!"), Turn("user", "What is in the image?")],
        blind="I do not know.",
    )
    r_short = record(chosen="No.", blind="Maybe.")
    items = []
    for r in (r_long, r_short):
        pair = enc.encode(r, IMAGE, ("chosen", "rejected", "blind"))
        items.append({"pair": pair, "image_inputs": dict(processor.image_processor(images=IMAGE, return_tensors="pt"))})
    batch = collate_pairs(items, processor.tokenizer.pad_token_id)
    assert batch["answer_ids"].shape[:2] == (3, 2)
    assert batch["pixel_values"].shape[0] == 2
    pad = processor.tokenizer.pad_token_id
    rows = padded_rows(batch, pad)
    assert rows.inputs["pixel_values"].shape[0] == 6  # image repeated per answer row
    for j in range(3):
        for b, item in enumerate(items):
            row, pair = j * 2 + b, item["pair"]
            p, a = len(pair.prompt_ids), len(pair.answer_ids[j])
            assert rows.inputs["input_ids"][row, :p].tolist() == pair.prompt_ids
            assert rows.inputs["input_ids"][row, p : p + a].tolist() == pair.answer_ids[j]
            assert rows.inputs["attention_mask"][row].sum() == p + a
            # only answer tokens are scored, each predicted by the position before it: never prompt,
            # image or padding tokens
            scored = rows.slot == b * 3 + j
            assert (rows.pred_row[scored] == row).all()
            assert rows.pred_col[scored].tolist() == list(range(p - 1, p + a - 1))
            assert rows.target[scored].tolist() == pair.answer_ids[j]

    packed = packed_rows(batch, pad)
    assert packed.inputs["pixel_values"].shape[0] == 2  # the vision tower runs once per record
    mask = packed.inputs["attention_mask"][:, 0]
    for b, item in enumerate(items):
        pair = item["pair"]
        p = len(pair.prompt_ids)
        starts = [p]
        for ans in pair.answer_ids:
            starts.append(starts[-1] + len(ans))
        assert packed.inputs["input_ids"][b, :p].tolist() == pair.prompt_ids
        for j, ans in enumerate(pair.answer_ids):
            s0, s1 = starts[j], starts[j + 1]
            assert packed.inputs["input_ids"][b, s0:s1].tolist() == ans
            assert packed.inputs["position_ids"][b, s0:s1].tolist() == list(range(p, p + len(ans)))
            # each answer sees the whole prompt and itself (causally), never another answer
            assert mask[b, s1 - 1, :p].all() and mask[b, s1 - 1, s0:s1].all()
            assert not mask[b, s1 - 1, p:s0].any() and not mask[b, s0, s0 + 1 : s1].any()
            scored = packed.slot == b * 3 + j
            assert packed.pred_col[scored].tolist() == [p - 1, *range(s0, s1 - 1)]
            assert packed.target[scored].tolist() == ans
        assert not mask[b, :p, p:].any()  # the prompt never sees answers


def test_truncation_drops_history_then_shortens_answers_never_image_tokens(tiny):
    _, processor = tiny
    history = [
        Turn("user", "Tell me a long story about locks and keys " * 4),
        Turn("assistant", "Once upon a time " * 8),
        Turn("user", "Which lock is in the image?"),
    ]
    r = record(turns=history, chosen="A long careful refusal that explains the risks " * 3)
    full = PromptEncoder(processor, max_length=1024).encode(r, IMAGE)
    assert full.dropped_turns == 0 and full.truncated_answers == 0
    short_prompt = len(PromptEncoder(processor, 1024).prompt_ids(r, IMAGE, first_turn=2))
    longest = max(len(a) for a in full.answer_ids)

    # budget that fits the last turn and full answers: history dropped, answers intact
    dropped = PromptEncoder(processor, max_length=short_prompt + longest).encode(r, IMAGE)
    assert dropped.dropped_turns == 2 and dropped.answer_ids == full.answer_ids
    assert image_tokens(dropped.prompt_ids, processor) == 16

    # tighter: answers are cut from the end, the prompt (and its image tokens) stays whole
    cut = PromptEncoder(processor, max_length=short_prompt + 10).encode(r, IMAGE)
    assert len(cut.prompt_ids) == short_prompt and image_tokens(cut.prompt_ids, processor) == 16
    assert cut.truncated_answers >= 1
    assert all(len(a) <= 10 for a in cut.answer_ids)
    assert cut.answer_ids[0] == full.answer_ids[0][:10]

    # no room for min_answer_tokens after the shortest prompt: the record is skipped with a reason
    assert (
        PromptEncoder(processor, max_length=short_prompt + 2, min_answer_tokens=4).encode(r, IMAGE) == "prompt_too_long"
    )


def test_datamodule_counts_skips_and_reports(tiny, tmp_path):
    import json

    from src.data.datamodule import PreferenceDataModule

    _, processor = tiny
    lines = [
        {
            "id": f"r{i}",
            "prompt": "<image>\n" + ("word " * (5 if i else 400)),
            "image": "x.png",
            "chosen": "c",
            "rejected": "r",
            "group": f"g{i}",
        }
        for i in range(6)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    data = {"path": str(path), "missing_images": "render", "max_length": 128, "val_fraction": 0.0, "batch_size": 4}
    dm = PreferenceDataModule.from_config(data, processor=processor)
    dm.setup("fit")
    summary = dm.summary()
    assert summary["records_read"] == 6
    assert summary["train"]["encoded"] == 5 and summary["train"]["skipped_by_reason"] == {"prompt_too_long": 1}
    assert summary["stand_in_images"] == 5  # the usable records; the skipped one is not counted
    batch = next(iter(dm.train_dataloader()))
    assert batch["answer_ids"].shape[0] == 2 and len(batch["ids"]) == 4
    assert isinstance(batch["pixel_values"], torch.Tensor)


def test_several_pictures_are_refused_with_a_counted_reason_until_encoded(tiny, tmp_path, monkeypatch):
    """Where a family does not encode several pictures yet, a record with two is never encoded as if it held one:
    the encoder refuses it, and the data module counts it as rejected under one reason naming the processor; its
    one-picture neighbours are encoded."""
    import json

    import pytest

    from src.data import encoding
    from src.data.datamodule import PreferenceDataModule
    from src.data.records import DataError

    monkeypatch.setattr(encoding, "SEVERAL_PICTURES", ())  # LLaVA-1.5 encodes them: stand for a family that does not
    _, processor = tiny
    two = PreferenceRecord(
        id="two",
        turns=(Turn("user", "Compare them."),),
        image_turn=0,
        image="a.png",
        images=("a.png", "b.png"),
        image_turns=(0, 0),
        chosen="c",
        rejected="r",
    )
    enc = PromptEncoder(processor, max_length=256)
    with pytest.raises(DataError, match="record two: 2 pictures; several pictures per record: not supported by Llava"):
        enc.encode(two, IMAGE, ("chosen", "rejected"))
    with pytest.raises(DataError, match="several pictures per record"):
        enc.prompt_ids(two, IMAGE)
    assert image_tokens(enc.prompt_ids(two, None), processor) == 0

    lines = [
        {"id": f"one{i}", "prompt": "<image>\nq", "image": "x.png", "chosen": "c", "rejected": "r"} for i in range(2)
    ]
    lines += [
        {"id": f"two{i}", "prompt": "<image><image>\nq", "images": ["x.png", "y.png"], "chosen": "c", "rejected": "r"}
        for i in range(2)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    data = {"path": str(path), "missing_images": "render", "max_length": 128, "val_fraction": 0.0, "on_error": "skip"}
    dm = PreferenceDataModule.from_config(data, processor=processor)
    dm.setup("fit")
    assert dm.summary()["train"]["encoded"] == 2 and dm.summary()["train"]["rejected"] == 2
    groups = dm.problem_groups()
    assert [(g["reason"], g["records"]) for g in groups] == [
        ("several pictures per record: not supported by LlavaProcessor yet", 2)
    ]
