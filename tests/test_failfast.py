"""Every entry point checks paths and settings before it loads anything: a missing model or data file is one error
line naming the setting and the path, exit code 2, no stack trace, in seconds (with and without HF_HUB_OFFLINE)."""

from __future__ import annotations

import json
import resource
import subprocess
import time

import pytest

from tests.helpers import run_entry

NO_HUB_ID = "no-such-org-xyz/no-such-model"
# imports included (about 12 s of CPU for torch, transformers and lightning); loading a model takes far longer.
# CPU time is the measure because the machine may be shared (four jobs on 2 cores made one run take 113 s of wall
# time for 16 s of CPU); the wall-clock bound only catches a hang on the network (download retries: ~60 s of waiting
# on top of the start-up), so it is loose.
CPU_SECONDS = 30
WALL_SECONDS = 240


def run(
    tmp_path, script: str, *args: str, offline: bool = True
) -> tuple[subprocess.CompletedProcess, tuple[float, float]]:
    """``python src/<script>`` with an empty Hugging Face cache and a hub endpoint that refuses connections."""
    env = {
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_OFFLINE": "1" if offline else None,
        "TRANSFORMERS_OFFLINE": None,  # the other variable that forbids downloads: the user's may be set
    }
    (tmp_path / "hf_home").mkdir(exist_ok=True)
    start, cpu = time.monotonic(), children_cpu()
    out = run_entry(script, *args, run_dir=f"{tmp_path}/run", env=env, timeout=300)
    return out, (time.monotonic() - start, children_cpu() - cpu)


def children_cpu() -> float:
    """User + system CPU seconds of this process's finished child processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_error_line(out: subprocess.CompletedProcess, seconds: tuple[float, float], *named: str) -> str:
    """Exit 2, no traceback, exactly one ERROR line, naming each of ``named``, soon; returns that line."""
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if "ERROR" in line]
    assert len(errors) == 1, text[-3000:]
    for word in named:
        assert word in errors[0], errors[0]
    wall, cpu = seconds
    assert cpu < CPU_SECONDS and wall < WALL_SECONDS, f"{cpu:.0f} s of CPU, {wall:.0f} s to the error"
    return errors[0]


@pytest.mark.parametrize(
    ("script", "key"),
    [
        ("train.py", "model.name_or_path"),
        # each subprocess costs ~12 s of imports: one entry point in the fast suite, the others in the slow one
        pytest.param("eval.py", "model.path", marks=pytest.mark.slow),
        pytest.param("generate.py", "model.name_or_path", marks=pytest.mark.slow),
        pytest.param("reproduce.py", "base.path", marks=pytest.mark.slow),
    ],
)
def test_a_missing_local_model_is_one_line(tmp_path, script, key):
    missing = tmp_path / "no" / "model"
    extra = ["experiment=reproduce_tiny"] if script == "reproduce.py" else []
    out, seconds = run(tmp_path, script, *extra, f"{key}={missing}")
    line = one_error_line(out, seconds, key, str(missing))
    assert "no such folder or checkpoint" in line


@pytest.mark.parametrize("offline", [pytest.param(True, marks=pytest.mark.slow), False])
def test_a_hub_id_that_is_not_cached_is_one_line(tmp_path, offline):
    out, seconds = run(tmp_path, "train.py", f"model.name_or_path={NO_HUB_ID}", offline=offline)
    line = one_error_line(
        out, seconds, "model.name_or_path", NO_HUB_ID, "neither a local folder nor in the Hugging Face cache"
    )
    assert ("HF_HUB_OFFLINE forbids downloading" in line) == offline


@pytest.mark.slow
def test_a_folder_without_a_checkpoint_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out, seconds = run(tmp_path, "generate.py", f"model.name_or_path={empty}")
    one_error_line(out, seconds, "model.name_or_path", str(empty), "no config.json")


@pytest.mark.slow
def test_train_checks_the_data_file_before_the_model(tmp_path):
    """Both wrong: the data file is named, so it was checked before the model (and before anything loaded)."""
    data = tmp_path / "no.jsonl"
    out, seconds = run(tmp_path, "train.py", "data=jsonl", f"data.path={data}", f"model.name_or_path={NO_HUB_ID}")
    line = one_error_line(out, seconds, "data.path", str(data))
    assert NO_HUB_ID not in line


@pytest.mark.slow
def test_eval_checks_the_llama_guard_model_before_any_generation(tmp_path):
    guard = tmp_path / "no" / "guard"
    args = ["benchmark=preference", "judge=llama_guard", f"judge.model_name_or_path={guard}"]
    args += ["generation.max_new_tokens=2", f"cache_dir={tmp_path}/cache", "wandb.enabled=false"]
    out, seconds = run(tmp_path, "eval.py", *args)
    one_error_line(out, seconds, "judge.model_name_or_path", str(guard))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "generations.jsonl").exists()


# -- in process: the model-source check itself, and the one error line ------------------------------------------


def fake_hub_cache(cache, repo: str, revision: str = "main", sha: str = "a" * 40) -> None:
    """The layout huggingface_hub writes: refs/<revision> holds the commit, snapshots/<commit>/ the files."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(sha)
    (folder / "snapshots" / sha).mkdir(parents=True, exist_ok=True)
    (folder / "snapshots" / sha / "config.json").write_text("{}")


def test_a_cached_hub_id_passes_offline_and_its_revision_counts(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from src.errors import SettingError
    from src.models.source import check_model_source

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub_cache(tmp_path, "org/cached")
    check_model_source("org/cached")
    with pytest.raises(SettingError, match=r"org/cached at revision v2 \(model.name_or_path\) is neither"):
        check_model_source("org/cached", revision="v2")


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_the_message_names_the_offline_variable_that_is_set(tmp_path, monkeypatch, variable):
    from huggingface_hub import constants

    from src.errors import SettingError
    from src.models.source import check_model_source

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "1")
    with pytest.raises(SettingError, match=f"and {variable} forbids downloading it"):
        check_model_source(NO_HUB_ID)


def test_an_adapter_folder_is_checked_through_its_base(tmp_path):
    from src.errors import SettingError
    from src.models.source import check_model_source

    (tmp_path / "adapter").mkdir()
    base = tmp_path / "gone"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    with pytest.raises(SettingError, match=f"model path {base}: no such folder.*base model of the adapter"):
        check_model_source(str(tmp_path / "adapter"))
    base.mkdir()
    (base / "config.json").write_text("{}")
    check_model_source(str(tmp_path / "adapter"))


def test_a_data_error_inside_hydra_instantiate_is_one_line_and_exit_2(caplog):
    import logging

    import hydra

    from src.errors import exit_on_setting_error

    log = logging.getLogger("failfast-test")
    with pytest.raises(SystemExit) as exit_:
        with exit_on_setting_error(log):
            hydra.utils.instantiate({"_target_": "src.data.readers.read_records", "path": "/no/data.jsonl"})
    assert exit_.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("data error: /no/data.jsonl: data file not found"), errors
    assert "Error in call to target" not in errors[0]
