"""Train a multimodal LLM by BPO, DPO or SFT: compose config -> data, model, blind answers -> fit -> save.

python src/train.py                          # BPO, tiny LLaVA, embedded data, CPU
python src/train.py experiment=dpo_tiny trainer.max_steps=10
python src/train.py experiment=sft_tiny      # SFT (no reference, no blind answers): a base for DPO / BPO
python src/train.py -m objective.beta=0.05,0.1
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python src/<entry>.py), not imported as src.<entry>: see _bootstrap.py
    import _bootstrap  # noqa: F401

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from src.data.datamodule import PreferenceDataModule, check_data_paths, check_max_length
from src.data.prompt_format import PromptFormat
from src.data.readers import HF_FORMATS
from src.environment import environment
from src.errors import SettingError, exit_on_setting_error, marked_if_failed, run_hydra
from src.models.distributed import policy_state_dict
from src.models.factory import load_processor
from src.models.generation import GenerationSettings, fill_blind_answers
from src.models.lora import adapters_disabled, is_peft, save_adapter_and_merged
from src.models.memory import device_memory, plan_memory, write_plan
from src.models.module import PreferenceModule
from src.models.objectives import data_needs
from src.models.reference import precompute_reference_logps
from src.models.source import check_model_source
from src.settings import TRAIN, check_ranges
from src.world.world import IMAGE_DRAWERS

log = logging.getLogger("train")
# a frozen reference copy is in eval mode on purpose
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
# the CSV logger writes into the Hydra run folder, which already holds config.yaml and the log file; an earlier
# metrics.csv (a resume, a rerun into the folder) is moved aside to metrics.partN.csv before the logger starts
warnings.filterwarnings(
    "ignore", message=r"Experiment logs directory .* exists and is not empty", module=r"lightning\.fabric\.loggers"
)
# resume is exact although the loader keeps no state: its order is a function of (seed, epoch) and the data module
# leaves out the batches the checkpoint's epoch already trained on (PreferenceModule._resume_data_order)
warnings.filterwarnings(
    "ignore",
    message=r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
    module=r"lightning\.pytorch\.loops\.training_epoch_loop",
)
# Lightning's own use of a torch API that torch has since deprecated; nothing this project can change
warnings.filterwarnings(
    "ignore",
    message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    category=FutureWarning,
    module=r"lightning\.pytorch\.utilities\._pytree",
)
# Lightning's notices that say nothing about this run: an advertisement, TPUs on a CPU / GPU run, an internal step
_LIGHTNING_NOTICES = ("💡 Tip: ", "TPU available: False", "Loading `train_dataloader` to estimate number of stepping")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not record.getMessage().startswith(_LIGHTNING_NOTICES)
)


def multirun_dir() -> str:
    """The sweep folder of a multirun's job (``-m``, Optuna), "" for a single run: the W&B group of its jobs."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return ""
    return str(HydraConfig.get().sweep.dir)


OmegaConf.register_new_resolver("multirun_dir", multirun_dir, replace=True)


def finish_wandb_run(loggers: list[Any], exit_code: int) -> None:
    """End this process's W&B run: else the next job of a multirun (or training in this process) would log into it."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish(exit_code=exit_code)


def without_wandb_anonymous(loggers: list[Any]) -> list[Any]:
    """Lightning's WandbLogger passes ``anonymous`` to wandb.init even when unset, and wandb warns about any value
    ("has no effect"): leave it out; None, what Lightning passes when unset, is wandb's default anyway."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg._wandb_init.pop("anonymous", None)
    return loggers


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` in a config group (callbacks, loggers)."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


@contextmanager
def initial_model(cfg: DictConfig, module: PreferenceModule):
    """The policy before training, i.e. the reference model, on the run's device for one-off work."""
    gpu = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
    module.policy.to("cuda" if gpu else "cpu")
    # one-off work must not move the random state: data order and init stay those of the seed, whether
    # blind answers and reference log-probs come from a cache or are computed now
    with (
        torch.random.fork_rng(devices=[torch.cuda.current_device()] if gpu else []),
        adapters_disabled(module.policy) as reference,
    ):
        try:
            yield reference
        finally:
            module.policy.to("cpu")


def autocast_dtype(precision: Any) -> torch.dtype | None:
    """The compute dtype of a Lightning precision setting, so cached log-probs match training's."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def add_blind_answers(cfg: DictConfig, module: PreferenceModule, datamodule: Any) -> dict[str, Any]:
    """Generate (or read from cache) the reference model's image-less answers for every record."""
    settings = GenerationSettings(**cfg.blind.generation)
    with initial_model(cfg, module) as reference:
        devices = OmegaConf.to_container(cfg.blind.devices, resolve=True) if cfg.blind.get("devices") else None
        if devices and devices.get("devices") != cfg.trainer.devices:
            # the predict loop's worker processes go on to train: both must use the same processes
            raise ValueError(
                f"blind.devices.devices={devices.get('devices')} must equal trainer.devices={cfg.trainer.devices}"
            )
        records, summary = fill_blind_answers(
            datamodule.load_records(),
            reference,
            module.processor,
            settings,
            cfg.blind.cache_dir,
            devices,
            prompt_format=datamodule.prompt_format,
        )
    datamodule.set_records(records)
    return summary


def add_reference_logps(cfg: DictConfig, module: PreferenceModule, datamodule: Any) -> dict[str, Any]:
    """Compute (or read from cache) reference log-probs of every answer, so training runs no reference."""
    datasets = [d for d in (datamodule.train_set, datamodule.val_set) if d is not None]
    with initial_model(cfg, module) as reference:
        return precompute_reference_logps(
            reference,
            datasets,
            module.pad_token_id,
            cfg.reference.cache_dir,
            module.layout,
            cfg.reference.batch_size,
            autocast_dtype(cfg.trainer.precision),
        )


def check_settings(cfg: DictConfig) -> None:
    """Every numeric setting's range, the data files and folders and the model source, checked in seconds before
    the model loads (a data-path typo must not wait for 7B weights to load); raises `SettingError` naming the
    setting."""
    check_ranges(cfg, TRAIN)
    check_data_paths(cfg.data)
    check_model_source(cfg.model.get("name_or_path"), "model.name_or_path", cfg.model.get("revision"))
    # the processor alone (no weights): does data.max_length leave room for an answer after a picture?
    check_max_length(cfg.data, load_processor(**cfg.model), PromptFormat.from_config(cfg.prompt_format))


def check_memory(cfg: DictConfig, out_dir: Path) -> None:
    """The memory plan (src/plan.py), written to plan.json and said in one line; on CUDA, a plan beyond the device
    stops the run before any weight loads (`SettingError`; ``plan.check=false`` goes on regardless)."""
    plan_cfg = cfg.get("plan") or {}
    memory = plan_cfg.get("device_memory_gb") or device_memory()
    try:
        plan = plan_memory(cfg, memory)
    except SettingError as e:  # no architecture to count (a hub id not in the cache): nothing to check it against
        log.info("memory plan: none (%s)", e)
        return
    write_plan(plan, out_dir / "plan.json")
    verdict = "" if plan.fits is None else f"; {'fits' if plan.fits else 'does NOT fit'} in {memory:g} GiB"
    log.info("memory plan: %.1f GiB per device%s (%s)", plan.total_gb, verdict, out_dir / "plan.json")
    if plan.fits is False and torch.cuda.is_available() and plan_cfg.get("check", True):
        raise SettingError(
            f"the memory plan needs {plan.total_gb:.1f} GiB per device and the device has {memory:.1f} GiB "
            f"(python src/plan.py with these overrides shows each part); it would fit with: "
            f"{'; '.join(plan.suggestions[:3])}. plan.check=false trains anyway"
        )


def write_heldout_ids(datamodule: Any, out_dir: Path) -> dict[str, Any] | None:
    """The validation records' ids in ``heldout_ids.txt``, and the command that evaluates the trained model on them
    (``benchmark=preference`` reads the same file and keeps these ids): records the model never trained on."""
    _, val = datamodule.split()
    if not val:
        return None
    path = out_dir / "heldout_ids.txt"
    path.write_text("".join(f"{r.id}\n" for r in val))
    data = datamodule.hparams
    source = data.val_path or data.path
    command = None
    if data.format not in HF_FORMATS:
        command = (
            f"python src/eval.py model.path={out_dir / 'model'} benchmark=preference benchmark.path={source} "
            f"benchmark.format={data.format} benchmark.ids_file={path} benchmark.missing_images={data.missing_images}"
            + (f" benchmark.image_root={data.image_root}" if data.image_root else "")
        )
    return {"records": len(val), "ids_file": str(path), "data": str(source), "eval_command": command}


def check_optimized_metric(name: str | None, module: PreferenceModule) -> None:
    """A validation metric to optimise (sweeps) that this objective never logs fails now, not after training."""
    logged = sorted(f"val/{key.replace('__', '/')}" for key in module.val_metrics)
    if name and name.startswith("val/") and name not in logged:
        raise SettingError(
            f"optimized_metric={name} is not logged by objective {module.objective_name} (answers "
            f"{list(module.answers)}); it logs {logged}: set optimized_metric=val/loss, say"
        )


def train(cfg: DictConfig) -> dict[str, Any]:
    check_settings(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    container = OmegaConf.to_container(cfg, resolve=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(container))
    check_memory(cfg, out_dir)

    module = PreferenceModule(
        model=container["model"],
        objective=container["objective"],
        optim=container["optim"],
        layout=cfg.layout,
        reference=container["reference"],
        nonfinite=cfg.get("nonfinite", "raise"),
    )
    check_optimized_metric(cfg.get("optimized_metric"), module)
    datamodule = PreferenceDataModule.from_config(
        cfg.data,
        prompt_format=PromptFormat.from_config(cfg.prompt_format),
        needs=data_needs(container["objective"]),  # the answers the objective scores, as the module resolved them
        processor=module.processor,
        image_drawers=IMAGE_DRAWERS,  # world data: its pictures are drawn, not read
    )
    report: dict[str, Any] = {}
    if "blind" in module.answers:
        report["blind_answers"] = add_blind_answers(cfg, module, datamodule)
        log.info("blind answers: %s", report["blind_answers"])
    datamodule.setup("fit")
    report["heldout"] = write_heldout_ids(datamodule, out_dir)
    report["data"] = datamodule.summary()
    log.info("data: %s", json.dumps(report["data"]))
    (out_dir / "data_summary.json").write_text(json.dumps(report["data"], indent=2))
    if module.reference_strategy == "precomputed":
        report["reference_logps"] = add_reference_logps(cfg, module, datamodule)

    if (out_dir / "metrics.csv").exists():
        # the CSV logger rewrites metrics.csv (a resume, a rerun into this folder): keep the earlier part beside it
        parts = sorted(out_dir.glob("metrics.part*.csv"))
        (out_dir / "metrics.csv").rename(out_dir / f"metrics.part{len(parts) + 1}.csv")
    loggers = without_wandb_anonymous(instantiate_all(cfg.get("logger")))
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_all(cfg.get("callbacks")), logger=loggers or False
    )
    try:
        for lg in loggers:
            lg.log_hyperparams({"config": container, "data_summary": report["data"]})
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        if datamodule.val_set is not None and "val/loss" not in trainer.callback_metrics:
            # stopped by max_steps before an epoch ended: still report held-out figures for sweeps
            trainer.validate(module, datamodule=datamodule, verbose=False)
    except BaseException:
        finish_wandb_run(loggers, exit_code=1)
        raise
    finish_wandb_run(loggers, exit_code=0)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    report["final_metrics"] = metrics
    report["optimizer_steps"] = trainer.global_step
    report["environment"] = environment()
    sharded = not is_peft(module.policy) and trainer.world_size > 1
    state = policy_state_dict(trainer) if sharded else None  # collective under FSDP / ZeRO-3
    if trainer.is_global_zero:
        model_dir = out_dir / "model"
        if is_peft(module.policy):  # the adapter, and the merged model as a plain HF checkpoint
            save_adapter_and_merged(module.policy, module.processor, out_dir / "adapter", model_dir)
        else:
            module.policy.save_pretrained(model_dir, state_dict=state)
            module.processor.save_pretrained(model_dir)
        # how prompts were built in training, so an evaluation can check it builds them the same way
        datamodule.prompt_format.write(model_dir)
        (out_dir / "run_summary.json").write_text(json.dumps(report, indent=2))
        data = report["data"]
        log.info("saved policy and processor to %s", model_dir)
        log.info("final metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        log.info(
            "records read: %d = %d usable + %d rejected as bad input + %d skipped %s; stand-in images: %d",
            data["records_read"],
            data["usable"],
            data["rejected_records"],
            data["skipped"],
            data["skipped_by_reason"],
            data["stand_in_images"],
        )
        heldout = report["heldout"]
        if heldout and heldout["eval_command"]:  # last: where a user looks for what to do next
            log.info("evaluate it on the %d held-out records: %s", heldout["records"], heldout["eval_command"])
    return metrics


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # a run that does not finish is marked (FAILED in its folder); a setting or path the user can fix: one line
    with marked_if_failed(cfg.paths.output_dir, log), exit_on_setting_error(log):
        metrics = train(cfg)
    return optimized_value(cfg.get("optimized_metric"), metrics)


def optimized_value(name: str | None, metrics: dict[str, float]) -> float | None:
    """The value of ``optimized_metric`` returned to sweepers. A run without validation (``data.val_fraction=0`` and
    no ``data.val_path``) logs no ``val/`` metric: its train counterpart (the last step's value) stands in, said
    once; None (absent) where there is none."""
    if not name:
        return None
    if name in metrics:
        return metrics[name]
    if name.startswith("val/") and not any(key.startswith("val/") for key in metrics):
        stand_in = f"train/{name.removeprefix('val/')}"
        if stand_in in metrics:
            log.warning(
                "no validation split (data.val_fraction=0, no data.val_path): optimized_metric %s is read from %s, "
                "the last training step's value",
                name,
                stand_in,
            )
            return metrics[stand_in]
        log.warning("no validation split: optimized_metric %s is absent (no %s either); returning none", name, stand_in)
        return None
    raise KeyError(f"optimized_metric {name!r} was not logged; logged: {sorted(metrics)}")


if __name__ == "__main__":
    run_hydra(main)
