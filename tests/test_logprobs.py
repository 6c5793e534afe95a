import pytest
import torch

from src.data.encoding import PromptEncoder, collate_pairs
from src.data.images import render_stand_in
from src.data.records import PreferenceRecord, Turn
from src.models.logprobs import answer_logprobs, attn_implementation
from src.models.tiny import build_tiny_llava


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex_attention"])
def test_batched_padded_logprobs_match_one_sequence_at_a_time(tiny, impl, request):
    """The packed batch under each attention backend gives the plain forward of one sequence (sdpa, same weights)."""
    model, processor = tiny
    scorer = model
    if impl != "sdpa":
        if impl == "flex_attention":
            request.getfixturevalue("unfused_flex")
        scorer, _ = build_tiny_llava(seed=0, attn_implementation=impl)  # the weights depend only on the seed
        scorer.eval()
    assert attn_implementation(scorer) == impl
    enc = PromptEncoder(processor, max_length=512)
    records = [
        PreferenceRecord(
            "a",
            (Turn("user", "What is shown?"),),
            0,
            "a.png",
            "A refusal.",
            "A long harmful answer " * 3,
            blind="blind text",
        ),
        PreferenceRecord(
            "b",
            (Turn("user", "Hi"), Turn("assistant", "Hello"), Turn("user", "And in the image?")),
            2,
            "b.png",
            "No, sorry, I will not.",
            "Yes.",
            blind="x",
        ),
    ]
    items = []
    for r in records:
        image = render_stand_in(r.id, 32)
        items.append(
            {
                "pair": enc.encode(r, image, ("chosen", "rejected", "blind")),
                "image_inputs": dict(processor.image_processor(images=image, return_tensors="pt")),
            }
        )
    batch = collate_pairs(items, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        batched = answer_logprobs(scorer, batch, processor.tokenizer.pad_token_id)
    assert batched.shape == (2, 3)
    for b, item in enumerate(items):
        pair = item["pair"]
        for j, answer in enumerate(pair.answer_ids):
            ids = torch.tensor([pair.prompt_ids + answer])
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values=item["image_inputs"]["pixel_values"]).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            p = len(pair.prompt_ids)
            expected = sum(logp[p - 1 + t, tok].item() for t, tok in enumerate(answer))
            assert abs(batched[b, j].item() - expected) < 1e-3, (b, j, batched[b, j].item(), expected)


def test_logprobs_carry_gradients_to_the_policy(tiny):
    model, processor = tiny
    enc = PromptEncoder(processor, max_length=512)
    r = PreferenceRecord("a", (Turn("user", "What is shown?"),), 0, "a.png", "A refusal.", "Sure.")
    image = render_stand_in("a", 32)
    batch = collate_pairs(
        [
            {
                "pair": enc.encode(r, image),
                "image_inputs": dict(processor.image_processor(images=image, return_tensors="pt")),
            }
        ],
        processor.tokenizer.pad_token_id,
    )
    logps = answer_logprobs(model, batch, processor.tokenizer.pad_token_id)
    logps.sum().backward()
    head = model.lm_head.weight
    assert head.grad is not None and head.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
