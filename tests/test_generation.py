import json
import logging

import pytest

from src.data.images import ImageResolver
from src.data.records import PreferenceRecord, Turn
from src.models.generation import (
    AnswerGenerator,
    GenerationSettings,
    blind_cache_path,
    fill_blind_answers,
    read_generations,
)
from tests.race import WAITING, held, race

SETTINGS = GenerationSettings(max_new_tokens=4, batch_size=2, max_length=256)


def records(n=3, question="What is in the image?"):
    return [
        PreferenceRecord(
            f"r{i}", (Turn("user", f"{question} {i}"),), 0, f"r{i}.png", "c", "r", meta={"entity": f"thing {i}"}
        )
        for i in range(n)
    ]


def test_blind_prompt_has_no_image(tiny):
    model, processor = tiny
    gen = AnswerGenerator(model, processor, SETTINGS, ImageResolver(missing="render", stand_in_size=32))
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    ids, inputs, text = gen.prompt(records(1)[0], with_image=False)
    assert image_id not in ids and inputs is None and text == "USER: What is in the image? 0 ASSISTANT:"
    assert processor.tokenizer.decode(ids) == "<s>" + text
    ids, inputs, _ = gen.prompt(records(1)[0], with_image=True)
    assert ids.count(image_id) == 16 and inputs["pixel_values"].shape[0] == 1


def test_blind_answers_cached_and_reused(tiny, tmp_path):
    model, processor = tiny
    recs = records(3)
    filled, summary = fill_blind_answers(recs, model, processor, SETTINGS, tmp_path)
    assert summary["generated"] == 3 and summary["from_cache"] == 0
    assert all(r.blind is not None for r in filled)
    path = blind_cache_path(tmp_path, model, SETTINGS)
    assert len(path.read_text().splitlines()) == 3

    again, summary = fill_blind_answers(recs, model, processor, SETTINGS, tmp_path)
    assert summary["generated"] == 0 and summary["from_cache"] == 3
    assert [r.blind for r in again] == [r.blind for r in filled]
    assert len(path.read_text().splitlines()) == 3  # nothing appended

    # other generation settings -> another cache file; an edited prompt -> regenerated
    other = GenerationSettings(max_new_tokens=5, batch_size=2, max_length=256)
    assert blind_cache_path(tmp_path, model, other) != path
    edited = records(3, question="Describe the picture.")
    _, summary = fill_blind_answers(edited, model, processor, SETTINGS, tmp_path)
    assert summary["generated"] == 3


def test_given_blind_answers_are_kept(tiny, tmp_path):
    model, processor = tiny
    recs = [r.with_blind("given") for r in records(2)]
    filled, summary = fill_blind_answers(recs, model, processor, SETTINGS, tmp_path)
    assert [r.blind for r in filled] == ["given", "given"] and summary["given_in_data"] == 2
    assert not list(tmp_path.iterdir())


def test_interrupted_file_resumes_without_duplicates(tiny, tmp_path):
    model, processor = tiny
    gen = AnswerGenerator(model, processor, SETTINGS)
    out = tmp_path / "gen.jsonl"
    first = gen.run(records(2), out, with_image=False)
    with open(out, "a") as f:
        f.write('{"id": "r2", "prompt_sha": "tor')  # a write cut short by a kill
    answers = gen.run(records(4), out, with_image=False)
    assert gen.generated == 2 and answers["r0"] == first["r0"]
    assert set(answers["r3"]) == {"id", "prompt_sha", "source", "with_image", "answer", "num_tokens", "finished"}
    # a random tiny model rarely says EOS in 4 tokens; either way the count and the flag agree
    assert all(a["num_tokens"] <= 4 and (a["finished"] or a["num_tokens"] == 4) for a in answers.values())
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines() if line.endswith("}")]
    assert sorted(ids) == ["r0", "r1", "r2", "r3"]


def test_generations_are_redone_when_the_image_changes(tiny, tmp_path):
    """Cached answers to stand-in images are not answers to the real images put in place later."""
    model, processor = tiny
    recs = records(2)
    out = tmp_path / "gen.jsonl"
    stand_ins = AnswerGenerator(model, processor, SETTINGS, ImageResolver(tmp_path, "render", 32))
    stand_ins.run(recs, out, with_image=True)
    assert stand_ins.generated == 2
    from src.data.images import render_stand_in

    render_stand_in("a real photo", 48).save(tmp_path / "r0.png")
    real = AnswerGenerator(model, processor, SETTINGS, ImageResolver(tmp_path, "render", 32))
    real.run(recs, out, with_image=True)
    assert real.generated == 1  # r0 now has its real image; r1 is still the same stand-in


def test_a_shared_output_file_is_not_reused_across_models_or_settings(tiny, tmp_path):
    """`generate.py output=...` names the file itself: lines from another model or settings are redone."""
    import torch

    from src.models.tiny import build_tiny_llava

    model, processor = tiny
    recs = records(2)
    out = tmp_path / "answers.jsonl"
    resolver = ImageResolver(missing="render", stand_in_size=32)
    first = AnswerGenerator(model, processor, SETTINGS, resolver)
    first.run(recs, out, with_image=False)
    same = AnswerGenerator(model, processor, SETTINGS, resolver)
    same.run(recs, out, with_image=False)
    longer = AnswerGenerator(model, processor, GenerationSettings(max_new_tokens=6, batch_size=2), resolver)
    longer.run(recs, out, with_image=False)
    other_model, _ = build_tiny_llava(seed=1)
    with torch.no_grad():
        other = AnswerGenerator(other_model.eval(), processor, SETTINGS, resolver)
        other.run(recs, out, with_image=False)
    assert (first.generated, same.generated, longer.generated, other.generated) == (2, 0, 2, 2)


def test_read_generations_ignores_lines_a_killed_write_can_leave(tmp_path, caplog):
    """Bad JSON, a cut multi-byte character, a line that is not an object or has no id: each is skipped with a
    warning naming its line (and regenerated later); the good lines are read."""
    path = tmp_path / "gen.jsonl"
    good = [json.dumps({"id": i, "answer": "défense"}, ensure_ascii=False).encode() for i in ("a", "b")]
    torn = json.dumps({"id": "c", "answer": "é"}, ensure_ascii=False).encode()[:-3]  # ends inside the two-byte é
    path.write_bytes(b"\n".join([good[0], b"{not json", torn, b"[1, 2]", b'{"answer": "no id"}', good[1]]) + b"\n")
    read = read_generations(path)
    assert set(read) == {"a", "b"} and read["a"]["answer"] == "défense"
    warned = [int(r.getMessage().split(":")[1]) for r in caplog.records if "unreadable line" in r.getMessage()]
    assert warned == [2, 3, 4, 5]


def test_prompts_are_batched_longest_first_and_answers_come_back_in_record_order(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    words = [2, 9, 4, 12, 1]  # prompt lengths out of order: record order is not length order
    recs = [
        PreferenceRecord(f"r{i}", (Turn("user", "why " * n + str(i)),), None, None, "c", "r")
        for i, n in enumerate(words)
    ]
    batches = []
    generate_batch = AnswerGenerator._generate_batch

    def spy(self, prompts):
        batches.append([len(p[0]) for p in prompts])
        return generate_batch(self, prompts)

    monkeypatch.setattr(AnswerGenerator, "_generate_batch", spy)
    out = tmp_path / "sorted.jsonl"
    answers = AnswerGenerator(model, processor, SETTINGS).run(recs, out, with_image=False)
    lengths = [n for batch in batches for n in batch]
    assert len(batches) == 3 and lengths == sorted(lengths, reverse=True)  # batch 2: little left padding
    assert list(answers) == [r.id for r in recs]  # record order, whatever order the file's lines are in
    assert set(read_generations(out)) == set(answers)

    # each prompt alone (no padding, no order): the same greedy answers
    one = GenerationSettings(max_new_tokens=4, batch_size=1, max_length=256)
    alone = AnswerGenerator(model, processor, one).run(recs, tmp_path / "alone.jsonl", with_image=False)
    assert [a["answer"] for a in answers.values()] == [alone[r.id]["answer"] for r in recs]


def _fill_blind_first(model, processor, cache_dir, started, release, queue):
    """A job of the sweep, in its own process: held in its first batch, then fills the cache."""
    AnswerGenerator._generate_batch = held(AnswerGenerator._generate_batch, started, release)
    queue.put(fill_blind_answers(records(3), model, processor, SETTINGS, cache_dir)[1])


def test_concurrent_jobs_generate_each_blind_answer_once(tiny, tmp_path, caplog):
    """Two jobs of a sweep launched together: the second waits for the first, then reuses every line."""
    caplog.set_level(logging.INFO, logger="src.files")
    model, processor = tiny
    first, (filled, second) = race(
        _fill_blind_first,
        (model, processor, tmp_path),
        lambda: fill_blind_answers(records(3), model, processor, SETTINGS, tmp_path),
        caplog,
    )
    assert (first["generated"], second["generated"], second["from_cache"]) == (3, 0, 3)
    lines = [json.loads(line) for line in blind_cache_path(tmp_path, model, SETTINGS).read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == ["r0", "r1", "r2"]  # every answer once, every line whole
    assert [r.blind for r in filled] == [line["answer"] for line in sorted(lines, key=lambda x: x["id"])]
    assert sum(WAITING in r.getMessage() for r in caplog.records) == 1


def test_outputs_gathered_over_devices_must_answer_this_process_prompts():
    """Processes whose prompt lists differ (a shared cache changed between their reads) fail, rather than give a
    record the answer generated for another."""
    from src.models.predict import in_order, prompt_digest

    prompts = [([1, 2], None, "a"), ([3], None, "b")]
    outputs = [(1, prompt_digest(prompts[1]), {"answer": "B"}), (0, prompt_digest(prompts[0]), {"answer": "A"})]
    assert [o["answer"] for o in in_order(prompts, outputs)] == ["A", "B"]
    other = [([3], None, "b"), ([1, 2], None, "a")]  # another process's list: the same prompts, other order
    with pytest.raises(RuntimeError, match="disagree on prompt"):
        in_order(other, outputs)
    with pytest.raises(RuntimeError, match="lost 1 prompts"):
        in_order(prompts, outputs[:1])


def test_generate_output_is_rewritten_in_record_order_keeping_other_records(tmp_path):
    from src.generate import write_in_record_order

    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"id": i, "answer": f"old {i}"}) + "\n" for i in ("x", "b", "a")))
    write_in_record_order(path, ["a", "b"], {"b": {"id": "b", "answer": "B"}, "a": {"id": "a", "answer": "A"}})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"id": "a", "answer": "A"}, {"id": "b", "answer": "B"}, {"id": "x", "answer": "old x"}]
