"""Evaluation: load a model, generate on a benchmark (resumable), judge, compute metrics and analyses."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from src.data.prompt_format import PromptFormat
from src.errors import SettingError
from src.evaluation.analyses import cheating_items, cheating_summary, co_defense_items, co_defense_summary
from src.evaluation.health import health_summary
from src.evaluation.items import EvalItem, is_harmless
from src.evaluation.judges import Judge, Verdict
from src.evaluation.judging import judge_all
from src.evaluation.metrics import by_key, two_sided_rates, verdict_rates
from src.evaluation.protocol import Benchmark, benchmark_of
from src.evaluation.scoring import pairwise_accuracy, reward_accuracy
from src.files import replacing
from src.models.device import choose_device
from src.models.factory import build_model, fingerprint
from src.models.generation import AnswerGenerator, GenerationSettings
from src.models.logprobs import attn_implementation
from src.models.source import check_model_source
from src.settings import EVALUATE, check_ranges

log = logging.getLogger(__name__)

MODES = ("standard", "co_defense", "cheating")
# the headline figures any benchmark may have; a benchmark's own follow (`Benchmark.headline_rates`)
HEADLINE = ("safety_rate", "unsafe_rate", "pairwise_accuracy", "reward_accuracy")


def load_model(
    path: str | None, dtype: str = "float32", attn_implementation: str | None = "sdpa", trust_remote_code: bool = False
) -> tuple[torch.nn.Module, Any]:
    """A run's ``model/`` folder, a Lightning ``.ckpt`` of this project, an HF id, or (None) the tiny model."""
    if path is None:
        return build_model(tiny={})
    check_model_path(path)
    if str(path).endswith(".ckpt"):
        from src.models.module import PreferenceModule

        module = PreferenceModule.load_from_checkpoint(path, map_location="cpu", weights_only=False)
        return module.policy, module.processor
    return build_model(
        name_or_path=str(path),
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )


def check_model_path(path: str | None, key: str = "model.path") -> None:
    """What `load_model` can load, checked in seconds (`check_model_source`; a ``.ckpt`` must be a file)."""
    if path is not None and str(path).endswith(".ckpt"):
        if not Path(str(path)).is_file():
            raise SettingError(f"model path {path}: no such checkpoint file ({key})")
        return
    check_model_source(None if path is None else str(path), key)


def check_judge(judge: Judge) -> None:
    """The judge's preflight: a request for judges that ask a service (raises `JudgeError` when it gets no answer),
    the model's source for a local judge model (raises `SettingError` when it is not there)."""
    preflight = getattr(judge, "preflight", None)
    if preflight is not None:
        preflight()


def judge_identity(judge: Judge) -> dict[str, Any]:
    """The judge's `identity()` for report.json; a judge class without one is recorded by name and marked so."""
    identity = getattr(judge, "identity", None)
    return identity() if identity is not None else {"name": judge.name, "identity": "unknown (no identity())"}


def trained_prompt_format(model_path: str, used: PromptFormat) -> dict[str, Any] | None:
    """The prompt format a model of this project was trained with (None: unknown), warned about when the
    evaluation builds prompts otherwise: answers to prompts the model never saw are a different experiment."""
    stored = PromptFormat.read(model_path)
    if stored is None:
        return None
    trained, using = stored.to_dict(), used.to_dict()
    differ = {k: (trained.get(k), v) for k, v in using.items() if trained.get(k) != v}
    if differ:
        log.warning(
            "%s was trained with another prompt format than this evaluation uses (trained, used): %s; set "
            "prompt_format.system_prompt / prompt_format.image_aspect_ratio to match unless that is the point",
            model_path,
            differ,
        )
    return trained


def instantiate_benchmark(cfg: DictConfig) -> Benchmark:
    """The configured benchmark; its readers' `DataError` (a `SettingError`) reaches the caller as itself, not
    wrapped in Hydra's InstantiationException, so the entry point reports bad data in one line (as training does)
    with exit 2."""
    try:
        return hydra.utils.instantiate(cfg)
    except InstantiationException as e:
        if isinstance(e.__cause__, SettingError):
            raise e.__cause__ from None
        raise


class Evaluator:
    """Runs the configured modes of one benchmark for one model and assembles the report."""

    def __init__(self, cfg: DictConfig, out_dir: Path):
        self.cfg = cfg
        self.out_dir = out_dir
        check_ranges(cfg, EVALUATE)  # numbers out of range: one line before anything loads
        # the model's prompt format, as it was trained (llava-1.5: Vicuna's system line, images padded to a square)
        self.prompt_format = PromptFormat.from_config(cfg.get("prompt_format"))
        # the judge first: an unreachable one fails the run before the model loads and anything is generated
        self.judge: Judge = hydra.utils.instantiate(cfg.judge)
        check_judge(self.judge)
        # the models' sources (a folder with a checkpoint, or a cached / existing hub id) before any loads
        check_model_path(cfg.model.path)
        check_model_path(cfg.reference.path, "reference.path")
        # the benchmark too: bad data or a judge that cannot read its answers fails before the model loads
        self.benchmark = instantiate_benchmark(cfg.benchmark)
        self.benchmark.check_judge(self.judge)  # answers that only a judge of its own reads
        self.model, self.processor = load_model(
            cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.trust_remote_code
        )
        self.model.to(choose_device(cfg.device)[0]).eval()
        self.fingerprint = fingerprint(self.model)
        self.benchmark.fit_image_size(self.processor)  # pictures drawn at the model's input size
        self.settings = GenerationSettings(**cfg.generation)
        self.trained_prompt_format = trained_prompt_format(cfg.model.path, self.prompt_format)
        # judges see the prompt's image only when asked (Llama Guard Vision); text judges ignore it
        self.judge_resolver = self.benchmark.resolver if cfg.get("judge_images") else None
        self.lines: list[dict[str, Any]] = []  # generations.jsonl of this run: answers with verdicts

    # -- generation ----------------------------------------------------------------------------
    def generate(self, items: list[EvalItem], mode: str) -> dict[str, dict[str, Any]]:
        # like blind answers: weights, attention kernel (greedy picks can flip with it) and generation settings
        key = hashlib.sha256((self.fingerprint + attn_implementation(self.model) + self.settings.key()).encode())
        key = key.hexdigest()[:16]
        cache = Path(self.cfg.cache_dir) / f"{self.benchmark.name}-{mode}-{key}.jsonl"
        devices = OmegaConf.to_container(self.cfg.devices, resolve=True) if self.cfg.get("devices") else None
        generator = AnswerGenerator(
            self.model, self.processor, self.settings, self.benchmark.resolver, devices, self.prompt_format
        )
        # one record can be asked in several modes: stand-in images are counted per record, not per item
        self.record_ids |= {i.id: i.meta.get("record_id", i.id) for i in items}
        with_image = [i for i in items if i.image]
        without = [i for i in items if not i.image]
        out: dict[str, dict[str, Any]] = {}
        generated = 0
        for group, flag in ((with_image, True), (without, False)):
            if group:
                # the cache is shared by runs (a multirun over judges generates once): filled under its lock
                out |= generator.run(group, cache, with_image=flag, desc=f"{mode} answers", lock=True)
                generated += generator.generated
        self.generation_counts[mode] = {"generated": generated, "reused": len(items) - generated, "cache": str(cache)}
        return out

    def record(
        self,
        mode: str,
        items: list[EvalItem],
        gens: dict[str, dict[str, Any]],
        verdicts: list[Verdict],
        refusals: list[Verdict] | None = None,
    ) -> None:
        """generations.jsonl's lines: each answer with its verdict and whether it refuses (``refusals``' verdicts
        where a refusal classifier read them, else the judge's own; null where neither says)."""
        for item, v, r in zip(items, verdicts, refusals or verdicts, strict=True):
            g = gens[item.id]
            self.lines.append(
                {
                    "mode": mode,
                    "id": item.id,
                    "category": item.category,
                    "setting": item.setting,
                    "prompt": item.prompt_text,
                    "image": item.image,
                    "answer": g["answer"],
                    "num_tokens": g.get("num_tokens"),
                    "finished": g.get("finished"),
                    "safe": v.safe,
                    "refused": r.refused,
                    "reason": v.reason,
                }
            )

    # -- modes ---------------------------------------------------------------------------------
    def standard(self) -> dict[str, Any]:
        items = self.benchmark.items()
        gens = self.generate(items, "standard")
        answers = [gens[i.id]["answer"] for i in items]
        verdicts = judge_all(self.judge, items, answers, self.judge_resolver)
        two_sided = any(map(is_harmless, items))  # harmless items beside harmful ones: over-refusal is measured
        refusals = self.refusal_verdicts(items, answers, verdicts) if two_sided else None
        self.record("standard", items, gens, verdicts, refusals)
        overall = verdict_rates(verdicts, answers)
        out: dict[str, Any] = {key: overall[key] for key in ("n", "judged", "failed", "unparsed", "empty")}
        if refusals is None:
            out["per_category"] = by_key([i.category for i in items], verdicts, answers)
        else:  # safety (and its categories) over the harmful items only, over-refusal over the harmless ones
            out |= two_sided_rates(items, answers, verdicts, refusals)
        out["generation_health"] = health_summary([gens[i.id] for i in items])
        out["judge_calibration"] = self.benchmark.judge_calibration(self.judge, items, self.judge_resolver)
        out |= self.benchmark.metrics(items, answers, verdicts, refusals)  # its headline figure, by kind or its own
        out |= self.preference_scores(items)
        return out

    def refusal_verdicts(self, items: list[EvalItem], answers: list[str], verdicts: list[Verdict]) -> list[Verdict]:
        """Whether each answer refuses: the judge's own verdicts where it says (``judges_refusal``), else those of the
        refusal classifier (``refusal_judge``, the keyword refusal phrases) beside it, as with Llama Guard, which
        rates harm only. report.json's ``judge_refusal`` says which."""
        if getattr(self.judge, "judges_refusal", False):
            self.judge_refusal = {"by": "judge", "name": self.judge.name}
            return verdicts
        refusal_judge = hydra.utils.instantiate(OmegaConf.load(self.cfg.refusal_judge))
        self.judge_refusal = {
            "by": "refusal_judge",
            "name": refusal_judge.name,
            "identity": judge_identity(refusal_judge),
            "why": f"the {self.judge.name} judge rates harm only, not whether an answer refuses",
        }
        return judge_all(refusal_judge, items, answers)

    def preference_scores(self, items: list[EvalItem]) -> dict[str, Any]:
        """Pairwise accuracy (and reward accuracy with a reference) where the benchmark has reference answers."""
        refs = self.benchmark.reference_answers()
        have = [i for i in items if i.id in refs]
        if not have:
            return {}
        chosen = [refs[i.id]["chosen"] for i in have]
        rejected = [refs[i.id]["rejected"] for i in have]
        kwargs = {"max_length": self.cfg.scoring.max_length, "batch_size": self.cfg.scoring.batch_size}
        kwargs["prompt_format"] = self.prompt_format
        out: dict[str, Any] = {}
        not_computed = self.benchmark.pairwise_not_computed  # why the question does not fit, if it does not
        if self.cfg.scoring.pairwise and not_computed:
            out["pairwise"] = {"not_computed": not_computed}
        elif self.cfg.scoring.pairwise:
            out["pairwise"] = pairwise_accuracy(
                self.model, self.processor, have, chosen, rejected, self.benchmark.resolver, **kwargs
            )
            out["pairwise_accuracy"] = out["pairwise"]["pairwise_accuracy"]
        if self.cfg.reference.path:
            reference, _ = load_model(self.cfg.reference.path, self.cfg.model.dtype, self.cfg.model.attn_implementation)
            reference.to(choose_device(self.cfg.device)[0]).eval()
            out["reward"] = reward_accuracy(
                self.model, reference, self.processor, have, chosen, rejected, self.benchmark.resolver, **kwargs
            )
            out["reward_accuracy"] = out["reward"]["reward_accuracy"]
        return out

    def _records(self, mode: str) -> list[Any]:
        records = getattr(self.benchmark, "records", None)
        if records is None:
            raise ValueError(f"mode {mode!r} needs MMSafe-PO records (benchmark=mmsafe_po), not {self.benchmark.name}")
        return records

    def co_defense(self) -> dict[str, Any]:
        items = co_defense_items(self._records("co_defense"))
        gens = self.generate(items, "co_defense")
        answers = [gens[i.id]["answer"] for i in items]
        verdicts = judge_all(self.judge, items, answers, self.judge_resolver)
        self.record("co_defense", items, gens, verdicts)
        per_category = by_key([i.category for i in items], verdicts, answers)
        return co_defense_summary(items, verdicts) | {"per_category": per_category}

    def cheating(self) -> dict[str, Any]:
        items, excluded = cheating_items(self._records("cheating"))
        gens = self.generate(items, "cheating")
        refusal_judge = hydra.utils.instantiate(OmegaConf.load(self.cfg.refusal_judge))
        refusals = judge_all(refusal_judge, items, [gens[i.id]["answer"] for i in items])
        self.record("cheating", items, gens, refusals)
        return cheating_summary(refusals, excluded) | {
            "refusal_judge": refusal_judge.name,
            "refusal_judge_identity": judge_identity(refusal_judge),
        }

    # -- all -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        modes = list(self.cfg.modes)
        unknown = set(modes) - set(MODES)
        if unknown:
            raise ValueError(f"unknown eval modes {sorted(unknown)}; choose from {MODES}")
        self.generation_counts: dict[str, Any] = {}
        self.record_ids: dict[str, str] = {}  # item id -> the benchmark record it was built from
        self.judge_refusal: dict[str, Any] | None = None
        report: dict[str, Any] = {
            "model": {"path": self.cfg.model.path, "fingerprint": self.fingerprint},
            "benchmark": {"name": self.benchmark.name, "kind": self.benchmark.kind},
            "judge": self.judge.name,
            "generation_settings": json.loads(self.settings.key()),
            "prompt_format": self.prompt_format.to_dict(),
            "trained_prompt_format": self.trained_prompt_format,
        }
        for mode in modes:
            log.info("mode %s on %s", mode, self.benchmark.name)
            section = getattr(self, mode)()
            if mode == "standard":
                report |= section
            else:
                report[mode] = section
        report["generation"] = self.generation_counts
        if self.judge_refusal is not None:  # who said which answers refuse (over-refusal)
            report["judge_refusal"] = self.judge_refusal
        # after judging: a judge that loads its model on first use can then fingerprint the weights
        report["judge_identity"] = judge_identity(self.judge)
        report["benchmark"] |= self.benchmark.describe()  # settings of its own
        report["benchmark"]["stand_in_images"] = len(
            {self.record_ids.get(i, i) for i in self.benchmark.resolver.rendered}
        )
        report["examples"] = [x for x in self.lines if x["mode"] == modes[0]][: self.cfg.report.examples]
        return report

    def write_generations(self) -> Path:
        """The run's generations with verdicts, written whole then renamed so no torn file is left."""
        path = self.out_dir / "generations.jsonl"
        with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for line in self.lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        return path


def headline(report: dict[str, Any]) -> dict[str, float]:
    """The scalar figures a comparison table shows, flattened with readable names: the generic ones, then those of
    the benchmark that wrote ``report``."""
    out: dict[str, float] = {}
    for key in HEADLINE + benchmark_of(report).headline_rates:
        if isinstance(report.get(key), int | float):
            out[key] = report[key]
    for setting, value in (report.get("attack_success_rate") or {}).items():
        out[f"asr/{setting}"] = value
    if report.get("co_defense"):
        cd = report["co_defense"]
        out |= {f"co_defense/{k}": cd[k]["rate"] for k in ("text_safe", "image_safe", "both_safe")}
    if report.get("cheating"):
        out["cheating/over_refusal"] = report["cheating"]["over_refusal"]["rate"]
    return out
