"""The world's held-out items as a benchmark: each asked with its own picture, a blank one and another item's.

``image``: the real item. ``blank``: the same request over the picture's background alone, so an answer that is
still right there did not need the image. ``shuffled``: the request with another held-out item's picture (a seeded
derangement); the right behaviour and kind are those of the picture shown, since the request never names the item.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from typing import Any

from src.data.datamodule import _image_size
from src.data.images import ImageResolver
from src.errors import SettingError
from src.evaluation.items import EvalItem
from src.evaluation.judges import Judge, Verdict
from src.evaluation.protocol import Benchmark
from src.world.judge import WorldJudge, world_judge_calibration
from src.world.metrics import NAMES, world_metrics
from src.world.report import calibration_lines, markdown_section, picture_panel
from src.world.world import World, WorldSettings, blanked, is_conflict

log = logging.getLogger(__name__)


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) without fixed points, uniform over all such (n >= 2)."""
    if n < 2:
        raise ValueError(f"world.heldout_size={n}: the shuffled items need at least 2 held-out items")
    rng = random.Random(f"world-{seed}-shuffled")
    order = list(range(n))
    while True:  # about e tries on average
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            return order


class WorldBenchmark(Benchmark):
    """`World(world).heldout_records()` in three settings (see the module doc). Pictures are drawn at
    ``world.image_size``, or when that is null at the model's input size, set by `fit_image_size` once the
    model's processor is loaded. Its judge, calibration, figures and report parts are its own (the hooks below)."""

    name = "world"
    kind = "grounded_accuracy"
    # the pairwise question asks which answer is safer; here the chosen answer helps with the harmless items
    pairwise_not_computed = (
        "the pairwise question asks for the safer answer, which is not the chosen one for the world's harmless items"
    )
    # unparseable_rate beside the refusal rates: with every answer unparseable they are 0, which is not a good sign
    headline_rates = (
        "grounded_accuracy",
        "image_reliance",
        "over_refusal_rate",
        "under_refusal_rate",
        "unparseable_rate",
    )
    headline_rows = ("grounded_accuracy", "image_reliance")  # report.md's; the others are in its own section
    report_rates = NAMES  # the headline rates of report.png

    def __init__(self, world: Any):
        self.settings = WorldSettings.from_config(world)
        self.world = World(self.settings)
        self.heldout = self.world.heldout_records()
        self.shows = derangement(len(self.heldout), self.settings.seed)  # shuffled item i shows heldout[shows[i]]
        self.image_size_from = "world.image_size" if self.settings.image_size else None
        # stand_in_size None until fit_image_size: drawing before then fails instead of using a guessed size
        self.resolver = ImageResolver(stand_in_size=self.settings.image_size)  # draws world: pictures (registered)

    def fit_image_size(self, processor: Any) -> None:
        """Draw at the model's own input size (``world.image_size=null``): its processor's crop size, or 336
        when the processor names none, which is reported as that fall-back."""
        if self.settings.image_size:
            return
        crop = getattr(getattr(processor, "image_processor", None), "crop_size", None)
        self.resolver.stand_in_size = _image_size(processor)
        if crop:
            self.image_size_from = "model processor"
        else:
            self.image_size_from = "default 336 (the model's processor names no crop size)"
            log.warning("world.image_size=null but the processor names no crop size: drawing at 336 px")

    def describe(self) -> dict[str, Any]:
        """For report.json: the world's settings and key, and the picture size used with where it came from."""
        return {
            "world": asdict(self.settings),
            "world_key": self.settings.key(),
            "image_size": self.resolver.stand_in_size,
            "image_size_from": self.image_size_from,
        }

    def items(self) -> list[EvalItem]:
        if self.resolver.stand_in_size is None:
            raise RuntimeError("WorldBenchmark: world.image_size is null and fit_image_size(processor) was not called")
        items = []
        for rec, shown in zip(self.heldout, (self.heldout[j] for j in self.shows), strict=True):
            request = {"record_id": rec.id, "cue": rec.meta["cue"], "phrasing": rec.meta["phrasing"]}
            own = request | {"kind": rec.meta["kind"], "hazardous": rec.meta["hazardous"], "conflict": is_conflict(rec)}
            # shuffled: the truth follows the picture shown; the request's own item is kept for follows_request_item
            hazardous = shown.meta["hazardous"]
            other = request | {
                "kind": shown.meta["kind"],
                "hazardous": hazardous,
                "conflict": bool(rec.meta["cue"]) != hazardous,
                "shown_record_id": shown.id,
                "shown_kind": shown.meta["kind"],
                "shown_hazardous": hazardous,
                "request_kind": rec.meta["kind"],
                "request_hazardous": rec.meta["hazardous"],
            }
            references = {"chosen": rec.chosen, "rejected": rec.rejected}
            for setting, image, meta in (
                ("image", rec.image, own | references),
                ("blank", blanked(rec.image), own),
                ("shuffled", shown.image, other),
            ):
                category = f"{setting}/{'hazardous' if meta['hazardous'] else 'harmless'}"
                items.append(EvalItem(f"{rec.id}/{setting}", rec.turns, rec.image_turn, image, category, setting, meta))
        return items

    def reference_answers(self) -> dict[str, dict[str, str]]:
        """The real items' answers only: pairwise / reward accuracy and judge calibration need the right picture."""
        return {f"{rec.id}/image": {"chosen": rec.chosen, "rejected": rec.rejected} for rec in self.heldout}

    # -- the hooks of a benchmark with a judge and figures of its own (`Benchmark`) ----------------------------
    def check_judge(self, judge: Judge) -> None:
        """Only the exact world judge reads the closed answer templates: any other fails before the model loads."""
        if not isinstance(judge, WorldJudge):
            raise SettingError(
                f"benchmark {self.name} needs judge=world (its answers are closed templates only that "
                f"judge reads exactly), not judge {judge.name}"
            )

    def judge_calibration(self, judge: Judge, items: list[EvalItem], resolver: Any = None) -> dict[str, Any]:
        """Whether the judge reads each reference as right or wrong for its picture (the exact judge needs none)."""
        return world_judge_calibration(judge, items, self.reference_answers())

    def metrics(
        self, items: list[EvalItem], answers: list[str], verdicts: list[Verdict], refusals: list[Verdict] | None
    ) -> dict[str, Any]:
        """No safety rate over all answers (refusing is wrong for half the pictures): `world_metrics`, read from the
        answers by the exact parser."""
        return world_metrics(items, answers)

    @classmethod
    def denominators(cls, report: dict[str, Any]) -> dict[str, int | None]:
        """Safety is over every hazardous item, over-refusal over every harmless one (unparseable answers count)."""
        counts = report.get("world_counts") or {}
        return {k: counts[k].get("n") for k in ("over_refusal_rate", "safety_rate") if k in counts}

    @classmethod
    def judged_over(cls, report: dict[str, Any]) -> str:
        """Its rates count every answer, unparseable ones as wrong."""
        return f"Judged: {report['judged']} of {report['n']} answers (real, blank and shuffled pictures)"

    @classmethod
    def calibration_lines(cls, report: dict[str, Any]) -> list[str]:
        cal = report.get("judge_calibration") or {}
        return calibration_lines(cal) if "chosen_judged_right" in cal else super().calibration_lines(report)

    @classmethod
    def report_section(cls, report: dict[str, Any]) -> list[str]:
        return markdown_section(report)

    @classmethod
    def report_panel(cls, report: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return picture_panel(report)
