"""Distributed strategies, sweeps and their configs."""

import json

import hydra
import pytest
from omegaconf import OmegaConf

from tests.helpers import compose_config, run_entry


def run(args, timeout=900):
    out = run_entry("train.py", *args, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.parametrize("trainer", ["fsdp", "deepspeed_zero2", "deepspeed_zero3", "ddp"])
def test_llava_configs_compose_for_every_strategy(trainer):
    cfg = compose_config("train", ["experiment=bpo_llava", f"trainer={trainer}"])
    assert cfg.model.name_or_path == "llava-hf/llava-1.5-7b-hf" and cfg.trainer.precision == "bf16-mixed"
    if trainer.startswith("deepspeed"):
        assert cfg.trainer.strategy.stage == int(trainer[-1])


def test_cfg_job_prints_sharded_llava_configs():
    for trainer in ("fsdp", "deepspeed_zero3"):
        out = run_entry("train.py", "experiment=bpo_llava", f"trainer={trainer}", "--cfg", "job", timeout=120)
        assert out.returncode == 0 and "strategy:" in out.stdout and "llava-1.5-7b-hf" in out.stdout


def test_fsdp_strategy_wraps_decoder_and_vision_layers():
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = compose_config("train", ["trainer=fsdp"])
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "FSDPStrategy"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer, CLIPEncoderLayer}


@pytest.mark.slow
def test_ddp_two_cpu_processes_split_data_and_agree_on_weights(tmp_path):
    """Real DDP (gloo) with 2 CPU processes, in a 2-job multirun: no duplicated sweep directories."""
    run(
        [
            "-m",
            "objective.beta=0.05,0.1",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            "trainer.max_steps=3",
            "logger=csv",
            f"hydra.sweep.dir={tmp_path}/sweep",
            f"blind.cache_dir={tmp_path}/cache",
            f"reference.cache_dir={tmp_path}/ref",
            "+callbacks.seen._target_=tests.ddp_probe.SeenIds",
            "+callbacks.seen.out_dir=${hydra:runtime.output_dir}/seen",
        ]
    )
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        ranks = [json.loads((tmp_path / "sweep" / job / "seen" / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert all(r["world"] == 2 for r in ranks)
        assert len(ranks[0]["ids"]) == len(ranks[1]["ids"]) == 3 * 8
        assert not set(ranks[0]["ids"]) & set(ranks[1]["ids"])  # each rank saw its own share of the data
        assert ranks[0]["weights"] == ranks[1]["weights"]  # and they ended with identical weights
        assert (tmp_path / "sweep" / job / "model/model.safetensors").exists()
        assert OmegaConf.load(tmp_path / "sweep" / job / "config.yaml").objective.beta == (0.05, 0.1)[int(job)]


@pytest.mark.slow
def test_optuna_sweep_runs_two_trials(tmp_path):
    run(
        [
            "-m",
            "hparams_search=bpo_optuna",
            "hydra.sweeper.n_trials=2",
            "trainer.max_steps=3",
            "logger=csv",
            f"hydra.sweep.dir={tmp_path}/sweep",
            f"blind.cache_dir={tmp_path}/cache",
            f"reference.cache_dir={tmp_path}/ref",
        ]
    )
    results = OmegaConf.load(tmp_path / "sweep/optimization_results.yaml")
    assert set(results.best_params) == {"objective.beta", "optim.lr"} and 0 <= results.best_value <= 1
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]


@pytest.mark.slow
def test_generation_over_two_processes_matches_one(tmp_path):
    """src/generate.py through Lightning's predict loop on 2 CPU processes: same answers, no duplicates."""
    answers = {}
    for name, extra in (("one", []), ("two", ["devices={accelerator: cpu, devices: 2, strategy: ddp}"])):
        out = run_entry(
            "generate.py",
            "data.max_records=7",
            "generation.max_new_tokens=5",
            "generation.batch_size=2",
            f"output={tmp_path / name}.jsonl",
            f"hydra.run.dir={tmp_path / name}",
            *extra,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        lines = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert len(lines) == len({x["id"] for x in lines}) == 7
        answers[name] = {x["id"]: x["answer"] for x in lines}
    assert answers["one"] == answers["two"]
