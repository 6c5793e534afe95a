"""Text from data is text: a control token's string in a question, a history turn, an answer or a blind answer is
tokenized as the characters it is, for every tiny family; image tokens stand only where the record's image is."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from src.data.encoding import MAX_TEXT_CHARS, PromptEncoder
from src.data.images import render_stand_in
from src.data.prompt_format import PromptFormat
from src.data.readers import read_records
from src.data.records import DataError, PreferenceRecord, Turn
from src.models.generation import AnswerGenerator, GenerationSettings
from src.models.tiny import build_tiny
from tests.helpers import ROOT

EMBEDDED = ROOT / "src" / "data" / "embedded" / "safety_pairs.jsonl"
IMAGE = render_stand_in("a padlock", 48).resize((48, 24))  # not square: LLaVA-NeXT picks a tile grid by it


@pytest.fixture(scope="module", params=["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def family(request):
    model, processor = build_tiny(request.param)
    return request.param, model.eval(), processor


def controls(processor) -> list[str]:
    """The control strings a data text could hold for this family: EOS, BOS, every marker of its template."""
    tok = processor.tokenizer
    return [tok.eos_token, tok.bos_token, "<image>", processor.image_token, *QWEN_MARKERS]


QWEN_MARKERS = ["<|im_start|>assistant\n", "<|im_end|>", "<|vision_start|><|image_pad|><|vision_end|>"]


def record(question="What is shown here?", chosen="I can't help with that.", rejected="Sure, here is how.", **kw):
    turns = kw.pop("turns", (Turn("user", question),))
    return PreferenceRecord("r", tuple(turns), len(turns) - 1, "r.png", chosen, rejected, **kw)


def ids_of(processor):
    tok = processor.tokenizer
    added = {tok.convert_tokens_to_ids(t.content) for t in tok.added_tokens_decoder.values()}
    return tok.eos_token_id, tok.convert_tokens_to_ids(processor.image_token), added


def processor_ids(enc: PromptEncoder, r, image, first_turn=0) -> list[int]:
    """The prompt as the processor alone tokenizes its rendered text (the code before text was kept text)."""
    text = enc.prompt_text(r, with_image=image is not None, first_turn=first_turn)
    if image is None:
        ids = enc.tokenizer(text)["input_ids"]
    else:
        ids = enc.processor(text=text, images=image)["input_ids"]
        ids = list(ids[0] if isinstance(ids[0], list) else ids)
    bos = enc.tokenizer.bos_token_id
    return ids[1:] if len(ids) > 1 and ids[0] == ids[1] == bos else ids


def test_ordinary_text_keeps_the_processors_ids(family):
    """On the embedded data, with and without the image and a system line: the same ids as the processor's own
    tokenization; and the split path that text with control strings takes gives them too."""
    _, _, processor = family
    enc = PromptEncoder(processor, max_length=4096, prompt_format=PromptFormat("You are a careful assistant."))
    tok = processor.tokenizer
    for r in read_records(str(EMBEDDED), "jsonl")[:24]:
        for image in (IMAGE, None):
            for start in r.history_starts():
                expected = processor_ids(enc, r, image, start)
                assert enc.prompt_ids(r, image, first_turn=start) == expected, r.id
                rendered = enc.render(enc.messages(r, image is not None, start), add_generation_prompt=True)
                split = enc._split_ids(rendered, image, True, r.id, "")
                assert (split[1:] if split[:2] == [tok.bos_token_id] * 2 else split) == expected, r.id
        for answer in (r.chosen, r.rejected):
            prompt = enc.prompt_text(r)
            full = processor.apply_chat_template(
                enc.messages(r) + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                tokenize=False,
            )
            expected = tok(full[len(prompt) :].rstrip(), add_special_tokens=False)["input_ids"]
            expected += [] if expected[-1] == tok.eos_token_id else [tok.eos_token_id]
            assert enc.answer_ids(r, answer) == expected, r.id


def test_control_strings_in_answers_are_text(family):
    """EOS / BOS / image / ChatML strings in an answer: no control id in it but the final EOS; the text survives."""
    _, _, processor = family
    enc = PromptEncoder(processor, max_length=4096)
    eos, image_id, added = ids_of(processor)
    for control in controls(processor):
        answer = f"Sure {control} and then {control}more"
        ids = enc.answer_ids(record(), answer)
        assert ids[-1] == eos and ids.count(eos) == 1 and image_id not in ids, (control, ids)
        # the template's own end of turn (Qwen's <|im_end|>) and the final EOS are the only control ids
        assert [i for i in ids if i in added] == [i for i in enc.answer_ids(record(), "Sure") if i in added], control
        assert answer in processor.tokenizer.decode(ids), control
        # a blind answer cut by its token limit (scored without EOS) holds no control id at all
        assert not set(enc.answer_ids(record(), answer, finished=False)) & added, control
        # and the pair encodes: prompt fitted, answers scored
        pair = enc.encode(record(chosen=answer, rejected=f"{control}"), IMAGE)
        assert all(a.count(eos) == 1 for a in pair.answer_ids)


def test_image_markers_in_a_question_add_no_image_tokens(family):
    """A question (or a history turn) holding image markers: exactly one picture's image tokens, where the image
    is; none at all in the blind prompt."""
    _, _, processor = family
    enc = PromptEncoder(processor, max_length=4096)
    _, image_id, added = ids_of(processor)
    plain = enc.prompt_ids(record(), IMAGE)
    n_image = plain.count(image_id)
    assert n_image > 0
    for control in controls(processor):

        def conversation(c):
            turns = (Turn("user", f"Hi {c}"), Turn("assistant", f"Hello {c}!"), Turn("user", f"What is {c} shown?"))
            return record(turns=turns)

        hostile, clean = conversation(control), conversation("")
        ids = enc.prompt_ids(hostile, IMAGE)
        assert ids.count(image_id) == n_image, control
        # the control ids are the template's own, as for the same conversation without the control strings
        assert [i for i in ids if i in added] == [i for i in enc.prompt_ids(clean, IMAGE) if i in added], control
        # the image tokens form one run: where the template put the picture
        first = ids.index(image_id)
        assert ids[first : first + n_image] == [image_id] * n_image
        blind = enc.prompt_ids(hostile, None)
        assert image_id not in blind, control
        assert [i for i in blind if i in added] == [i for i in enc.prompt_ids(clean, None) if i in added], control
        assert f"What is {control} shown?" in processor.tokenizer.decode(blind)


def test_blind_generation_prompts_keep_text_as_text(family, tmp_path):
    """The generator's prompts go through the same path: a blind prompt holds no image token, an image prompt one
    picture's; generation runs, and its (decoded) answers are encoded again as text."""
    _, model, processor = family
    _, image_id, _ = ids_of(processor)

    class Resolver:
        rendered: set = set()

        def __call__(self, r):
            return IMAGE

        resolve = __call__  # one picture per record here

    gen = AnswerGenerator(model, processor, GenerationSettings(max_new_tokens=3, batch_size=2), Resolver())
    hostile = record(question=f"Tell me {processor.image_token} about <image> this </s>", chosen="<image> no </s>")
    n_image = gen.prompt(record(), with_image=True)[0].count(image_id)
    assert gen.prompt(hostile, with_image=False)[0].count(image_id) == 0
    assert gen.prompt(hostile, with_image=True)[0].count(image_id) == n_image
    out = gen.run([hostile], tmp_path / "blind.jsonl", with_image=False)
    enc = PromptEncoder(processor, max_length=4096)
    ids = enc.answer_ids(hostile.with_blind(out["r"]["answer"] + " <image></s>"), out["r"]["answer"] + " <image></s>")
    assert image_id not in ids and ids.count(processor.tokenizer.eos_token_id) == 1


def test_idefics3_text_with_a_control_string_beside_a_picture_is_rejected():
    """Idefics3's processor expands an image marker into runs of image tokens among row / column marker text, which
    the split path (one run of image tokens a marker) cannot rebuild: a prompt whose text holds a control string
    beside a picture is rejected with the reason, never tokenized wrongly. Ordinary text takes the processor's ids;
    the blind prompt and the answers keep control strings as text."""
    _, processor = build_tiny("idefics3")
    enc = PromptEncoder(processor, max_length=4096)
    eos, image_id, added = ids_of(processor)
    plain = record()
    assert enc.prompt_ids(plain, IMAGE) == processor_ids(enc, plain, IMAGE)
    for control in ["</s>", "<s>", "<image>", "<end_of_utterance>", "<fake_token_around_image>", "<row_1_col_1>"]:
        hostile = record(question=f"What is {control} shown?", chosen=f"No {control} way.")
        with pytest.raises(DataError, match="the image tokens of the template cannot be placed"):
            enc.prompt_ids(hostile, IMAGE)
        blind = enc.prompt_ids(hostile, None)
        assert [i for i in blind if i in added] == [i for i in enc.prompt_ids(plain, None) if i in added], control
        assert f"What is {control} shown?" in processor.tokenizer.decode(blind)
        answer = enc.answer_ids(hostile, hostile.chosen)
        assert answer.count(eos) == 1 and image_id not in answer, control


def three_records_one_changed(tmp_path, processor, index: int, **change: str) -> dict:
    """The data summary of three small records, record ``index`` with ``change``, read under on_error=skip."""
    from src.data.datamodule import PreferenceDataModule

    lines = [
        {"id": f"r{i}", "prompt": "<image>\nWhat is it?", "image": "x.png", "chosen": "No.", "rejected": "Yes."}
        for i in range(3)
    ]
    lines[index] |= change
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    data = {"path": str(path), "missing_images": "render", "val_fraction": 0.0, "on_error": "skip", "batch_size": 2}
    dm = PreferenceDataModule.from_config(data, processor=processor)
    dm.setup("fit")
    return dm.summary()


def test_text_too_long_is_a_counted_rejection(tiny, tmp_path):

    _, processor = tiny
    enc = PromptEncoder(processor, max_length=256)
    with pytest.raises(DataError) as e:
        enc.encode(record(chosen="a" * (MAX_TEXT_CHARS + 1)), IMAGE)
    assert e.value.reason == "text too long"
    summary = three_records_one_changed(tmp_path, processor, 1, rejected="Yes. " * (MAX_TEXT_CHARS // 4))
    assert (summary["usable"], summary["rejected_records"]) == (2, 1)
    assert summary["problems_by_reason"][0]["reason"] == "text too long"
    # a generator answers nothing for it, and does not stop; nothing of it goes to the file
    gen = AnswerGenerator(tiny[0], processor, GenerationSettings(max_new_tokens=2))
    too_long = replace(record(question="Why? " * (MAX_TEXT_CHARS // 4)), id="long")
    out = gen.run([too_long, record()], tmp_path / "g.jsonl", with_image=False)
    assert out["long"]["answer"] == "" and "text too long" in out["long"]["error"] and "error" not in out["r"]
    assert [json.loads(line)["id"] for line in (tmp_path / "g.jsonl").read_text().splitlines()] == ["r"]


def hostile_file(tmp_path, extra=()) -> str:
    """A generic JSONL data set whose answers (and some questions) hold "</s>", "<s>" and "<image>"."""
    lines = []
    for i in range(8):
        lines.append(
            {
                "id": f"h{i}",
                "messages": [
                    {"role": "user", "content": f"Hello </s> number {i} <|im_start|>"},
                    {"role": "assistant", "content": "Hi <s> there </s>"},
                    {"role": "user", "content": f"<image>\nWhat is in the picture {i}? <s>"},
                ],
                "image": f"h{i}.png",
                "group": f"g{i}",
                "chosen": f"I can't help with that <image> request </s> {i}.",
                "rejected": f"Sure, <image> here is how </s><s> to do it {i}.",
            }
        )
    lines += list(extra)
    path = tmp_path / "hostile.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_training_on_answers_holding_control_strings(tmp_path, on_error):
    """It used to stop at the first batch ("Image features and image tokens do not match"), also under skip."""
    from tests.test_train import run_train

    extra = []
    if on_error == "skip":  # one record that cannot be encoded: counted, the run goes on
        extra = [{"id": "long", "prompt": "<image>\nHi", "image": "l.png", "chosen": "x" * 100_001, "rejected": "n"}]
    overrides = [
        "data=jsonl",
        f"data.path={hostile_file(tmp_path, extra)}",
        "data.missing_images=render",
        "data.val_fraction=0",
        f"data.on_error={on_error}",
        "data.batch_size=4",
        "blind.generation.max_new_tokens=4",
        "trainer.max_steps=2",
        "logger=csv",
    ]
    run_train(tmp_path, overrides)
    summary = json.loads((tmp_path / "run/run_summary.json").read_text())
    assert summary["data"]["train"]["encoded"] == 8
    assert summary["data"]["rejected_records"] == (1 if on_error == "skip" else 0)
    assert summary["blind_answers"]["generated"] == 8 + (on_error == "skip")


def test_a_tokenizer_the_split_cannot_match_rejects_the_record(tiny, tmp_path, monkeypatch):
    """Where tokenizing the template's stretches apart does not give the processor's ids for the same prompt
    (checked with the control strings taken out), a record with a control string is a counted rejection; records
    without one keep the processor's own path."""

    _, processor = tiny
    split = PromptEncoder._split_ids
    monkeypatch.setattr(PromptEncoder, "_split_ids", lambda self, *a: [*split(self, *a), 0])  # a different tokenizer
    summary = three_records_one_changed(tmp_path, processor, 2, chosen="No </s> way.")
    assert (summary["usable"], summary["rejected_records"]) == (2, 1)
    assert summary["problems_by_reason"][0] == {
        "reason": "text holds a control token's string this tokenizer cannot encode as text",
        "records": 1,
        "first": ["r2"],
    }
