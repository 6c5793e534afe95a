"""What a training run (src/train.py) does around ``fit``: the checks before any weight loads, the trainer with its
loggers and callbacks from config, the W&B run's end, and what the run says and writes when it is done.

Lightning's notices that say nothing about a run are filtered once (`quiet_lightning`)."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from src.data.datamodule import check_data_paths, check_max_length
from src.data.prompt_format import PromptFormat
from src.data.readers import HF_FORMATS
from src.errors import SettingError
from src.models.factory import load_processor
from src.models.memory import device_memory, plan_memory, write_plan
from src.models.source import check_model_source
from src.settings import TRAIN, check_ranges

log = logging.getLogger("train")

# Lightning's notices that say nothing about this run: an advertisement, TPUs on a CPU / GPU run, an internal step
_LIGHTNING_NOTICES = ("💡 Tip: ", "TPU available: False", "Loading `train_dataloader` to estimate number of stepping")


def quiet_lightning() -> None:
    """Filter the warnings and notices of Lightning that are expected in every run of this project."""
    # a frozen reference copy is in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # the CSV logger writes into the Hydra run folder, which already holds config.yaml and the log file; an earlier
    # metrics.csv (a resume, a rerun into the folder) is moved aside (`keep_earlier_metrics`) before it starts
    warnings.filterwarnings(
        "ignore", message=r"Experiment logs directory .* exists and is not empty", module=r"lightning\.fabric\.loggers"
    )
    # resume is exact although the loader keeps no state: its order is a function of (seed, epoch) and the data
    # module leaves out the batches the checkpoint's epoch already trained on (PreferenceModule._resume_data_order)
    warnings.filterwarnings(
        "ignore",
        message=r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not "
        r"resumable",
        module=r"lightning\.pytorch\.loops\.training_epoch_loop",
    )
    # Lightning's own use of a torch API that torch has since deprecated; nothing this project can change
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(getattr(f, "quiet_lightning", False) for f in rank_zero.filters):
        rank_zero.addFilter(_NoticeFilter())


class _NoticeFilter(logging.Filter):
    quiet_lightning = True

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_LIGHTNING_NOTICES)


# -- before any weight loads ---------------------------------------------------------------------------
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


def check_optimized_metric(name: str | None, module: Any) -> None:
    """A validation metric to optimise (sweeps) that this objective never logs fails now, not after training."""
    logged = sorted(f"val/{key.replace('__', '/')}" for key in module.val_metrics)
    if name and name.startswith("val/") and name not in logged:
        raise SettingError(
            f"optimized_metric={name} is not logged by objective {module.objective_name} (answers "
            f"{list(module.answers)}); it logs {logged}: set optimized_metric=val/loss, say"
        )


# -- the trainer and its loggers ---------------------------------------------------------------------
def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` in a config group (callbacks, loggers)."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def build_trainer(cfg: DictConfig) -> tuple[Any, list[Any]]:
    """The Lightning trainer of ``cfg.trainer`` with the run's callbacks and loggers, and the loggers."""
    loggers = instantiate_all(cfg.get("logger"))
    for lg in loggers:
        # Lightning's WandbLogger passes ``anonymous`` to wandb.init even when unset, and wandb warns about any
        # value ("has no effect"): leave it out; None, what Lightning passes when unset, is wandb's default anyway
        if isinstance(lg, WandbLogger):
            lg._wandb_init.pop("anonymous", None)
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_all(cfg.get("callbacks")), logger=loggers or False
    )
    return trainer, loggers


@contextmanager
def wandb_run_ended(loggers: list[Any]):
    """End this process's W&B run when the block ends, failed or not: else the next job of a multirun (or training
    in this process) would log into it."""
    wandb = any(isinstance(lg, WandbLogger) for lg in loggers)
    try:
        yield
    except BaseException:
        if wandb:
            import wandb as wandb_module

            wandb_module.finish(exit_code=1)
        raise
    if wandb:
        import wandb as wandb_module

        wandb_module.finish(exit_code=0)


def keep_earlier_metrics(out_dir: Path) -> None:
    """The CSV logger rewrites metrics.csv (a resume, a rerun into this folder): keep the earlier part beside it."""
    if (out_dir / "metrics.csv").exists():
        parts = sorted(out_dir.glob("metrics.part*.csv"))
        (out_dir / "metrics.csv").rename(out_dir / f"metrics.part{len(parts) + 1}.csv")


# -- what the run says -----------------------------------------------------------------------------
def heldout_ids(datamodule: Any, out_dir: Path) -> dict[str, Any] | None:
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


def log_run_end(report: dict[str, Any], model_dir: Path) -> None:
    """The lines a user reads when training ends: where the model went, its final metrics, where every record
    went, and (last) the command that evaluates it on the held-out records."""
    data, metrics = report["data"], report["final_metrics"]
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
