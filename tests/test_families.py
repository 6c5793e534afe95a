"""LLaVA-NeXT, LLaVA-OneVision, Idefics3, Qwen2-VL and Qwen2.5-VL-class models through the same data, scoring,
generation and training code."""

import pytest
import torch

from src.data.encoding import PromptEncoder, collate_pairs
from src.data.images import render_stand_in
from src.data.records import DataError, PreferenceRecord, Turn
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


FAMILIES = ["llava_next", "llava_onevision", "idefics3", "qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
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
    assert resolve_layout(model, "packed") == "packed"  # Qwen-VL: the multimodal positions restart per record


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

        resolve = __call__  # one picture per record here

    gen = AnswerGenerator(model, processor, GenerationSettings(max_new_tokens=3, batch_size=2), Resolver())
    for with_image in (True, False):
        out = gen.run(RECORDS, tmp_path / f"{with_image}.jsonl", with_image=with_image)
        assert set(out) == {"a", "b"} and all(x["num_tokens"] <= 3 for x in out.values())


@pytest.mark.parametrize("model_config", [f"tiny_{name}" for name in FAMILIES])
def test_families_train_through_the_entry_point(tmp_path, model_config):
    _, metrics = run_train(
        tmp_path, [f"model={model_config}", "trainer.max_steps=2", "logger=csv", "data.max_records=24"]
    )
    assert "val/rewards/accuracies" in metrics and (tmp_path / "run/model/config.json").exists()


def test_two_image_packed_equals_padded(family):
    """chosen_corrupted under a second image of the same size: LLaVA-NeXT's tiles and image_sizes follow the image
    tokens (per record: real, corrupted); so do Qwen-VL's patches and grids, each prompt's 3D positions its own."""
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


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", FAMILIES)
def test_packed_equals_padded_per_backend(name, impl):
    """Records with images of two aspect ratios, a text-only one and a column under a second image: the packed
    layout (sdpa: one row, record by record; eager: a row per record) gives the padded layout's log-probs, loss and
    gradients. flex attention: `test_flex_packed_equals_padded` (transformers refuses it for Qwen-VL models)."""
    from src.models.objectives import bpo

    model, processor = build_tiny(name, attn_implementation=impl)
    enc = PromptEncoder(processor, max_length=1024)
    text_only = PreferenceRecord(
        "t", (Turn("user", "A question without a picture?"),), 0, None, "No.", "Sure!", blind=""
    )
    keys = ("chosen", "rejected", "chosen_corrupted")
    items = []
    for r in [*RECORDS, text_only]:
        image = image_for(r.id) if r.image else None
        other = render_stand_in(f"other {r.id}", 48).resize(image.size) if image else None
        items.append(
            {
                "pair": enc.encode(r, image, keys),
                "image_inputs": enc.image_inputs(image),
                "answer_image": [0, 0, 1],
                "corrupted_image_inputs": enc.image_inputs(other),
            }
        )
    batch = collate_pairs(items, processor.tokenizer.pad_token_id)
    pad = processor.tokenizer.pad_token_id
    reference = torch.tensor([[-40.0, -90.0, -60.0], [-5.0, -20.0, -80.0], [-7.0, -9.0, -8.0]])
    scores, grads = [], []
    for layout in ("packed", "padded"):
        model.zero_grad(set_to_none=True)
        logps = answer_logprobs(model, batch, pad, layout)
        bpo(logps, reference, beta=0.1).loss.mean().backward()
        scores.append(logps.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(scores[0], scores[1], atol=1e-4, rtol=0), (scores[0] - scores[1]).abs().max()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        assert torch.allclose(grads[0][key], grads[1][key], atol=1e-5, rtol=1e-4), key
    assert abs(scores[0][2, 0] - scores[0][2, 2]) < 1e-5  # the text-only record: the same prompt twice


@pytest.mark.slow  # flex runs transformers' torch.compile'd kernel, ~30 s to build per input shape on CPU
@pytest.mark.parametrize("name", ["llava_next", "llava_onevision", "idefics3"])
def test_flex_packed_equals_padded(name):
    """Under flex attention the packed row's BlockMask keeps each answer to its prompt; the padded figures come from
    an sdpa twin with the same weights (torch's CPU flex kernel and the padded layout: tests/test_packed.py)."""
    model, processor = build_tiny(name, attn_implementation="flex_attention")
    twin, _ = build_tiny(name, attn_implementation="sdpa")
    enc = PromptEncoder(processor, max_length=1024)
    items = [
        {
            "pair": enc.encode(r, image_for(r.id), ("chosen", "rejected", "blind")),
            "image_inputs": enc.image_inputs(image_for(r.id)),
        }
        for r in RECORDS
    ]
    batch = collate_pairs(items, processor.tokenizer.pad_token_id)
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        packed = answer_logprobs(model.eval(), batch, pad, "packed")
        padded = answer_logprobs(twin.eval(), batch, pad, "padded")
    assert torch.allclose(packed, padded, atol=1e-4, rtol=0), (packed - padded).abs().max()


def test_onevision_template_that_opens_answers_otherwise_is_fitted(caplog):
    """An earlier llava-hf LLaVA-OneVision template writes a space after every role, the assistant's included, but
    its generation prompt has none, so no answer can be told from its prompt: it is replaced by the current one."""
    from src.models.factory import fit_chat_template

    _, processor = build_tiny("llava_onevision")
    earlier = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{% endif %}{% endfor %}"
        "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ '\\n' + item['text'] }}{% endif %}"
        "{% endfor %}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    record = RECORDS[0]
    enc = PromptEncoder(processor, max_length=1024)
    current = enc.prompt_text(record)
    assert current.endswith("<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n")
    caplog.clear()
    assert fit_chat_template(processor) is processor and not caplog.text  # a template that agrees: left alone
    processor.chat_template = earlier
    with pytest.raises(DataError, match="renders the prompt differently"):
        enc.encode(record, image_for(record.id))
    with caplog.at_level("WARNING"):
        assert fit_chat_template(processor) is processor
    assert "llava-hf's current ChatML template" in caplog.text
    assert enc.prompt_text(record) == current
    pair = enc.encode(record, image_for(record.id))
    assert processor.tokenizer.decode(pair.answer_ids[0]) == "I can't help with that.<|im_end|></s>"


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_adapts_the_language_model(name):
    """Adapters on the language model's projections only (``language_model``, Idefics3's ``text_model``), the vision
    tower frozen; the LLaVA-class projector (Idefics3's connector) trained in full."""
    from src.models.factory import build_model, part_of

    model, _ = build_model(tiny={"family": name}, lora={"enabled": True, "r": 4, "alpha": 8})
    named = list(model.named_parameters())
    assert {part_of(n) for n, _ in named if "lora_" in n} == {"language"}
    assert not any(p.requires_grad for n, p in named if part_of(n) == "vision")
    if not name.startswith("qwen"):
        assert all(p.requires_grad for n, p in named if part_of(n) == "projector" and "original_module" not in n)
