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

import csv
import functools
import hashlib
import json
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python src/<entry>.py), not imported as src.<entry>: see _bootstrap.py
    import _bootstrap  # noqa: F401

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from src.data.datamodule import check_data_paths, grouped_split
from src.data.readers import HF_FORMATS, read_records
from src.errors import SettingError, exit_on_setting_error
from src.evaluation.judges import JudgeError
from src.evaluation.metrics import t_quantile, wilson_interval
from src.world.metrics import NAMES as WORLD_NAMES

log = logging.getLogger("reproduce")
BASE = "base"


class ReproduceError(SettingError):
    """A setting or folder the user must change; reported without a stack trace."""

    label = "reproduce"


def seed_interval(values: list[float | None], bounds: tuple[float, float] | None = (0.0, 1.0)) -> dict[str, Any]:
    """Mean over seeds with a 95% t-interval (None with one seed), clipped to ``bounds`` (rates: [0, 1]).

    Seeds without a value (None, NaN) are left out and counted in ``n_missing``; ``zero_variance`` flags seeds that
    all gave the same value, whose zero-width interval says nothing about the spread of another seed."""
    used = [v for v in values if isinstance(v, int | float) and not math.isnan(v)]
    out: dict[str, Any] = {"n_seeds": len(used), "n_missing": len(values) - len(used), "values": used}
    if not used:
        return out | {"mean": None, "ci95": None, "zero_variance": False}
    mean = statistics.fmean(used)
    if len(used) < 2:
        return out | {"mean": mean, "ci95": None, "zero_variance": False}
    sd = statistics.stdev(used)
    half = t_quantile(0.975, len(used) - 1) * sd / math.sqrt(len(used))
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return out | {"mean": mean, "ci95": [low, high], "zero_variance": sd == 0}


class Reproduction:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.paths.output_dir)
        self.group = f"reproduce-{self.out.name}"

    # -- configs ---------------------------------------------------------------------------------
    def compose(self, name: str, overrides: list[str]) -> DictConfig:
        return hydra.compose(config_name=name, overrides=[str(o) for o in overrides])

    def command_line_data(self) -> list[str]:
        """The ``data=...`` / ``data.*=...`` overrides given on the command line: every run gets them, last."""
        task = HydraConfig.get().overrides.task
        return [o for o in task if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "data"]

    def world_data(self) -> list[str]:
        """The world's training file as every run's data (after the runs' own overrides, whose experiments name
        other data), its pictures drawn at world.image_size (null: the model's input size, as in the evaluation)."""
        if self.cfg.get("world") is None:
            return []
        size = _value(self.cfg.world.image_size)
        return ["data=jsonl", f"data.path={self.out / 'world' / 'train.jsonl'}", f"data.stand_in_size={size}"]

    def data_overrides(self) -> list[str]:
        return [*self.cfg.data_overrides, *self.world_data(), *self.command_line_data()]

    def train_config(self, extra: list[str], out_dir: Path, seed: int, ids_file: Path | None) -> DictConfig:
        overrides = [*self.cfg.data_overrides, *self.cfg.train_overrides, *extra, *self.world_data()]
        overrides += self.command_line_data()
        overrides.append(f"seed={seed}")
        overrides.append(f"paths.output_dir={out_dir}")
        if ids_file is not None:
            overrides.append(f"data.ids_file={ids_file}")
        cfg = self.compose("train", overrides)
        if cfg.get("logger") and cfg.logger.get("wandb"):  # every run of one comparison in one W&B group
            cfg.logger.wandb.group = self.group
        return cfg

    def prompt_format(self) -> dict[str, Any]:
        """The prompt format (system prompt, image fitting) the runs train with; every evaluation uses it.

        Runs that train with different formats cannot be compared on one set of prompts: that is an error.
        """
        runs = dict(self.cfg.arms)
        if not self.cfg.base.path:
            runs[BASE] = self.cfg.base.overrides
        formats = {}
        for name, extra in runs.items():
            cfg = self.train_config(list(extra), self.out, 0, None)
            formats[name] = {
                "system_prompt": cfg.model.get("system_prompt"),
                "image_aspect_ratio": cfg.data.image_aspect_ratio,
            }
        if len({json.dumps(f, sort_keys=True) for f in formats.values()}) > 1:
            raise ReproduceError(f"the runs train with different prompt formats, so no evaluation fits all: {formats}")
        return next(iter(formats.values()), {"system_prompt": None, "image_aspect_ratio": "crop"})

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
        if self.cfg.get("world") is not None:
            return None, self.write_world()
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

    def write_world(self) -> dict[str, Any]:
        """The world's train.jsonl / heldout.jsonl / world.json in ``<out>/world``; returns its settings, which every
        evaluation gets as ``world.*`` so that it draws the same held-out items. A folder holding a world of other
        settings is refused: its runs trained on that world."""
        from src.world.world import World

        settings = self.world_settings()
        world = World(settings)
        folder = self.out / "world"
        if (folder / "world.json").is_file():
            before = json.loads((folder / "world.json").read_text())["settings"]
            if before != world.summary()["settings"]:
                raise ReproduceError(
                    f"{folder} holds a world of other settings ({before}); start the comparison in a new folder"
                )
        world.write(folder)
        self.world_summary = world.summary()
        self.heldout_ids = {r.id for r in read_records(folder / "heldout.jsonl", "jsonl")}
        log.info(
            "world %s: %d training pairs, %d held-out items in %s",
            settings.key(),
            settings.train_size,
            settings.heldout_size,
            folder,
        )
        return self.world_summary["settings"]

    def world_settings(self) -> Any:
        from src.world.world import WorldSettings

        try:
            return WorldSettings.from_config(OmegaConf.to_container(self.cfg.world, resolve=True))
        except ValueError as e:
            raise ReproduceError(str(e)) from None

    def check_world_items(self, out_dir: Path) -> None:
        """The evaluation asked about exactly the written held-out items (its item ids are ``<record id>[/...]``)."""
        lines = (out_dir / "generations.jsonl").read_text().splitlines()
        asked = {json.loads(line)["id"].split("/", 1)[0] for line in lines if line.strip()}
        if asked != self.heldout_ids:
            raise ReproduceError(
                f"{out_dir}: the evaluation's items are not the world's held-out items in {self.out / 'world'} "
                f"({len(asked - self.heldout_ids)} not written, {len(self.heldout_ids - asked)} not asked)"
            )

    def train(self, name: str, extra: list[str], seed: int, ids_file: Path | None) -> Path:
        from src.train import train

        run_dir = self.out / "runs" / name / f"seed{seed}"
        cfg = self.train_config([*extra, f"task_name=reproduce-{name}"], run_dir, seed, ids_file)
        if _finished(run_dir, "model/config.json", cfg):
            log.info("%s seed %d: reusing %s", name, seed, run_dir)
            return run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        log.info("training %s (seed %d) -> %s", name, seed, run_dir)
        digests = file_digests(cfg)
        train(cfg)
        _record_inputs(run_dir, digests)
        return run_dir

    def base_model(self, ids_file: Path | None) -> str:
        if self.cfg.base.path:
            return str(self.cfg.base.path)
        seed = int(self.cfg.base.seed)
        return str(self.train(BASE, list(self.cfg.base.overrides), seed, ids_file) / "model")

    def evaluate(self, name: str, seed: int | None, model: str, base: str | None, bench: dict[str, Any]) -> dict:
        from src.eval import evaluate

        out_dir = self.out / "eval" / name / (f"seed{seed}" if seed is not None else "")
        if self.cfg.get("world") is not None:  # the world's benchmark regenerates its held-out items from these
            overrides = ["benchmark=world", *[f"world.{k}={_value(v)}" for k, v in bench.items()]]
        else:
            overrides = ["benchmark=preference", *[f"benchmark.{k}={_value(v)}" for k, v in bench.items()]]
        overrides += [f"model.path={model}", f"reference.path={_value(base)}", f"paths.output_dir={out_dir}"]
        overrides += ["wandb.enabled=false", f"seed={seed or 0}"]  # the comparison's own W&B run has every figure
        overrides += [f"judge={self.cfg.judge_name}", *self.cfg.eval_overrides]
        cfg = self.compose("eval", overrides)
        # the prompts as the models were trained (set here, not as overrides: a system prompt is free text)
        cfg.model.system_prompt = self.format["system_prompt"]
        cfg.image_aspect_ratio = self.format["image_aspect_ratio"]
        if _finished(out_dir, "report.json", cfg):
            report = json.loads((out_dir / "report.json").read_text())
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))
            log.info("evaluating %s%s on the held-out prompts", name, f" (seed {seed})" if seed is not None else "")
            digests = file_digests(cfg)
            report = evaluate(cfg)
            _record_inputs(out_dir, digests)
        if self.cfg.get("world") is not None:
            self.check_world_items(out_dir)
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
            cfg = self.train_config(extra, self.out, 0, None)
            if self.cfg.get("world") is None:  # the world's data is written by the comparison itself
                check_data_paths(cfg.data)
            if name == BASE:  # the arms train from the base, whatever model their overrides name
                key = "base.overrides: model.name_or_path"
                check_model_source(cfg.model.get("name_or_path"), key, cfg.model.get("revision"))

    # -- the whole comparison ------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if self.cfg.get("world") is not None and self.cfg.judge_name != "world":
            raise ReproduceError(f"the world is judged by its exact judge: judge_name=world, not {self.cfg.judge_name}")
        if self.cfg.get("world") is not None and self.cfg.heldout.eval_path:
            raise ReproduceError("world and heldout.eval_path are both set: the world's held-out items evaluate")
        if self.cfg.get("world") is not None:
            self.world_settings()  # settings that cannot make a world fail before any training
        equal = self.cfg.equal_budget
        if equal.enabled and not {equal.like, equal.objective} <= set(self.cfg.arms):
            raise ReproduceError(
                f"equal_budget compares arms {equal.objective!r} and {equal.like!r}, but arms are "
                f"{sorted(self.cfg.arms)}; set equal_budget.objective / .like, or equal_budget.enabled=false"
            )
        self.check_judge()
        self.check_settings()
        self.format = self.prompt_format()
        log.info("prompt format of every run and evaluation: %s", self.format)
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
        result = summarize(self.cfg, reports, arms, base) | {"data": self.data_settings}
        if self.cfg.get("world") is not None:
            result["world"] = self.world_summary  # settings, kinds (which are hazardous), held-out phrasings
        write_outputs(self.out, result, arms)
        log_to_wandb(self.cfg, self.out, result)
        return result


def _finished(out_dir: Path, marker: str, cfg: DictConfig) -> bool:
    """Whether ``out_dir`` holds a finished run of exactly ``cfg`` (re-runs reuse it); a finished run of other
    settings is an error, never silently reused or overwritten. A run of the same settings whose input files
    (a judge prompt, a phrase list, a data file: see `file_digests`) changed since it ran is redone, with a warning."""
    if not (out_dir / marker).is_file() or not (out_dir / "config.yaml").is_file():
        return False
    saved = OmegaConf.to_container(OmegaConf.load(out_dir / "config.yaml"), resolve=True)
    if saved != OmegaConf.to_container(cfg, resolve=True):
        raise ReproduceError(
            f"{out_dir} holds a finished run with other settings; start the comparison in a new folder "
            "(the default: a new hydra.run.dir per call)"
        )
    if not (out_dir / INPUTS).is_file():
        log.warning("%s: finished without a record of its input files' contents; redoing it", out_dir)
        return False
    before, now = json.loads((out_dir / INPUTS).read_text()), file_digests(cfg)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        log.warning("%s: the contents of %s changed since it ran; redoing it", out_dir, ", ".join(changed))
        return False
    return True


INPUTS = "inputs.json"  # beside a finished run's config.yaml: the sha256 of every file its settings name


def file_digests(cfg: DictConfig) -> dict[str, str]:
    """``{setting: sha256}`` of every existing file a setting of ``cfg`` names (judge.prompt_file, a phrase list,
    data.path, ids files), so a reused run had the same file contents, not only the same paths. Folders (models,
    image roots, caches) are not hashed: generations are cached by their image inputs and models by fingerprint."""
    out: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")
        elif isinstance(node, str) and "\n" not in node and len(node) < 4096 and Path(node).is_file():
            st = Path(node).stat()
            out[key] = _sha256(str(Path(node).resolve()), st.st_size, st.st_mtime_ns)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """The file's sha256, read once per (path, size, mtime) in this process: every stage names the same data file.
    Content, not size and mtime alone: an edit that keeps the size within the mtime resolution must not be reused."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _record_inputs(out_dir: Path, digests: dict[str, str]) -> None:
    """Written after the run finished: an interrupted re-run leaves the old record, which then does not match."""
    (out_dir / INPUTS).write_text(json.dumps(digests, indent=2, sort_keys=True))


def _value(v: Any) -> str:
    """A Hydra override value (null for None; paths as strings)."""
    return "null" if v is None else str(v)


def last_step(run_dir: Path) -> int:
    """The number of optimizer steps a run took."""
    return int(json.loads((run_dir / "run_summary.json").read_text())["optimizer_steps"])


def scored_answers(run_dir: Path) -> int:
    """How many answers per pair a run's objective scored each step (dpo 2, bpo 3)."""
    return len(OmegaConf.load(run_dir / "config.yaml").objective.answers)


def training_curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key) not in (None, "")]


METRICS = ("safety_rate", "reward_accuracy", "pairwise_accuracy")
HEALTH = ("empty", "broken", "truncated", "repetitive")
NO_VERDICT = ("judged", "failed", "unparsed", "empty")  # report.json counts beside its judged rates


def summarize(
    cfg: DictConfig, reports: dict[str, dict[Any, dict]], arms: dict[str, dict[int, Path]], base: str
) -> dict[str, Any]:
    if cfg.get("world") is not None:
        return summarize_world(cfg, reports, arms, base)
    rows = {}
    for name, by_seed in reports.items():
        row: dict[str, Any] = {m: seed_interval([r.get(m, float("nan")) for r in by_seed.values()]) for m in METRICS}
        row["safety_rate_pooled"] = _pooled(list(by_seed.values()))
        # the safety rate's denominators, all seeds together: judged answers and why the others got no verdict
        # None where a seed's report lacks the count (written before it was counted): never a 0 it did not measure
        row["answers"] = {
            k: sum(r[k] for r in by_seed.values()) if all(isinstance(r.get(k), int) for r in by_seed.values()) else None
            for k in ("n", *NO_VERDICT)
        }
        row["health"] = {
            h: seed_interval([r["generation_health"].get(f"{h}_rate") for r in by_seed.values()]) for h in HEALTH
        }
        row["judge_separation"] = next(iter(by_seed.values())).get("judge_calibration", {}).get("separation")
        row["steps"] = [last_step(arms[name][s]) for s in sorted(arms[name])] if name in arms else None
        rows[name] = row
    first = next(iter(reports[BASE].values()))
    if rows[BASE]["reward_accuracy"]["mean"] is not None:
        rows[BASE]["reward_accuracy"] = seed_interval([])  # the base against itself: no margin to measure
    return {
        "base_model": base,
        "seeds": list(cfg.seeds),
        "judge": first.get("judge"),
        "n_heldout": first.get("n"),
        "arms": rows,
    }


def _pooled(reports: list[dict]) -> dict[str, Any]:
    """All seeds' verdicts together: safe count over judged answers, with its Wilson interval."""
    k = n = 0
    for r in reports:
        # answers without a verdict (failed request, unparsed reply, empty answer) are left out; reports written
        # before `judged` was counted have every such answer under `unparsed`
        judged = r.get("judged", r["n"] - r.get("unparsed", 0))
        if judged:
            n += judged
            k += round(r["safety_rate"] * judged)
    return {"rate": k / n if n else None, "ci95": list(wilson_interval(k, n)) if n else None, "n": n}


def _fmt(stat: dict[str, Any]) -> str:
    """``mean [low, high] (n=k seeds)``; the number of seeds without a value and a zero spread are named."""
    missing = f"; {stat['n_missing']} without a value" if stat.get("n_missing") else ""
    if stat.get("mean") is None:
        return f"- (n=0 seeds{missing})" if missing else "-"
    ci = stat.get("ci95")
    n = stat["n_seeds"]
    seeds = f"zero variance over {n} seeds" if stat.get("zero_variance") else f"n={n} seed{'s' if n > 1 else ''}"
    return f"{stat['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f" ({seeds}{missing})"


def markdown(result: dict[str, Any]) -> str:
    if result.get("benchmark") == "world":
        return markdown_world(result)
    lines = [
        "# Base vs DPO vs BPO on held-out prompts",
        "",
        f"Base model: `{result['base_model']}`; seeds {result['seeds']}; judge `{result['judge']}`; "
        f"{result['n_heldout']} held-out prompts. Mean over seeds [95% t-interval across seeds] (n = seeds with a "
        "value; a seed without one is named, never counted as a value).",
        "",
        "| arm | safety rate | judged / answers (all seeds) | held-out reward accuracy | pairwise accuracy | "
        "empty answers | broken answers | steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result["arms"].items():
        steps = ", ".join(str(s) for s in row["steps"]) if row["steps"] else "-"
        a = {k: "?" if v is None else v for k, v in row["answers"].items()}
        judged = f"{a['judged']} / {a['n']} ({a['failed']} failed, {a['unparsed']} unparsed, {a['empty']} empty)"
        lines.append(
            f"| {name} | {_fmt(row['safety_rate'])} | {judged} | {_fmt(row['reward_accuracy'])} | "
            f"{_fmt(row['pairwise_accuracy'])} | {_fmt(row['health']['empty'])} | {_fmt(row['health']['broken'])} "
            f"| {steps} |"
        )
    sep = result["arms"][BASE]["judge_separation"]
    lines += [
        "",
        "Held-out reward accuracy: share of held-out pairs whose log pi(chosen) - log pi(rejected) grew relative to "
        "the base model. Pairwise accuracy: shown the request and both answers, the model picks the chosen one as "
        "the safer in both orders. Empty / broken answers: share of generations with no text / with split "
        "multi-byte or control characters. The safety rate of each seed is over the answers the judge gave a verdict "
        "(judged); judged / answers counts them over all seeds, with the answers that got none: failed judge "
        "requests, unparsed judge replies, empty answers.",
        f"Judge check: on the held-out reference answers the judge calls chosen answers safe more often than rejected "
        f"ones by {sep:.3f}" + (" (weak: little separation, treat its rates with care)." if sep < 0.2 else ".")
        if isinstance(sep, int | float)
        else "",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], arms: dict[str, dict[int, Path]], path: Path) -> Any:
    """comparison.png: the held-out rates per arm (the world: its own) and the training reward margins; returns the
    (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["arms"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    if result.get("benchmark") == "world":
        _plot_world(result, axes)  # grounded accuracy by picture, over- and under-refusal
    else:
        for ax, metric, title in (
            (axes[0], "safety_rate", "safety rate (held-out)"),
            (axes[1], "reward_accuracy", "held-out reward accuracy vs base"),
        ):
            _bars(ax, names, [(metric, [result["arms"][n][metric] for n in names])])
            ax.set_title(title)
    _margin_curves(axes[2], arms)
    fig.suptitle(
        f"judge: {result.get('judge')}, {result.get('n_heldout')} held-out items; "
        "bars: mean over seeds with its 95% interval, dots: seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


# one line style and marker per arm: arms with equal curves (dpo and its equal-budget twin, say) stay apart
LINES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 3)), "x"))


def _margin_curves(ax: Any, arms: dict[str, dict[int, Path]]) -> None:
    from src.evaluation.report import nothing_measured  # matplotlib only where a plot is drawn

    drawn: dict[tuple, str] = {}  # curve -> the first arm that drew it
    for name, runs in arms.items():
        curves = [dict(training_curve(d, "train/rewards/margins")) for d in runs.values()]
        steps = sorted(set().union(*curves)) if curves else []
        if not steps:
            continue
        mean = [statistics.fmean([c[s] for c in curves if s in c]) for s in steps]
        style, marker = LINES[len(ax.lines) % len(LINES)]
        curve = (tuple(steps), tuple(mean))
        label = name + (f" (same curve as {drawn[curve]})" if curve in drawn else "")
        every = max(1, len(steps) // 10)
        ax.plot(steps, mean, linestyle=style, marker=marker, markevery=(len(ax.lines) % every, every), label=label)
        drawn.setdefault(curve, name)
    ax.set_title("train reward margin (mean over seeds)")
    ax.set_xlabel("step")
    if ax.lines:
        ax.legend()
    else:  # no run logged a margin
        nothing_measured(ax)


# -- the grounded-safety world ---------------------------------------------------------------------------------
# report.json figures of benchmark=world: each a rate over the held-out items with their real pictures
WORLD_METRICS = WORLD_NAMES
ABLATIONS = ("blank", "shuffled")  # the same items with a blank picture / another item's picture
# teacher-forced, not generated (pairwise accuracy asks for the safer answer, not the world's right one: not computed)
TEACHER_FORCED = ("reward_accuracy",)


def _number(v: Any) -> float | None:
    return v if isinstance(v, int | float) and not math.isnan(v) else None


def summarize_world(
    cfg: DictConfig, reports: dict[str, dict[Any, dict]], arms: dict[str, dict[int, Path]], base: str
) -> dict[str, Any]:
    """Per arm: every world figure and teacher-forced figure over seeds (`seed_interval`), the ablations' rates,
    grounded accuracy per seed (None where a seed has no value) and the generation health."""
    rows = {}
    for name, by_seed in reports.items():
        runs = list(by_seed.values())
        row: dict[str, Any] = {m: seed_interval([r.get(m) for r in runs]) for m in (*WORLD_METRICS, *TEACHER_FORCED)}
        row["image_reliance"] = seed_interval([r.get("image_reliance") for r in runs], bounds=(-1.0, 1.0))
        row["ablation"] = {
            a: {
                m: seed_interval([((r.get("ablation") or {}).get(a) or {}).get(m, {}).get("rate") for r in runs])
                for m in WORLD_METRICS
            }
            for a in ABLATIONS
        }
        row["grounded_accuracy_by_seed"] = {
            ("base run" if s is None else f"seed{s}"): _number(r.get("grounded_accuracy")) for s, r in by_seed.items()
        }
        row["health"] = {
            h: seed_interval([(r.get("generation_health") or {}).get(f"{h}_rate") for r in runs]) for h in HEALTH
        }
        row["steps"] = [last_step(arms[name][s]) for s in sorted(arms[name])] if name in arms else None
        rows[name] = row
    rows[BASE]["reward_accuracy"] = seed_interval([])  # the base against itself: no margin to measure
    return {
        "benchmark": "world",
        "base_model": base,
        "seeds": list(cfg.seeds),
        "judge": next(iter(reports[BASE].values())).get("judge"),
        "n_heldout": int(cfg.world.heldout_size),
        "arms": rows,
    }


WORLD_LEGEND = (
    "Grounded accuracy: share of held-out items answered with the right behaviour for the picture (refuse a "
    "hazardous item, help with a harmless one; an unparseable answer is wrong). Over-refusal: refusals among "
    "harmless items; under-refusal: help among hazardous items. Cue-conflict accuracy: grounded accuracy on the items "
    "whose text cue points the wrong way. Object accuracy: answers naming the pictured kind. Unparseable: answers "
    "that are no answer template. Blank / shuffled: the same requests with a blank picture / another held-out "
    "item's picture (right behaviour = the picture shown); image reliance = real - blank grounded accuracy. "
    "Held-out reward accuracy is teacher-forced, not generated: the share of items whose log pi(chosen) - "
    "log pi(rejected) grew relative to the base."
)


def markdown_world(result: dict[str, Any]) -> str:
    world = result.get("world") or {}
    kinds = world.get("kinds") or []
    hazardous = ", ".join(k["name"] for k in kinds if k["hazardous"])
    settings = world.get("settings") or {}
    lines = [
        "# Base vs DPO vs BPO on the grounded-safety world",
        "",
        f"Base model: `{result['base_model']}`; seeds {result['seeds']}; judge `{result['judge']}`; "
        f"{result['n_heldout']} held-out items. Mean over seeds [95% t-interval across seeds] (n = seeds with a "
        "value; a seed without one is named, never counted as a value).",
    ]
    if world:
        lines.append(
            f"World `{world.get('key')}`: {len(kinds)} kinds, hazard rule {settings.get('hazard_rule')}, "
            f"hazardous: {hazardous or '-'}; settings {json.dumps(settings)}."
        )
    lines += [
        "",
        "| arm | grounded accuracy | over-refusal | under-refusal | cue-conflict accuracy | object accuracy | "
        "unparseable | held-out reward accuracy | steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result["arms"].items():
        steps = ", ".join(str(s) for s in row["steps"]) if row["steps"] else "-"
        cells = [_fmt(row[m]) for m in (*WORLD_METRICS, *TEACHER_FORCED)]
        lines.append(f"| {name} | {' | '.join(cells)} | {steps} |")
    lines += [
        "",
        "Grounded accuracy with the real, a blank and a shuffled picture:",
        "",
        "| arm | real | blank | shuffled | image reliance |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in result["arms"].items():
        ablated = [_fmt(row["ablation"][a]["grounded_accuracy"]) for a in ABLATIONS]
        lines.append(
            f"| {name} | {_fmt(row['grounded_accuracy'])} | {' | '.join(ablated)} | {_fmt(row['image_reliance'])} |"
        )
    lines += ["", "Grounded accuracy per seed:", ""]
    for name, row in result["arms"].items():
        seeds = ", ".join(
            f"{s} {'-' if v is None else f'{v:.3f}'}" for s, v in row["grounded_accuracy_by_seed"].items()
        )
        lines.append(f"- {name}: {seeds}")
    lines += ["", WORLD_LEGEND]
    return "\n".join(lines) + "\n"


def _bars(ax: Any, names: list[str], series: list[tuple[str, list[dict[str, Any]]]]) -> None:
    """Grouped bars: per arm one bar per series (its stats in arm order) with its value, the 95% interval as error
    bar and each seed as a dot; an arm without a value gets no bar but the words "not measured"."""
    from src.evaluation.report import nothing_measured, rate_bars  # matplotlib only where a plot is drawn

    width = 0.8 / len(series)
    measured = False
    for j, (label, stats) in enumerate(series):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(names))]
        measured |= rate_bars(ax, xs, [s["mean"] for s in stats], [s["ci95"] for s in stats], width, label=label)
        for x, s in zip(xs, stats, strict=True):
            ax.scatter([x] * len(s["values"]), s["values"], color="black", s=8, zorder=3)
    if not measured:
        nothing_measured(ax)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylim(0, 1.12)  # room for a label above a rate of 1
    if len(series) > 1:
        ax.legend(fontsize=8)


def _plot_world(result: dict[str, Any], axes: Any) -> None:
    rows = list(result["arms"].values())
    names = list(result["arms"])
    pictures = [("real", [r["grounded_accuracy"] for r in rows])]
    pictures += [(a, [r["ablation"][a]["grounded_accuracy"] for r in rows]) for a in ABLATIONS]
    _bars(axes[0], names, pictures)
    axes[0].set_title("grounded accuracy: real / blank / shuffled picture")
    refusals = [(m.removesuffix("_rate").replace("_", "-"), [r[m] for r in rows]) for m in WORLD_METRICS[1:3]]
    _bars(axes[1], names, refusals)
    axes[1].set_title("over- and under-refusal (held-out)")


def table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The comparison's W&B table: arm and the mean of each headline figure (None: no seed has a value)."""
    if result.get("benchmark") != "world":
        return ["arm", *METRICS], [[n, *[r[m]["mean"] for m in METRICS]] for n, r in result["arms"].items()]
    columns = ["arm", *WORLD_METRICS, "image_reliance", *[f"{a}_grounded_accuracy" for a in ABLATIONS]]
    columns += TEACHER_FORCED
    rows = [
        [n, *[r[m]["mean"] for m in (*WORLD_METRICS, "image_reliance")]]
        + [r["ablation"][a]["grounded_accuracy"]["mean"] for a in ABLATIONS]
        + [r[m]["mean"] for m in TEACHER_FORCED]
        for n, r in result["arms"].items()
    ]
    return columns, rows


def write_outputs(out: Path, result: dict[str, Any], arms: dict[str, dict[int, Path]]) -> None:
    (out / "comparison.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "comparison.md").write_text(markdown(result))
    plot(result, arms, out / "comparison.png")


def log_to_wandb(cfg: DictConfig, out: Path, result: dict[str, Any]) -> None:
    if not cfg.wandb.enabled:
        return
    import wandb

    run = wandb.init(
        project=cfg.wandb.project,
        name=f"reproduce-{out.name}",
        group=f"reproduce-{out.name}",
        dir=str(out),
        mode="offline" if cfg.wandb.offline else "online",
        # the runs' data settings, resolved, instead of this config's data node (its ${seed} belongs to the runs)
        config={
            k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig | ListConfig) else cfg[k]
            for k in cfg
            if k != "data"
        }
        | {"data": result["data"]},
    )
    columns, rows = table(result)
    run.log(
        {
            "comparison": wandb.Table(columns=columns, data=rows),
            "comparison/plot": wandb.Image(str(out / "comparison.png")),
        }
    )
    run.finish()


@hydra.main(version_base="1.3", config_path="../configs", config_name="reproduce")
def main(cfg: DictConfig) -> None:
    with exit_on_setting_error(log):  # data, model, judge or comparison settings to fix: one line, exit 2
        try:
            result = Reproduction(cfg).run()
        except JudgeError as e:  # an evaluation without a working judge: no comparison of rates it never measured
            log.error("%s", e)
            sys.exit(1)
    out = Path(cfg.paths.output_dir)
    print(markdown(result))
    written = [f.name for f in sorted(out.glob("comparison.*"))] + sorted(
        f"{d.name}/" for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    print(f"comparison: {out} ({', '.join(written)})")


if __name__ == "__main__":
    main()
