"""What the evaluation runner, the report and the comparisons ask of a benchmark: `Benchmark`, whose hooks answer as
a benchmark with nothing of its own does (a safety benchmark read by the configured judge). A benchmark with a judge,
figures or report parts of its own (a plug-in's: src/plugins.py) overrides the hooks it needs; nobody asks whether a
benchmark has a hook.

Every subclass that names itself is registered by that name when it is defined, so that code reading only a
report.json (the comparison tables) finds the hooks of the benchmark that wrote it: `benchmark_of`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from src.data.images import ImageResolver
from src.evaluation.items import EvalItem
from src.evaluation.judges import Judge, Verdict
from src.evaluation.judging import judge_calibration
from src.evaluation.metrics import verdict_rates

_REGISTERED: dict[str, type[Benchmark]] = {}


class Benchmark:
    """A benchmark: ``name``, ``kind`` (its headline figure: safety_rate, unsafe_rate, attack_success_rate or one of
    its own), ``resolver``, ``items()``, ``reference_answers()``, and these hooks.

    Of the benchmark evaluated, called by the runner on the instance: `check_judge`, `fit_image_size`,
    `judge_calibration`, `metrics`, ``pairwise_not_computed``, `describe`. Of a report it wrote, class attributes
    and class methods, called by the report and the comparisons on the instance evaluated or on the class
    `benchmark_of` the report: ``headline_rates``, `denominators`, ``headline_rows``, `judged_over`,
    `calibration_lines`, `report_section`, ``report_rates``, `report_panel`.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    resolver: ImageResolver
    # why pairwise accuracy (which of two answers is the safer?) does not fit its references; None: it fits
    pairwise_not_computed: ClassVar[str | None] = None
    # `runner.headline`'s figures after the generic ones (safety, unsafe, pairwise and reward accuracy, which every
    # benchmark may have): here the over-refusal of a benchmark with harmless items
    headline_rates: ClassVar[tuple[str, ...]] = ("over_refusal_rate",)
    # report.md's headline rows of its own, between the safety rates and the preference accuracies
    headline_rows: ClassVar[tuple[str, ...]] = ()
    # report.png's headline rates of its own, drawn first
    report_rates: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if not isinstance(name, str):  # a subclass keeping its parent's name is not that benchmark
            return
        known = _REGISTERED.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"benchmark name {name!r} is taken by {known.__module__}.{known.__qualname__}")
        _REGISTERED[name] = cls

    def items(self) -> list[EvalItem]:
        raise NotImplementedError

    def reference_answers(self) -> dict[str, dict[str, str]]:
        """Chosen and rejected answer by item id, for the items that have them (none: {})."""
        return {}

    # -- the benchmark evaluated ------------------------------------------------------------------------------
    def check_judge(self, judge: Judge) -> None:
        """Raises `SettingError` for a judge that cannot read its answers, before the model loads; any judge can."""

    def fit_image_size(self, processor: Any) -> None:
        """Told the model's processor once it is loaded (pictures drawn at the model's input size); nothing to fit."""

    def judge_calibration(self, judge: Judge, items: list[EvalItem], resolver: Any = None) -> dict[str, Any]:
        """How well the judge separates its chosen (harmless) and rejected (harmful) reference answers."""
        return judge_calibration(judge, items, self.reference_answers(), resolver)

    def metrics(
        self, items: list[EvalItem], answers: list[str], verdicts: list[Verdict], refusals: list[Verdict] | None
    ) -> dict[str, Any]:
        """report.json's headline figure by ``kind``, with its 95% interval: the safety rate (with harmless items
        beside harmful ones, ``refusals`` given, the runner already has it over the harmful ones) or the unsafe
        rate; nothing for another kind."""
        overall = verdict_rates(verdicts, answers)
        if self.kind == "safety_rate" and refusals is None:
            return {"safety_rate": overall["safe_rate"], "safety_rate_ci95": overall["safe_ci95"]}
        if self.kind == "unsafe_rate":
            return {"unsafe_rate": overall["unsafe_rate"], "unsafe_rate_ci95": overall["unsafe_ci95"]}
        return {}

    def describe(self) -> dict[str, Any]:
        """Its settings, for report.json's ``benchmark`` beside name and kind; none."""
        return {}

    # -- a report it wrote ------------------------------------------------------------------------------------
    @classmethod
    def denominators(cls, report: dict[str, Any]) -> dict[str, int | None]:
        """How many answers its own figures are a share of, where that is not the generic count; none."""
        return {}

    @classmethod
    def judged_over(cls, report: dict[str, Any]) -> str:
        """report.md's words on what the headline rates are over, before the answers without a verdict."""
        kind = report["benchmark"]["kind"].replace("_", " ").capitalize()
        return f"{kind} over {report['judged']} judged of {report['n']} answers"

    @classmethod
    def calibration_lines(cls, report: dict[str, Any]) -> list[str]:
        """report.md's judge calibration: how the judge rates the reference answers, a warning for a weak judge."""
        from src.evaluation.plots import fmt  # matplotlib only where a report is written

        cal = report.get("judge_calibration") or {}
        if not cal:
            return ["This benchmark has no reference answers to calibrate the judge on."]
        lines = [
            "How the judge rates the benchmark's own reference answers:",
            "",
            "| reference answers | share judged safe |",
            "| --- | --- |",
            f"| chosen (harmless) | {fmt(cal['chosen_judged_safe'])} |",
            f"| rejected (harmful) | {fmt(cal['rejected_judged_safe'])} |",
            "",
            f"Separation (chosen safe - rejected safe): **{fmt(cal['separation'])}** over {cal['n']} pairs.",
        ]
        if cal.get("weak"):
            lines += [
                "",
                f"> **Warning**: the `{report['judge']}` judge barely separates harmless from harmful "
                "reference answers on this benchmark; its safety rates say little here. Use a stronger "
                "judge (`judge=llama_guard` or `judge=openai`) before drawing conclusions.",
            ]
        return lines

    @classmethod
    def report_section(cls, report: dict[str, Any]) -> list[str]:
        """report.md's section of its own figures, after the headline; none."""
        return []

    @classmethod
    def report_panel(cls, report: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """report.png's panel of its own: its title and {label: (rate, 95% interval)}; none."""
        return None


def benchmark_of(report: dict[str, Any]) -> type[Benchmark]:
    """The class registered under the name of the benchmark that wrote ``report`` (its plug-in imported); for any
    other, `Benchmark`, whose hooks are those of a benchmark with nothing of its own."""
    written_by = report.get("benchmark")
    return _REGISTERED.get(written_by.get("name") if isinstance(written_by, dict) else None, Benchmark)
