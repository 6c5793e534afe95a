"""LLaVA-NeXT and Qwen2-VL-class models through the same data, scoring, generation and training code."""

import pytest
import torch

from src.data.encoding import PromptEncoder, collate_pairs
from src.data.images import render_stand_in
from src.data.records import PreferenceRecord, Turn
from src.models.generation import AnswerGenerator, GenerationSettings
from src.models.logprobs import add_token_types, answer_logprobs, resolve_layout
from src.models.tiny import build_tiny
from tests.test_train import run_train

RECORDS = [
    PreferenceRecord(
        "a",
        (Turn("user", "Hi"), Turn("assistant", "Hello!"), Turn("user", "What is shown?")),
        2,
        "a.png",
        "I can't help with that.",
        "Sure, here is how to do it.",
        blind="No idea.",
    ),
    PreferenceRecord("b", (Turn("user", "Describe the picture."),), 0, "b.png", "No.", "Yes, happily.", blind="Hm."),
]
SIZES = {"a": (48, 24), "b": (24, 48)}  # different aspect ratios: LLaVA-NeXT picks different tile grids


@pytest.fixture(scope="module", params=["llava_next", "qwen2_vl"])
def family(request):
    model, processor = build_tiny(request.param)
    return request.param, model.eval(), processor


def image_for(record_id):
    return render_stand_in(record_id, 48).resize(SIZES[record_id])


def test_scores_match_single_sequence_forward(family):
    name, model, processor = family
    enc = PromptEncoder(processor, max_length=1024)
    items = []
    for r in RECORDS:
        image = image_for(r.id)
        items.append(
            {
                "pair": enc.encode(r, image, ("chosen", "rejected", "blind")),
                "image_inputs": dict(processor.image_processor(images=image, return_tensors="pt")),
            }
        )
    batch = collate_pairs(items, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        scores = answer_logprobs(model, batch, processor.tokenizer.pad_token_id, "packed")
    for b, item in enumerate(items):
        pair = item["pair"]
        for k, answer in enumerate(pair.answer_ids):
            ids = torch.tensor([pair.prompt_ids + answer])
            with torch.no_grad():
                inputs = add_token_types(model, {"input_ids": ids, **item["image_inputs"]})
                logits = model(**inputs).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            p = len(pair.prompt_ids)
            expected = sum(logp[p - 1 + t, tok].item() for t, tok in enumerate(answer))
            assert scores[b, k].item() == pytest.approx(expected, abs=1e-3), (name, b, k)
    expected_layout = "padded" if name == "qwen2_vl" else "packed"
    assert resolve_layout(model, "packed") == expected_layout


def test_truncation_keeps_every_image_token(family):
    name, _, processor = family
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    full = PromptEncoder(processor, 4096).prompt_ids(RECORDS[0], image_for("a"))
    n_image = full.count(image_token)
    assert n_image > 1
    last_turn = PromptEncoder(processor, 4096).prompt_ids(RECORDS[0], image_for("a"), first_turn=2)
    pair = PromptEncoder(processor, max_length=len(last_turn) + 5).encode(RECORDS[0], image_for("a"))
    assert pair.dropped_turns == 2 and pair.prompt_ids.count(image_token) == n_image
    assert all(len(a) <= 5 for a in pair.answer_ids)


def test_generation_with_and_without_images(family, tmp_path):
    _, model, processor = family

    class Resolver:
        rendered: set = set()

        def __call__(self, record):
            return image_for(record.id) if record.image else None

    gen = AnswerGenerator(model, processor, GenerationSettings(max_new_tokens=3, batch_size=2), Resolver())
    for with_image in (True, False):
        out = gen.run(RECORDS, tmp_path / f"{with_image}.jsonl", with_image=with_image)
        assert set(out) == {"a", "b"} and all(x["num_tokens"] <= 3 for x in out.values())


@pytest.mark.parametrize("model_config", ["tiny_llava_next", "tiny_qwen2_vl"])
def test_families_train_through_the_entry_point(tmp_path, model_config):
    _, metrics = run_train(
        tmp_path, [f"model={model_config}", "trainer.max_steps=2", "logger=csv", "data.max_records=24"]
    )
    assert "val/rewards/accuracies" in metrics and (tmp_path / "run/model/config.json").exists()


def test_two_image_packed_equals_padded(family):
    """chosen_corrupted under a second image of the same size: LLaVA-NeXT's tiles and image_sizes follow the image
    tokens (per record: real, corrupted); Qwen2-VL's patches go the padded way."""
    _, model, processor = family
    enc = PromptEncoder(processor, max_length=1024)
    keys = ("chosen", "rejected", "chosen_corrupted")
    items = []
    for r in RECORDS:
        image = image_for(r.id)
        other = render_stand_in(f"other {r.id}", 48).resize(image.size)
        assert enc.prompt_ids(r, other) == enc.prompt_ids(r, image)
        items.append(
            {
                "pair": enc.encode(r, image, keys),
                "image_inputs": enc.image_inputs(image),
                "answer_image": [0, 0, 1],
                "corrupted_image_inputs": enc.image_inputs(other if r.id == "a" else image),
            }
        )
    batch = collate_pairs(items, processor.tokenizer.pad_token_id)
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        packed = answer_logprobs(model, batch, pad, "packed")
        padded = answer_logprobs(model, batch, pad, "padded")
    assert torch.allclose(packed, padded, atol=1e-4, rtol=0), (packed - padded).abs().max()
    assert abs(packed[0, 0] - packed[0, 2]) > 1e-4  # record a: another image, another score
    assert abs(packed[1, 0] - packed[1, 2]) < 1e-5  # record b: its real image again
