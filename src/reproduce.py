"""The paper's comparison in one command: base -> DPO and BPO (and DPO at BPO's budget) from the same base, with
the same seeds and settings, every arm evaluated on the same held-out prompts with the same judge.

python src/reproduce.py experiment=reproduce_tiny      # embedded data, tiny LLaVA, CPU, a few minutes
python src/reproduce.py experiment=reproduce_llava     # llava-1.5-7b-hf on MMSafe-PO train / test (GPU)
python src/reproduce.py experiment=reproduce_world     # the grounded-safety world (src/world), tiny LLaVA, CPU

Writes ``comparison.md``, ``comparison.json`` and ``comparison.png`` in the run folder, with every training run
(``runs/<arm>/seed<k>``), evaluation (``eval/<arm>/seed<k>``) and the split (``split/``, or the world's files in
``world/``) beside them.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python src/<entry>.py), not imported as src.<entry>: see _bootstrap.py
    import _bootstrap  # noqa: F401

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import src.plugins  # noqa: F401  (registers the plug-ins' benchmarks, drawers and comparison parts)
from src.data.datamodule import check_data_paths, grouped_split
from src.data.prompt_format import PromptFormat
from src.data.readers import HF_FORMATS, read_records
from src.environment import environment
from src.errors import SettingError, exit_on_setting_error, run_hydra
from src.evaluation.comparison import print_written
from src.evaluation.judges import JudgeError
from src.evaluation.reproduction import BASE, last_step, log_to_wandb, markdown, summarize, write_outputs
from src.finished_runs import file_digests, finished, record_inputs
from src.models.objectives import data_needs
from src.settings import TRAIN, check_ranges
from src.world.stage import WorldStage

log = logging.getLogger("reproduce")


class ReproduceError(SettingError):
    """A setting or folder the user must change; reported without a stack trace."""

    label = "reproduce"


class Reproduction:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.paths.output_dir)
        self.group = f"reproduce-{self.out.name}"
        world = cfg.get("world")
        self.world = (
            None if world is None else WorldStage(OmegaConf.to_container(world, resolve=True), self.out, ReproduceError)
        )

    # -- configs ---------------------------------------------------------------------------------
    def compose(self, name: str, overrides: list[str]) -> DictConfig:
        return hydra.compose(config_name=name, overrides=[str(o) for o in overrides])

    def command_line_data(self) -> list[str]:
        """The ``data=...`` / ``data.*=...`` overrides given on the command line: every run gets them, last."""
        task = HydraConfig.get().overrides.task
        return [o for o in task if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "data"]

    def world_data(self, name: str | None = None) -> list[str]:
        """The world's training file as every run's data (after the runs' own overrides, whose experiments name
        other data): ``world/train.jsonl``, the base's ``world/<base.world_data>.jsonl`` (`WorldStage`)."""
        if self.world is None:
            return []
        return self.world.data_overrides((self.cfg.base.get("world_data") or "train") if name == BASE else "train")

    def data_overrides(self) -> list[str]:
        return [*self.cfg.data_overrides, *self.world_data(), *self.command_line_data()]

    def train_config(
        self, extra: list[str], out_dir: Path, seed: int, ids_file: Path | None, name: str | None = None
    ) -> DictConfig:
        overrides = [*self.cfg.data_overrides, *self.cfg.train_overrides, *extra, *self.world_data(name)]
        overrides += self.command_line_data()
        overrides.append(f"seed={seed}")
        overrides.append(f"paths.output_dir={out_dir}")
        if ids_file is not None:
            overrides.append(f"data.ids_file={ids_file}")
        cfg = self.compose("train", overrides)
        if cfg.get("logger") and cfg.logger.get("wandb"):  # every run of one comparison in one W&B group
            cfg.logger.wandb.group = self.group
        return cfg

    def prompt_format(self) -> PromptFormat:
        """The prompt format (system prompt, image fitting) the runs train with; every evaluation uses it.

        Runs that train with different formats cannot be compared on one set of prompts: that is an error.
        """
        runs = dict(self.cfg.arms)
        if not self.cfg.base.path:
            runs[BASE] = self.cfg.base.overrides
        formats = {}
        for name, extra in runs.items():
            cfg = self.train_config(list(extra), self.out, 0, None)
            formats[name] = PromptFormat.from_config(cfg.prompt_format)
        if len(set(formats.values())) > 1:
            shown = {name: f.to_dict() for name, f in formats.items()}
            raise ReproduceError(f"the runs train with different prompt formats, so no evaluation fits all: {shown}")
        return next(iter(formats.values()), PromptFormat())

    # -- stages ----------------------------------------------------------------------------------
    def split(self) -> tuple[Path | None, dict[str, Any]]:
        """Train ids (None: all of data.path) and the evaluation benchmark settings."""
        data = self.compose("train", self.data_overrides()).data
        self.data_settings = OmegaConf.to_container(data, resolve=True)
        bench = {
            "image_root": data.image_root,
            "missing_images": data.missing_images,
            "stand_in_size": data.stand_in_size or 336,
        }
        if self.world is not None:
            return None, self.world.write()
        held = self.cfg.heldout
        if held.eval_path:
            log.info("evaluating on %s; all of %s trains", held.eval_path, data.path)
            return None, bench | {"path": held.eval_path, "format": held.eval_format, "split": held.eval_split}
        records = read_records(data.path, data.format, split=data.split)
        train, test = grouped_split(records, held.fraction, held.seed)
        shared = {r.group for r in train} & {r.group for r in test}
        assert not shared, f"grouped split put {len(shared)} source conversations on both sides"
        folder = self.out / "split"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train_ids.txt").write_text("".join(f"{r.id}\n" for r in train))
        (folder / "heldout_ids.txt").write_text("".join(f"{r.id}\n" for r in test))
        summary = {
            "records": len(records),
            "train": len(train),
            "heldout": len(test),
            "train_groups": len({r.group for r in train}),
            "heldout_groups": len({r.group for r in test}),
        }
        (folder / "split.json").write_text(json.dumps(summary, indent=2))
        log.info("split by source conversation: %s", summary)
        bench |= {"path": data.path, "format": data.format, "split": data.split, "ids_file": folder / "heldout_ids.txt"}
        return folder / "train_ids.txt", bench

    def train(self, name: str, extra: list[str], seed: int, ids_file: Path | None) -> Path:
        from src.train import train

        run_dir = self.out / "runs" / name / f"seed{seed}"
        cfg = self.train_config([*extra, f"task_name=reproduce-{name}"], run_dir, seed, ids_file, name)
        if finished(run_dir, "model/config.json", cfg, ReproduceError):
            log.info("%s seed %d: reusing %s", name, seed, run_dir)
            return run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        log.info("training %s (seed %d) -> %s", name, seed, run_dir)
        digests = file_digests(cfg)
        train(cfg)
        record_inputs(run_dir, digests)
        return run_dir

    def base_model(self, ids_file: Path | None) -> str:
        if self.cfg.base.path:
            return str(self.cfg.base.path)
        seed = int(self.cfg.base.seed)
        return str(self.train(BASE, list(self.cfg.base.overrides), seed, ids_file) / "model")

    def evaluate(self, name: str, seed: int | None, model: str, base: str | None, bench: dict[str, Any]) -> dict:
        from src.eval import evaluate

        out_dir = self.out / "eval" / name / (f"seed{seed}" if seed is not None else "")
        if self.world is not None:  # the world's benchmark regenerates its held-out items from these
            overrides = ["benchmark=world", *[f"world.{k}={_value(v)}" for k, v in bench.items()]]
        else:
            overrides = ["benchmark=preference", *[f"benchmark.{k}={_value(v)}" for k, v in bench.items()]]
        overrides += [f"model.path={model}", f"reference.path={_value(base)}", f"paths.output_dir={out_dir}"]
        overrides += ["wandb.enabled=false", f"seed={seed or 0}"]  # the comparison's own W&B run has every figure
        overrides += [f"judge={self.cfg.judge_name}", *self.cfg.eval_overrides]
        cfg = self.compose("eval", overrides)
        # the prompts as the models were trained (set here, not as overrides: a system prompt is free text)
        cfg.prompt_format = self.format.to_dict()
        if finished(out_dir, "report.json", cfg, ReproduceError):
            report = json.loads((out_dir / "report.json").read_text())
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))
            log.info("evaluating %s%s on the held-out prompts", name, f" (seed {seed})" if seed is not None else "")
            digests = file_digests(cfg)
            report = evaluate(cfg)
            record_inputs(out_dir, digests)
        if self.world is not None:
            self.world.check_items(out_dir)
        return report

    def check_judge(self) -> None:
        """The evaluations' judge answers, checked before any training (each evaluation checks it again)."""
        from src.evaluation.runner import check_judge

        cfg = self.compose("eval", [f"judge={self.cfg.judge_name}", *self.cfg.eval_overrides])
        check_judge(hydra.utils.instantiate(cfg.judge))

    def check_settings(self) -> None:
        """Every run's data files and the base model (or the model the base trains from), and the held-out file,
        checked in seconds before the first training: a typo must not wait for a run to load its model."""
        from src.models.source import check_model_source

        held = self.cfg.heldout
        if held.eval_path and held.eval_format not in HF_FORMATS and not Path(str(held.eval_path)).exists():
            raise ReproduceError(f"{held.eval_path}: held-out data file not found (heldout.eval_path)")
        runs = {name: list(extra) for name, extra in self.cfg.arms.items()}
        if self.cfg.base.path:
            check_model_source(str(self.cfg.base.path), "base.path")
        else:
            runs[BASE] = list(self.cfg.base.overrides)
        for name, extra in runs.items():
            cfg = self.train_config(extra, self.out, 0, None, name)
            check_ranges(cfg, TRAIN)  # an arm's numbers out of range: one line, before the first run trains
            if self.world is None:  # the world's data is written by the comparison itself
                check_data_paths(cfg.data)
            if name == BASE:  # the arms train from the base, whatever model their overrides name
                key = "base.overrides: model.name_or_path"
                check_model_source(cfg.model.get("name_or_path"), key, cfg.model.get("revision"))

    # -- the whole comparison ------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if self.world is not None and self.cfg.judge_name != "world":
            raise ReproduceError(f"the world is judged by its exact judge: judge_name=world, not {self.cfg.judge_name}")
        if self.world is not None and self.cfg.heldout.eval_path:
            raise ReproduceError("world and heldout.eval_path are both set: the world's held-out items evaluate")
        if self.world is not None:
            self.world.settings()  # settings that cannot make a world fail before any training
        equal = self.cfg.equal_budget
        if equal.enabled and not {equal.like, equal.objective} <= set(self.cfg.arms):
            raise ReproduceError(
                f"equal_budget compares arms {equal.objective!r} and {equal.like!r}, but arms are "
                f"{sorted(self.cfg.arms)}; set equal_budget.objective / .like, or equal_budget.enabled=false"
            )
        self.check_judge()
        self.check_settings()
        self.format = self.prompt_format()
        log.info("prompt format of every run and evaluation: %s", self.format.to_dict())
        ids_file, bench = self.split()
        base = self.base_model(ids_file)
        arms: dict[str, dict[int, Path]] = {}
        for seed in self.cfg.seeds:
            steps: dict[str, int] = {}
            for name, extra in self.cfg.arms.items():
                run_dir = self.train(name, [*extra, f"model.name_or_path={base}"], seed, ids_file)
                arms.setdefault(name, {})[seed] = run_dir
                steps[name] = last_step(run_dir)
            equal = self.cfg.equal_budget
            if equal.enabled:
                like, same = arms[equal.like][seed], arms[equal.objective][seed]
                budget = math.ceil(steps[equal.like] * scored_answers(like) / scored_answers(same))
                extra = [*self.cfg.arms[equal.objective], f"model.name_or_path={base}"]
                extra += [f"trainer.max_steps={budget}", "trainer.max_epochs=-1"]
                arms.setdefault(equal.name, {})[seed] = self.train(equal.name, extra, seed, ids_file)
        reports = {BASE: {None: self.evaluate(BASE, None, base, None, bench)}}
        for name, runs in arms.items():
            reports[name] = {seed: self.evaluate(name, seed, str(d / "model"), base, bench) for seed, d in runs.items()}
        result = summarize(self.cfg, reports, arms, base) | {"data": self.data_settings, "environment": environment()}
        if self.world is not None:
            result["world"] = self.world.summary  # settings, kinds (which are hazardous), held-out phrasings
        write_outputs(self.out, result, arms)
        log_to_wandb(self.cfg, self.out, result)
        return result


def _value(v: Any) -> str:
    """A Hydra override value (null for None; paths as strings)."""
    return "null" if v is None else str(v)


def scored_answers(run_dir: Path) -> int:
    """How many answers per pair a run's objective scored each step (dpo 2, bpo 3)."""
    return len(data_needs(OmegaConf.load(run_dir / "config.yaml").objective).answers)


@hydra.main(version_base="1.3", config_path="../configs", config_name="reproduce")
def main(cfg: DictConfig) -> None:
    with exit_on_setting_error(log):  # data, model, judge or comparison settings to fix: one line, exit 2
        try:
            result = Reproduction(cfg).run()
        except JudgeError as e:  # an evaluation without a working judge: no comparison of rates it never measured
            log.error("%s", e)
            sys.exit(1)
    print(markdown(result))
    print_written(Path(cfg.paths.output_dir), folders=True)


if __name__ == "__main__":
    run_hydra(main)
