"""A default run prints what a user needs (data summary, where the model went, final figures) and no false alarms."""

import logging
import re

import pytest

from tests.conftest import ROOT
from tests.helpers import compose_config, run_entry

# lines a fresh run or an exact resume must not print: each is false or useless here
NOISE = {
    "CSV logger on the Hydra run folder": r"exists and is not empty",
    "wandb's anonymous setting": r"anonymous setting has no effect",
    "torch LeafSpec deprecation": r"LeafSpec",
    "LitLogger advertisement": r"litlogger|LitLogger",
    "two model summaries": r"already configured with model summary",
    "resume called unreliable": r"not resumable",
    "wandb history tables": r"Run history|Run summary",
    "TPU line on a CPU run": r"TPU available",
    "internal step": r"to estimate number of stepping batches",
    "metric names cut in the bar": r"train/\S*…",
    "a FLOPs figure nothing measured": r"FLOPs|Total Flops",
}
# small and quick: a mid-epoch checkpoint after step 2 (3 batches an epoch), so the resume starts within an epoch
QUICK = [
    "data.max_records=24",
    "trainer.max_steps=2",
    "blind.generation.max_new_tokens=4",
    "callbacks.generation_samples.num_samples=1",
    "callbacks.generation_samples.max_new_tokens=4",
    "callbacks.model_checkpoint.every_n_epochs=null",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]


def run_train(tmp_path, *overrides):
    args = [
        *QUICK,
        f"hydra.run.dir={tmp_path}/run",
        f"blind.cache_dir={tmp_path}/cache",
        f"reference.cache_dir={tmp_path}/ref",
        *overrides,
    ]
    out = run_entry("train.py", *args, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def noise(output):
    """{what: the text found} of each NOISE pattern in ``output``."""
    return {what: m.group(0) for what, pattern in NOISE.items() if (m := re.search(pattern, output))}


@pytest.mark.slow  # two training runs as subprocesses, ~45 s
def test_fresh_run_and_resume_print_no_false_alarms(tmp_path):
    fresh = run_train(tmp_path)
    resumed = run_train(tmp_path, f"ckpt_path={tmp_path}/run/checkpoints/last.ckpt", "trainer.max_steps=4")
    assert "Restored all states from the checkpoint" in resumed  # resumed within the epoch
    assert not noise(fresh) and not noise(resumed), {"fresh run": noise(fresh), "resumed run": noise(resumed)}
    # the embedded data set ships no images: said once, as information
    lines = [line for line in fresh.splitlines() if "images not found" in line]
    assert len(lines) == 1 and "INFO" in lines[0] and "WARNING" not in lines[0], lines
    assert "saved policy and processor to" in fresh and "final metrics: val/" in fresh
    assert re.search(r"params: [\d,]+ trainable, [\d,]+ frozen, [\d,]+ total", fresh)  # the one summary
    # the bar shows short names
    assert re.search(r"loss: [\d.]+", fresh) and "acc:" in fresh and "v_num" not in fresh


def test_missing_images_of_a_real_data_set_are_a_warning(tmp_path, caplog, tiny):
    from src.data.data_settings import ReaderSettings
    from src.data.datamodule import PreferenceDataModule

    data = tmp_path / "pairs.jsonl"
    text = (ROOT / "src/data/embedded/safety_pairs.jsonl").read_text().splitlines()[:4]
    data.write_text("\n".join(text) + "\n")
    with caplog.at_level(logging.INFO, logger="src.data.datamodule"):
        PreferenceDataModule(ReaderSettings(str(data), missing_images="render"), processor=tiny[1]).load_records()
    (record,) = [r for r in caplog.records if "images not found" in r.getMessage()]
    assert record.levelno == logging.WARNING and record.getMessage().startswith("4 images not found")


@pytest.mark.parametrize("mode", ["blind", "image"])
def test_generate_reports_the_stand_ins_it_drew(tmp_path, caplog, monkeypatch, mode):
    import src.data.images as images
    from src.generate import generate

    drawn = []
    render = images.render_stand_in
    monkeypatch.setattr(images, "render_stand_in", lambda text, size=336: drawn.append(text) or render(text, size))
    overrides = [
        f"output={tmp_path}/answers.jsonl",
        "generation.max_new_tokens=3",
        "data.max_records=5",
        f"mode={mode}",
    ]
    with caplog.at_level(logging.INFO):
        generate(compose_config("generate", overrides, tmp_path / "run"))
    messages = [r.getMessage() for r in caplog.records]
    (summary,) = [m for m in messages if "stand-in images:" in m]
    assert int(re.search(r"stand-in images: (\d+)", summary)[1]) == len(drawn) == (5 if mode == "image" else 0)
    # no line says stand-ins are being drawn when none is
    assert drawn or not any("drawing stand-ins" in m for m in messages), messages


def test_a_rerun_into_the_same_folder_keeps_the_earlier_metrics(tmp_path):
    """The CSV logger would delete an earlier metrics.csv of its folder: it is moved aside first, as on a resume."""
    from tests.test_train import run_train as train_in_process

    quick = [
        "logger=csv",
        "data.max_records=16",
        "trainer.max_steps=1",
        "blind.generation.max_new_tokens=4",
        "callbacks.generation_samples=null",
        f"reference.cache_dir={tmp_path}/ref",
    ]
    train_in_process(tmp_path, quick)
    first = (tmp_path / "run/metrics.csv").read_text()
    train_in_process(tmp_path, quick)
    assert (tmp_path / "run/metrics.part1.csv").read_text() == first
    assert (tmp_path / "run/metrics.csv").exists()
