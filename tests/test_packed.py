"""The packed shared-prefix layout gives the padded layout's numbers: log-probs, losses and gradients."""

import dataclasses

import pytest
import torch

from src.data.encoding import PromptEncoder, collate_pairs
from src.data.images import render_stand_in
from src.data.records import PreferenceRecord, Turn
from src.models import logprobs
from src.models.logprobs import answer_logprobs, attn_implementation, packed_rows, padded_rows, resolve_layout
from src.models.objectives import bpo, dpo
from src.models.tiny import build_tiny_llava

RECORDS = [
    PreferenceRecord(
        "single",
        (Turn("user", "What is shown here?"),),
        0,
        "a.png",
        "I can't help with that.",
        "Sure, here is a long and detailed answer that goes on " * 3,
        blind="blind guess",
    ),
    PreferenceRecord(
        "multi",
        (
            Turn("user", "Hello there"),
            Turn("assistant", "Hi! How can I help you today?"),
            Turn("user", "Who is the person in the picture?"),
        ),
        2,
        "b.png",
        "No.",
        "Yes, they are someone.",
        blind="I do not see any picture, but here is a long guess " * 2,
    ),
    PreferenceRecord(
        "text",
        (Turn("user", "A text-only question about safety?"),),
        None,
        None,
        "A careful answer.",
        "A careless answer that is longer.",
        blind="x",
    ),
]


def make_batch(processor, records, keys):
    enc = PromptEncoder(processor, max_length=512)
    items = []
    for r in records:
        image = render_stand_in(r.id, 32) if r.image else None
        inputs = None if image is None else dict(processor.image_processor(images=image, return_tensors="pt"))
        items.append({"pair": enc.encode(r, image, keys), "image_inputs": inputs})
    return collate_pairs(items, processor.tokenizer.pad_token_id)


# flex runs transformers' torch.compile'd kernel, ~30 s to build per input shape on CPU
@pytest.fixture(scope="module", params=["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
def model_and_processor(request):
    model, processor = build_tiny_llava(seed=0, attn_implementation=request.param)
    model.eval()
    return model, processor


def padded_reference(model):
    """The model that computes the padded figures: the model itself, except flex attention on CPU, where an sdpa
    twin with the same weights does. torch's CPU flex kernel reads the padded layout's last, partial block past
    the sequence end and now and then returns NaN for a real answer (measured with torch 2.13: with the model
    itself as reference the text-only test below failed in 2 of 3 runs, always in the padded figures); the packed
    layout, which training uses, is the one under test here."""
    if attn_implementation(model) != "flex_attention" or model.device.type != "cpu":
        return model
    twin, _ = build_tiny_llava(seed=0, attn_implementation="sdpa")
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@pytest.mark.parametrize("keys", [("chosen", "rejected"), ("chosen", "rejected", "blind")])
def test_packed_equals_padded_logprobs(model_and_processor, keys):
    model, processor = model_and_processor
    batch = make_batch(processor, RECORDS[:2], keys)  # both with images: one image tensor per record
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        packed = answer_logprobs(model, batch, pad, layout="packed")
        padded = answer_logprobs(padded_reference(model), batch, pad, layout="padded")
    assert packed.shape == (2, len(keys))
    assert torch.allclose(packed, padded, atol=1e-4, rtol=0), (packed - padded).abs().max()


def test_packed_equals_padded_across_attention_blocks(model_and_processor):
    """Rows several flex blocks (128 tokens) long: whole blocks of one answer are skipped for another."""
    model, processor = model_and_processor
    long = dataclasses.replace(
        RECORDS[0],
        chosen="I will not describe that, for several good reasons. " * 8,
        blind="A guess without the image. " * 12,
    )
    batch = make_batch(processor, [long, RECORDS[1]], ("chosen", "rejected", "blind"))
    pad = processor.tokenizer.pad_token_id
    assert batch["answer_lengths"].sum(0).max() > 256
    with torch.no_grad():
        padded = answer_logprobs(padded_reference(model), batch, pad, "padded")
        diff = answer_logprobs(model, batch, pad, "packed") - padded
    assert diff.abs().max() < 1e-4


def test_packed_equals_padded_on_text_only_records(model_and_processor):
    model, processor = model_and_processor
    batch = make_batch(processor, RECORDS[2:], ("chosen", "rejected", "blind"))
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        padded = answer_logprobs(padded_reference(model), batch, pad, "padded")
        diff = answer_logprobs(model, batch, pad, "packed") - padded
    assert diff.abs().max() < 1e-4


@pytest.mark.parametrize("objective", [dpo, bpo])
def test_same_loss_and_gradients(model_and_processor, objective):
    model, processor = model_and_processor
    if attn_implementation(model) == "flex_attention" and model.device.type == "cpu":
        pytest.skip("torch's flex attention has no backward pass on CPU")
    keys = ("chosen", "rejected", "blind")
    batch = make_batch(processor, RECORDS[:2], keys)
    pad = processor.tokenizer.pad_token_id
    reference = torch.tensor([[-40.0, -90.0, -60.0], [-5.0, -20.0, -80.0]])
    grads, losses = [], []
    for layout in ("packed", "padded"):
        model.zero_grad(set_to_none=True)
        loss = objective(answer_logprobs(model, batch, pad, layout), reference, beta=0.1).loss.mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


def test_flash_attention_falls_back_to_padded(caplog):
    from src.models import logprobs

    logprobs._warned.clear()
    model, _ = build_tiny_llava(seed=0)
    model.config.text_config._attn_implementation = "flash_attention_2"
    with caplog.at_level("WARNING"):
        assert resolve_layout(model, "packed") == "padded"
        assert resolve_layout(model, "packed") == "padded"
    assert sum("padded layout" in r.message for r in caplog.records) == 1  # warned once


def two_image_batch(processor, records, keys, corrupted_image):
    """``make_batch`` plus each record's second image, ``corrupted_image(record_id)``, for chosen_corrupted."""
    enc = PromptEncoder(processor, max_length=512)
    items = []
    for r in records:
        image = render_stand_in(r.id, 32) if r.image else None
        items.append(
            {
                "pair": enc.encode(r, image, keys),
                "image_inputs": enc.image_inputs(image),
                "answer_image": [int(k == "chosen_corrupted") for k in keys],
                "corrupted_image_inputs": enc.image_inputs(corrupted_image(r.id) if r.image else None),
            }
        )
    return collate_pairs(items, processor.tokenizer.pad_token_id)


@pytest.mark.parametrize("keys", [("chosen", "rejected", "chosen_corrupted"), ("chosen_corrupted", "blind", "chosen")])
def test_two_image_packed_equals_padded(model_and_processor, keys):
    """Records with and without an image; the corrupted column first or last."""
    model, processor = model_and_processor
    batch = two_image_batch(processor, RECORDS, keys, lambda rid: render_stand_in(f"other {rid}", 32))
    assert batch["corrupted_pixel_values"].shape == batch["pixel_values"].shape == (2, 3, 32, 32)
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        packed = answer_logprobs(model, batch, pad, layout="packed")
        padded = answer_logprobs(padded_reference(model), batch, pad, layout="padded")
    assert torch.allclose(packed, padded, atol=1e-4, rtol=0), (packed - padded).abs().max()
    chosen, corrupted = keys.index("chosen"), keys.index("chosen_corrupted")
    # another image, another score; the text-only record scores the same text-only prompt twice
    assert (packed[:2, chosen] - packed[:2, corrupted]).abs().min() > 1e-4
    assert abs(packed[2, chosen] - packed[2, corrupted]) < 1e-5


def test_corrupted_column_under_the_real_image_is_the_chosen_one(model_and_processor):
    """The second prefix sees only itself: with the real image again it scores exactly like the first."""
    model, processor = model_and_processor
    keys = ("chosen", "rejected", "blind", "chosen_corrupted")
    batch = two_image_batch(processor, RECORDS[:2], keys, lambda rid: render_stand_in(rid, 32))
    pad = processor.tokenizer.pad_token_id
    rows = packed_rows(batch, pad)
    # per record: prompt twice, every answer once
    lengths = batch["prompt_lengths"] * 2 + batch["answer_lengths"].sum(0)
    assert rows.inputs["input_ids"].shape[1] == lengths.max()
    with torch.no_grad():
        packed = answer_logprobs(model, batch, pad, layout="packed")
    assert torch.allclose(packed[:, 0], packed[:, 3], atol=1e-5, rtol=0), packed


def test_all_real_answer_images_lay_out_as_before(model_and_processor):
    _, processor = model_and_processor
    keys = ("chosen", "rejected", "blind")
    plain = make_batch(processor, RECORDS, keys)
    marked = two_image_batch(processor, RECORDS, keys, lambda rid: render_stand_in(f"other {rid}", 32))
    assert marked["answer_image"].tolist() == [0, 0, 0] and "corrupted_pixel_values" in marked
    pad = processor.tokenizer.pad_token_id
    for build in (packed_rows, padded_rows):
        a, b = build(plain, pad), build(marked, pad)
        assert a.inputs.keys() == b.inputs.keys()
        assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
        assert torch.equal(a.pred_col, b.pred_col) and torch.equal(a.slot, b.slot)


def test_packed_batch_is_one_row_without_padding():
    """Under sdpa and flex the records of a batch lie back to back in one row: no padding at all; one row per
    record (eager, and the layout before) pads every record to the longest."""
    model, processor = build_tiny_llava(seed=0)
    batch = make_batch(processor, RECORDS, ("chosen", "rejected", "blind"))
    pad = processor.tokenizer.pad_token_id
    lengths = (batch["prompt_lengths"] + batch["answer_lengths"].sum(0)).tolist()
    one = packed_rows(batch, pad, one_row=True)
    assert one.inputs["input_ids"].shape == (1, sum(lengths)) and one.padding_tokens == 0
    assert one.spans == (tuple(sum(lengths[:i]) for i in range(3)), tuple(lengths))
    assert one.inputs["attention_mask"].shape == (3, 1, max(lengths), max(lengths))
    per_record = packed_rows(batch, pad)
    assert per_record.padding_tokens == 3 * max(lengths) - sum(lengths) > 0
    # the same tokens, positions and scored targets, only laid out differently
    for i, (start, n) in enumerate(zip(*one.spans, strict=True)):
        assert torch.equal(one.inputs["input_ids"][0, start : start + n], per_record.inputs["input_ids"][i, :n])
        assert torch.equal(one.inputs["position_ids"][0, start : start + n], per_record.inputs["position_ids"][i, :n])
    assert torch.equal(one.target, per_record.target) and torch.equal(one.slot, per_record.slot)
    assert logprobs.padding_share(model, batch, pad) == 0.0
    eager, _ = build_tiny_llava(seed=0, attn_implementation="eager")
    assert logprobs.padding_share(eager, batch, pad) == pytest.approx(per_record.padding_tokens / (3 * max(lengths)))


def test_sdpa_attends_record_by_record(monkeypatch):
    """The one row's attention runs once per record and decoder layer, never over the whole row: a record scores
    the same alone and next to others (mixed image / text-only records, histories, unequal lengths)."""
    from src.models import attention

    model, processor = build_tiny_llava(seed=0)
    model.eval()
    keys = ("chosen", "rejected", "blind")
    pad = processor.tokenizer.pad_token_id
    calls = []  # query lengths of the decoder's attention calls
    sdpa, text = attention._SDPA, model.config.text_config

    def counted(m, q, *a, **k):
        if m.config is text:
            calls.append(q.shape[2])
        return sdpa(m, q, *a, **k)

    monkeypatch.setattr(attention, "_SDPA", counted)
    batch = make_batch(processor, RECORDS, keys)
    with torch.no_grad():
        together = answer_logprobs(model, batch, pad)
        row_calls = list(calls)
        alone = torch.cat([answer_logprobs(model, make_batch(processor, [r], keys), pad) for r in RECORDS])
    lengths = (batch["prompt_lengths"] + batch["answer_lengths"].sum(0)).tolist()
    assert row_calls == lengths * text.num_hidden_layers  # per record and layer, never the whole row
    assert torch.allclose(together, alone, atol=1e-4, rtol=0), (together - alone).abs().max()


def test_attention_wrapper_leaves_other_calls_alone():
    """Without packed records (generation, the vision tower) the sdpa entry is transformers' own function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from src.models import attention

    module = torch.nn.Module()
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    mask = torch.zeros(2, 1, 7, 7)
    ours, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, mask, dropout=0.0, scaling=None)
    theirs, _ = attention._SDPA(module, q, k, v, mask, dropout=0.0, scaling=None)
    assert torch.equal(ours, theirs)
    spans = attention.RecordSpans((0, 3), (3, 4), config=object())
    with pytest.raises(ValueError, match="one row of 7 tokens"):
        module.config = spans.config
        ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, mask, dropout=0.0, **{attention.KWARG: spans})
