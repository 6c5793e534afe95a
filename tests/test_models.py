import json

from src.models.factory import build_model, fingerprint, part_of
from tests.helpers import compose_config


def test_tiny_model_is_real_llava_with_vision_frozen():
    model, processor = build_model(tiny={"seed": 0})
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    trainable = {part_of(n) for n, p in model.named_parameters() if p.requires_grad}
    frozen = {part_of(n) for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable == {"projector", "language"} and frozen == {"vision"}
    assert processor.tokenizer.eos_token_id is not None and processor.tokenizer.pad_token_id is not None


def test_tiny_model_is_seeded():
    a, _ = build_model(tiny={"seed": 0})
    b, _ = build_model(tiny={"seed": 0})
    c, _ = build_model(tiny={"seed": 1})
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_local_folder_loads_through_auto_classes_and_generate_cli(tiny, tmp_path):
    from src.generate import generate

    model, processor = tiny
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    loaded, loaded_proc = build_model(name_or_path=str(tmp_path / "m"))
    assert fingerprint(loaded) == fingerprint(model)
    assert (
        loaded_proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": "q"}]}], add_generation_prompt=True, tokenize=False
        )
        == "USER: q ASSISTANT:"
    )

    out = tmp_path / "answers.jsonl"
    overrides = [
        f"model.name_or_path={tmp_path / 'm'}",
        f"output={out}",
        "generation.max_new_tokens=3",
        "data.max_records=5",
        "mode=image",
    ]
    answers = generate(compose_config("generate", overrides, tmp_path / "run"))
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(answers) == 5 and [x["id"] for x in lines] == [f"emb-00{i}" for i in range(1, 6)]
    assert all(x["with_image"] for x in lines)
    generate(compose_config("generate", overrides, tmp_path / "run"))  # resumes: nothing new
    assert len(out.read_text().splitlines()) == 5
