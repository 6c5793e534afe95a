import copy
import json

import torch

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


def test_fingerprint_reads_every_weight_value():
    """Two models that share only the first and last 8 values of each tensor, or differ in one value in the
    middle of one tensor, are different models: their caches must not be shared."""
    model, _ = build_model(tiny={"seed": 0})
    base = fingerprint(model)
    most = copy.deepcopy(model)
    with torch.no_grad():
        for p in most.parameters():
            flat = p.view(-1)
            flat[8:-8] += 1.0
    one = copy.deepcopy(model)
    largest = max(one.parameters(), key=torch.Tensor.numel)
    with torch.no_grad():
        largest.view(-1)[largest.numel() // 2] += 1e-3
    assert len({base, fingerprint(most), fingerprint(one)}) == 3
    assert fingerprint(copy.deepcopy(model)) == base  # the same values: the same fingerprint


def test_fingerprint_counts_buffers_and_reads_half_precision_as_stored():
    model, _ = build_model(tiny={"seed": 0})
    model.register_buffer("running_stat", torch.zeros(100))
    base = fingerprint(model)
    model.running_stat[50] = 1.0
    assert fingerprint(model) != base
    half, _ = build_model(tiny={"seed": 0}, dtype="bfloat16")
    nudged = copy.deepcopy(half)
    weight = max(nudged.parameters(), key=torch.Tensor.numel)
    with torch.no_grad():  # the next bfloat16 value: lost if values were rounded before hashing
        bits = weight.view(-1)[1000:1001].view(torch.int16)
        bits += 1
    assert fingerprint(nudged) != fingerprint(half)


def test_fingerprint_does_not_depend_on_how_tensors_are_chunked(monkeypatch):
    """Weights are hashed a chunk at a time (a model on a GPU comes to the CPU 64 MB at a time); the chunk size
    does not change the fingerprint, nor does the device (on a machine with a GPU)."""
    import src.models.factory as factory

    model, _ = build_model(tiny={"seed": 0})
    base = fingerprint(model)
    monkeypatch.setattr(factory, "FINGERPRINT_CHUNK_BYTES", 1000)  # most tensors in several chunks
    assert fingerprint(model) == base
    if torch.cuda.is_available():
        assert fingerprint(model.to("cuda")) == base


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


def test_weight_files_are_digested_once_while_unchanged(tmp_path, monkeypatch):
    """A checkpoint's weight files are read once: the digest cache keeps each by absolute path, size and
    modification time; a file written again (new size or time) is read again. A copy elsewhere has the same
    fingerprint (it digests bytes, not where or when they were written)."""
    import hashlib
    import os
    import shutil

    from src.models import source

    cache = tmp_path / "digests.json"
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # not a weight file: not read
    (folder / "model.safetensors").write_bytes(b"a" * 1000)
    (folder / "sub" / "extra.bin").write_bytes(b"b" * 10)
    reads = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        reads.append(os.path.basename(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(source, "open", counting_open, raising=False)
    first = source.weights_fingerprint(folder, cache)
    assert sorted(reads) == ["extra.bin", "model.safetensors"]
    entry = json.loads(cache.read_text())[str(folder / "model.safetensors")]
    assert entry["sha256"] == hashlib.sha256(b"a" * 1000).hexdigest()
    reads.clear()
    assert source.weights_fingerprint(folder, cache) == first and reads == []  # from the cache: nothing read

    copy_ = tmp_path / "copy"
    shutil.copytree(folder, copy_)
    assert source.weights_fingerprint(copy_, cache) == first  # same bytes, another place and time

    weights = folder / "model.safetensors"
    st = weights.stat()
    weights.write_bytes(b"c" * 1000)  # the same size, written again: a new modification time
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    reads.clear()
    changed = source.weights_fingerprint(folder, cache)
    assert changed != first and reads == ["model.safetensors"]
    weights.write_bytes(b"c" * 999)  # another size
    reads.clear()
    assert source.weights_fingerprint(folder, cache) not in (first, changed) and reads == ["model.safetensors"]
    assert source.weights_fingerprint(tmp_path / "missing", cache) is None
    assert source.weights_fingerprint("org/hub-id", cache) is None


def test_digest_cache_defaults_to_the_project_cache_dir(monkeypatch, tmp_path):
    from src.models import source

    monkeypatch.delenv(source.DIGEST_CACHE_ENV, raising=False)
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    assert source.digest_cache_path() == tmp_path / "logs" / "cache" / "file-digests.json"
