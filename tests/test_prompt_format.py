"""LLaVA-1.5's prompt format: the system prompt and square-padded images reach training, blind answers and
evaluation alike, change every cache key they change the value of, and leave today's prompts as they were when
unset; `PromptFormat`, the one value that carries them, its one config node, its file beside a trained model and
its one default."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from PIL import Image

from src.data.data_settings import ReaderSettings, data_settings
from src.data.datamodule import PreferenceDataModule
from src.data.encoding import PromptEncoder
from src.data.images import ImageResolver
from src.data.prompt_format import ASPECT_RATIOS, PROMPT_FORMAT_FILE, PromptFormat
from src.data.records import PreferenceRecord, Turn
from src.errors import SettingError
from src.models.generation import AnswerGenerator, GenerationSettings, _prompt_sha, fill_blind_answers
from src.models.reference import entry_key
from src.reproduce import ReproduceError, Reproduction
from src.train import check_settings
from tests.helpers import CONFIGS, ROOT, compose_config, precompute

VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SETTINGS = GenerationSettings(max_new_tokens=3, batch_size=2, max_length=256)
LLAVA_1_5 = PromptFormat(system_prompt=VICUNA)
PAD = PromptFormat(image_aspect_ratio="pad")


def wide_image() -> Image.Image:
    """64 x 32: a blue band on the left edge, a green band on the right edge, red between."""
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 8, 32))
    image.paste((0, 255, 0), (56, 0, 64, 32))
    return image


@pytest.fixture
def wide_data(tmp_path) -> Path:
    """A JSONL preference set of 4 records whose images are all `wide_image`."""
    lines = []
    for i in range(4):
        wide_image().save(tmp_path / f"w{i}.png")
        lines.append(
            {
                "id": f"w{i}",
                "messages": [{"role": "user", "content": f"<image>\nWhat is shown here, number {i}?"}],
                "image": f"w{i}.png",
                "group": f"g{i}",
                "chosen": "I cannot help with that.",
                "rejected": "Sure, here is how.",
            }
        )
    path = tmp_path / "wide.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def record(question: str = "What is shown?", image: str | None = "w0.png", system: str | None = None):
    turns = ((Turn("system", system),) if system else ()) + (Turn("user", question),)
    return PreferenceRecord("r0", turns, len(turns) - 1 if image else None, image, "No.", "Yes.")


@pytest.fixture
def seen(monkeypatch):
    """Records the decoded prompt of every `PromptEncoder.prompt_ids` call and the size of every image that
    reaches the image processor (directly or through the processor), whoever calls them."""
    from transformers import CLIPImageProcessorPil

    out = {"prompts": [], "sizes": []}
    prompt_ids, preprocess = PromptEncoder.prompt_ids, CLIPImageProcessorPil.preprocess

    def spy_prompt_ids(self, *args, **kwargs):
        ids = prompt_ids(self, *args, **kwargs)
        out["prompts"].append(self.tokenizer.decode(ids))
        return ids

    def spy_preprocess(self, images, *args, **kwargs):
        out["sizes"] += [im.size for im in (images if isinstance(images, list) else [images])]
        return preprocess(self, images, *args, **kwargs)

    monkeypatch.setattr(PromptEncoder, "prompt_ids", spy_prompt_ids)
    monkeypatch.setattr(CLIPImageProcessorPil, "preprocess", spy_preprocess)
    return out


# -- system prompt -------------------------------------------------------------------------------
def test_system_prompt_renders_as_llava_1_5s_leading_line(tiny):
    _, processor = tiny
    enc = PromptEncoder(processor, prompt_format=LLAVA_1_5)
    assert enc.prompt_text(record()) == f"{VICUNA} USER: <image>\nWhat is shown? ASSISTANT:"
    assert enc.prompt_text(record(), with_image=False) == f"{VICUNA} USER: What is shown? ASSISTANT:"
    # a record's own system turn wins; the configured one is not added beside it
    assert enc.prompt_text(record(system="Be brief.")) == "Be brief. USER: <image>\nWhat is shown? ASSISTANT:"
    # the answer's tokens are the same whatever the prompt before them
    assert enc.answer_ids(record(), "No.") == PromptEncoder(processor).answer_ids(record(), "No.")


def test_null_system_prompt_leaves_prompts_as_the_chat_template_renders_them(tiny):
    _, processor = tiny
    r = record()
    enc = PromptEncoder(processor, prompt_format=PromptFormat(system_prompt=None))
    text = processor.apply_chat_template(r.messages(), add_generation_prompt=True, tokenize=False)
    assert enc.prompt_text(r) == text == "USER: <image>\nWhat is shown? ASSISTANT:"
    assert enc.prompt_ids(r, wide_image()) == processor(text=text, images=wide_image())["input_ids"][0]
    blind = processor.apply_chat_template(r.messages(with_image=False), add_generation_prompt=True, tokenize=False)
    assert enc.prompt_ids(r, None) == processor.tokenizer(blind)["input_ids"]


def test_training_and_blind_prompts_begin_with_the_system_prompt(tmp_path, wide_data, seen, caplog):
    from src.train import train

    overrides = [f"blind.cache_dir={tmp_path}/cache", f"reference.cache_dir={tmp_path}/ref", f"data.path={wide_data}"]
    overrides += ["data.val_fraction=0", "trainer.max_steps=1", "logger=csv", "~callbacks"]
    overrides += ["prompt_format.image_aspect_ratio=pad", f'prompt_format.system_prompt="{VICUNA}"']
    cfg = compose_config("train", overrides, tmp_path / "run")
    assert cfg.prompt_format.system_prompt == VICUNA
    train(cfg)
    # the data.max_length check's shortest prompt (a square stand-in), the blind answers, then the training items
    check, *prompts = seen["prompts"]
    assert check.endswith("USER: " + "<image>" * 16 + "\n? ASSISTANT:"), check
    blind = [p for p in prompts if "<image>" not in p]
    assert len(blind) == 4 and len(prompts) == 8
    assert all(p.startswith(f"<s>{VICUNA} USER: ") for p in seen["prompts"]), seen["prompts"]
    assert seen["sizes"][1:] and set(seen["sizes"][1:]) == {(64, 64)}  # every image padded to a square
    # the saved model says how its prompts were built, and an evaluation that builds them otherwise is warned
    from src.evaluation.runner import trained_prompt_format

    trained = json.loads((tmp_path / "run/model/prompt_format.json").read_text())
    assert trained == {"system_prompt": VICUNA, "image_aspect_ratio": "pad"}
    assert trained_prompt_format(tmp_path / "run/model", PromptFormat(VICUNA, "pad")) == trained
    assert "another prompt format" not in caplog.text
    trained_prompt_format(tmp_path / "run/model", PAD)
    assert "trained with another prompt format" in caplog.text and "system_prompt" in caplog.text


def test_evaluation_prompts_begin_with_the_system_prompt_and_see_padded_images(tmp_path, wide_data, seen):
    from src.eval import evaluate

    overrides = ["benchmark=preference", f"benchmark.path={wide_data}", "judge=keyword", "wandb.enabled=false"]
    overrides += [f"cache_dir={tmp_path}/cache", "generation.max_new_tokens=3", "prompt_format.image_aspect_ratio=pad"]
    overrides += [f'prompt_format.system_prompt="{VICUNA}"']
    report = evaluate(compose_config("eval", overrides, tmp_path / "run"))
    assert report["prompt_format"] == {"system_prompt": VICUNA, "image_aspect_ratio": "pad"}
    assert report["pairwise"]["n"] == 4
    # generation (4) and pairwise scoring (4 x 2 orders): every prompt opens with the system line
    assert len(seen["prompts"]) >= 12
    assert all(p.startswith(f"<s>{VICUNA} USER: ") for p in seen["prompts"]), seen["prompts"]
    assert seen["sizes"] and set(seen["sizes"]) == {(64, 64)}


# -- image padding -------------------------------------------------------------------------------
def test_pad_keeps_the_whole_image_on_a_mean_colour_square(tiny):
    _, processor = tiny
    pad = PromptEncoder(processor, prompt_format=PAD).image_inputs(wide_image())["pixel_values"][0]
    crop = PromptEncoder(processor).image_inputs(wide_image())["pixel_values"][0]
    assert pad.shape == crop.shape == (3, 32, 32)
    # 64 x 64 canvas -> 32 x 32: the image fills rows 8-23; the bands above and below are the mean colour,
    # which normalises to about 0
    assert pad[:, :6].abs().max() < 0.02 and pad[:, 26:].abs().max() < 0.02
    red, green, blue = pad[:, 16]
    assert blue[1] > 1 and red[1] < 0 and green[-2] > 1 and red[-2] < 0  # both edges are kept
    assert red[16] > 1 and blue[16] < 0
    # the centre crop cuts both edges: red everywhere, no padding
    assert (crop[0] > 1).all() and (crop[2] < 0).all()


def test_crop_gives_todays_pixels_exactly(tiny, wide_data):
    _, processor = tiny
    today = processor.image_processor(images=wide_image(), return_tensors="pt")["pixel_values"]
    assert torch.equal(PromptEncoder(processor).image_inputs(wide_image())["pixel_values"], today)
    dm = PreferenceDataModule(ReaderSettings(str(wide_data), val_fraction=0), processor=processor)
    dm.setup()
    assert torch.equal(dm.train_set[0]["image_inputs"]["pixel_values"], today)
    gen = AnswerGenerator(tiny[0], processor, SETTINGS, ImageResolver(default_root=wide_data.parent))
    assert torch.equal(gen.prompt(dm.records[0], with_image=True)[1]["pixel_values"], today)


def test_datamodule_and_generation_see_the_same_padded_pixels(tiny, wide_data):
    model, processor = tiny
    padded = PromptEncoder(processor, prompt_format=PAD).image_inputs(wide_image())["pixel_values"]
    dm = PreferenceDataModule(ReaderSettings(str(wide_data), val_fraction=0), prompt_format=PAD, processor=processor)
    dm.setup()
    assert torch.equal(dm.train_set[0]["image_inputs"]["pixel_values"], padded)
    resolver = ImageResolver(default_root=wide_data.parent)
    gen = AnswerGenerator(model, processor, SETTINGS, resolver, prompt_format=PAD)
    assert torch.equal(gen.prompt(dm.records[0], with_image=True)[1]["pixel_values"], padded)


def test_unknown_aspect_ratio_is_refused(tmp_path):
    with pytest.raises(SettingError, match="prompt_format.image_aspect_ratio must be crop or pad, got 'square'"):
        PromptFormat(image_aspect_ratio="square")
    with pytest.raises(SettingError, match="prompt_format.image_aspect_ratio must be crop or pad, got 'square'"):
        check_settings(compose_config("train", ["prompt_format.image_aspect_ratio=square"]))


# -- cache keys ----------------------------------------------------------------------------------
def test_system_prompt_changes_blind_and_reference_cache_keys(tiny, tmp_path):
    model, processor = tiny
    recs = [
        PreferenceRecord(f"r{i}", (Turn("user", f"What is in picture {i}?"),), 0, "w.png", "No.", "Yes.")
        for i in range(2)
    ]
    _, summary = fill_blind_answers(recs, model, processor, SETTINGS, tmp_path)
    assert summary["generated"] == 2
    _, summary = fill_blind_answers(recs, model, processor, SETTINGS, tmp_path, prompt_format=LLAVA_1_5)
    assert summary["generated"] == 2 and summary["from_cache"] == 0  # not reused across system prompts
    _, summary = fill_blind_answers(recs, model, processor, SETTINGS, tmp_path, prompt_format=LLAVA_1_5)
    assert summary["generated"] == 0

    plain = PromptEncoder(processor).encode(recs[0], wide_image())
    system = PromptEncoder(processor, prompt_format=LLAVA_1_5).encode(recs[0], wide_image())
    assert entry_key(plain, 0, None) != entry_key(system, 0, None)


def test_image_padding_changes_generation_and_reference_cache_keys(tiny, tmp_path, wide_data):
    model, processor = tiny
    resolver = ImageResolver(default_root=wide_data.parent)
    r = record()
    crop = AnswerGenerator(model, processor, SETTINGS, resolver).prompt(r, with_image=True)
    pad = AnswerGenerator(model, processor, SETTINGS, resolver, prompt_format=PAD).prompt(r, with_image=True)
    assert crop[0] == pad[0]  # the same tokens: only the pixels tell the prompts apart
    assert _prompt_sha(r, crop) != _prompt_sha(r, pad)

    summaries = []
    for ratio in ("crop", "pad", "pad"):
        fmt = PromptFormat(image_aspect_ratio=ratio)
        dm = PreferenceDataModule(
            ReaderSettings(str(wide_data), val_fraction=0), prompt_format=fmt, processor=processor
        )
        dm.setup()
        summaries.append(precompute(model, [dm.train_set], processor.tokenizer.pad_token_id, tmp_path))
    # one cache file: the entries are keyed on the pixel inputs, which padding changes
    assert [s["computed"] for s in summaries] == [4, 4, 0] and [s["reused"] for s in summaries] == [0, 0, 4]


# -- configs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", ["bpo_llava", "dpo_llava"])
def test_llava_presets_use_the_papers_prompt_padding_and_batch(experiment):
    cfg = compose_config("train", [f"experiment={experiment}"])
    assert PromptFormat.from_config(cfg.prompt_format) == PromptFormat(VICUNA, "pad")
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * cfg.trainer.devices == 8
    for model in ("llava_1_5_7b", "llava_1_5_13b", "llava_1_5_7b_random"):  # the presets choose Vicuna's line
        assert compose_config("train", [f"model={model}"]).prompt_format == LLAVA_1_5.to_dict()
        assert compose_config("generate", [f"model={model}"]).prompt_format == LLAVA_1_5.to_dict()
    assert compose_config("eval", ["prompt_format=vicuna"]).prompt_format == LLAVA_1_5.to_dict()


def test_defaults_keep_no_system_prompt_and_crop():
    for name in ("train", "eval", "generate", "validate"):  # one config node, read the same way by every entry point
        cfg = compose_config(name, [])
        assert cfg.prompt_format == {"system_prompt": None, "image_aspect_ratio": "crop"}
        assert PromptFormat.from_config(cfg.prompt_format) == PromptFormat()


def reproduction(tmp_path: Path, overrides: list[str]) -> Reproduction:
    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3")
    cfg = compose("reproduce", [*overrides, f"paths.log_dir={tmp_path / 'logs'}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "out")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return Reproduction(cfg)


def test_reproduction_evaluates_with_the_runs_prompt_format(tmp_path, monkeypatch):
    import src.eval

    try:
        r = reproduction(tmp_path, ["experiment=reproduce_llava"])
        r.format = r.prompt_format()
        assert r.format == PromptFormat(VICUNA, "pad")
        monkeypatch.setattr(src.eval, "evaluate", lambda cfg: cfg)
        cfg = r.evaluate("bpo", 0, "some/model", None, {"path": "x.json"})
        assert cfg.prompt_format == {"system_prompt": VICUNA, "image_aspect_ratio": "pad"}

        arms = "arms.bpo=['experiment=bpo_tiny','prompt_format.image_aspect_ratio=pad']"
        r = reproduction(tmp_path, ["experiment=reproduce_tiny", arms])
        with pytest.raises(ReproduceError, match="different prompt formats"):
            r.prompt_format()
    finally:
        GlobalHydra.instance().clear()


# -- PromptFormat --------------------------------------------------------------------------------
def test_prompt_format_round_trips_through_its_file_and_its_config_node(tmp_path):
    for fmt in (PromptFormat(), PAD, LLAVA_1_5, PromptFormat(VICUNA, "pad"), PromptFormat("", "crop")):
        assert PromptFormat.from_json(fmt.to_json()) == fmt == PromptFormat.from_dict(fmt.to_dict())
        assert PromptFormat.from_config(OmegaConf.create(fmt.to_dict())) == fmt
        fmt.write(tmp_path)
        assert PromptFormat.read(tmp_path) == fmt
    assert PromptFormat.read(tmp_path / "elsewhere") is None  # a model from elsewhere says nothing
    assert PromptFormat.from_config(None) == PromptFormat()


def test_prompt_format_file_is_the_one_models_were_trained_with_before(tmp_path):
    """The same keys, the same bytes: a file written before reads, and one written now reads the same way."""
    before = json.dumps({"system_prompt": VICUNA, "image_aspect_ratio": "pad"}, indent=2)
    assert PromptFormat(VICUNA, "pad").to_json() == before
    (tmp_path / PROMPT_FORMAT_FILE).write_text(before)
    assert PromptFormat.read(tmp_path) == PromptFormat(VICUNA, "pad")
    (tmp_path / PROMPT_FORMAT_FILE).write_text(json.dumps({"image_aspect_ratio": "crop"}))  # a key left out: default
    assert PromptFormat.read(tmp_path) == PromptFormat()


def test_prompt_format_is_checked_once_with_the_key_named():
    assert ASPECT_RATIOS == ("crop", "pad")
    with pytest.raises(SettingError, match="prompt_format.system_prompt must be text or null, got 3"):
        PromptFormat(system_prompt=3)
    with pytest.raises(SettingError, match=r"prompt_format.template is not a prompt format setting"):
        PromptFormat.from_dict({"template": "x"})
    with pytest.raises(SettingError, match=r"prompt_format.json.colour is not a prompt format setting"):
        PromptFormat.from_json('{"colour": [0, 0, 0]}')
    with pytest.raises(SettingError, match="prompt_format.image_aspect_ratio must be crop or pad, got 'wide'"):
        PromptFormat.from_json('{"image_aspect_ratio": "wide"}')


def test_pad_fills_with_the_processors_mean_colour(tiny):
    _, processor = tiny
    colour = PromptFormat.pad_colour(processor.image_processor)
    assert colour == tuple(int(x * 255) for x in processor.image_processor.image_mean)
    padded = PAD.fit_image(wide_image(), processor.image_processor)
    assert padded.size == (64, 64) and padded.getpixel((0, 0)) == colour and padded.getpixel((0, 16)) == (0, 0, 255)
    assert PromptFormat().fit_image(wide_image(), processor.image_processor).size == (64, 32)


def test_the_aspect_ratio_default_is_written_once():
    """ "crop" as the default of the aspect ratio is written in one place, PromptFormat's field; the config node's
    default (prompt_format=default) is registered from it, and no entry point or layer below sets one of its own."""
    default = re.compile(r"aspect_ratio\W{1,6}(?:str\s*=\s*)?[\"']?crop\b(?!\s*(?:\||or\b))")
    files = [*sorted((ROOT / "src").rglob("*.py")), *sorted(CONFIGS.rglob("*.yaml"))]
    hits = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for path in files
        for line in path.read_text(encoding="utf-8").splitlines()
        if default.search(line)
    ]
    assert hits == ['src/data/prompt_format.py: image_aspect_ratio: str = "crop"'], hits
    # and no Python literal "crop" elsewhere but the corrupted image's kind (mDPO's crop, src/data/images.py)
    literals = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "src").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and node.value == "crop"
    }
    assert literals == {"src/data/prompt_format.py", "src/data/images.py"}, literals
    assert not (CONFIGS / "prompt_format" / "default.yaml").exists()  # registered from the class, not written again


@pytest.mark.parametrize(
    ("config", "override", "moved_to"),
    [
        ("train", '+model.system_prompt="Be brief."', "prompt_format.system_prompt"),
        ("train", "+data.image_aspect_ratio=pad", "prompt_format.image_aspect_ratio"),
        ("train", "+data.answers=[chosen]", "objective.answers"),
        ("train", "+data.corruption={kind: blank}", "objective.corruption"),
        ("eval", "+image_aspect_ratio=pad", "prompt_format.image_aspect_ratio"),
        ("eval", '+model.system_prompt="Be brief."', "prompt_format.system_prompt"),
    ],
)
def test_a_moved_key_names_the_key_that_holds_it_now(config, override, moved_to):
    from src.settings import EVALUATE, TRAIN, check_ranges

    cfg = compose_config(config, [override])
    old = override.lstrip("+").split("=")[0]
    with pytest.raises(SettingError, match=f"{re.escape(old)} is no setting any more: set {re.escape(moved_to)}"):
        check_ranges(cfg, TRAIN if config == "train" else EVALUATE)
    if old.startswith("data."):  # however the data config reaches the data module
        with pytest.raises(SettingError, match=f"{re.escape(old)} is no setting any more: set {re.escape(moved_to)}"):
            data_settings(cfg.data)
