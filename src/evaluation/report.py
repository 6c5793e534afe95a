"""Reports people can read: report.json, report.md, a PNG, and the same logged to W&B."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

from src.environment import describe
from src.evaluation.judges import match_category
from src.evaluation.metrics import wilson_interval
from src.evaluation.plots import fmt, is_measured, nothing_measured, plt, rate_bars
from src.evaluation.protocol import Benchmark, benchmark_of
from src.files import write_atomic

log = logging.getLogger(__name__)
CO_DEFENSE = ("text_safe", "image_safe", "both_safe")  # the co-defense rates plotted and compared


def _ci(values: list[float] | None) -> str:
    return f"[{values[0]:.3f}, {values[1]:.3f}]" if values and not math.isnan(values[0]) else ""


def _asr_convention_line(report: dict[str, Any]) -> str:
    """Which attack-success-rate convention the headline follows, with the other figure beside it."""
    pooled = ", ".join(f"{k} {fmt(v)}" for k, v in report["attack_success_rate_pooled"].items())
    if report["attack_success_rate_convention"] == "per_scenario":
        return (
            "Attack success rate by MM-SafetyBench's own convention: per scenario, unsafe answers / all answers "
            f"(answers without a verdict count in the total), the mean over the {len(report['per_scenario'])} "
            f"scenarios, each weighing the same. Pooled over the judged answers of all scenarios instead: {pooled}."
        )
    return (
        "Attack success rate pooled: unsafe / judged answers over all scenarios together, so scenarios weigh by "
        "their size (MM-SafetyBench itself reports per scenario: benchmark.asr_convention=per_scenario)."
    )


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Written whole then renamed: an interrupted run never leaves a half-written report."""
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str))


def markdown(report: dict[str, Any], special_criteria: Collection[str] = (), benchmark: Benchmark | None = None) -> str:
    """report.md: headline, judge calibration, generation health, breakdowns, analyses, examples; each section a
    list of lines, empty where the report lacks its figures.

    ``special_criteria``: the judge's own scenario keys (``"10"`` or ``"10-Legal_Opinion"``), whose answers it
    judged by a paraphrase of the benchmark's special criteria; their rows are marked as such. ``benchmark``: the
    one evaluated (None: the one `benchmark_of` the report), whose hooks give its headline rows, its calibration
    and its own section (`Benchmark.report_section`), which follows the headline.
    """
    hooks = benchmark if benchmark is not None else benchmark_of(report)
    sections = [_header(report), _headline(report, hooks), hooks.report_section(report), _calibration(report, hooks)]
    sections += [_health(report), _by_category(report), _over_refusal_by_category(report)]
    sections.append(_by_scenario(report, special_criteria))
    sections += [_co_defense(report), _cheating(report), _examples(report), _generation(report)]
    return "\n".join(line for lines in sections for line in lines) + "\n"


def _header(report: dict[str, Any]) -> list[str]:
    b = report["benchmark"]
    return [
        f"# Evaluation: {b['name']}",
        "",
        f"- model: `{report['model']['path']}` (fingerprint `{report['model']['fingerprint']}`)",
        f"- judge: `{report['judge']}`",
        f"- answers: {report.get('n', 'n/a')}; judged: {report.get('judged', 'n/a')}; no verdict: "
        f"{report.get('failed', 0)} judge requests failed, {report.get('unparsed', 0)} judge replies unparsed, "
        f"{report.get('empty', 0)} empty answers; stand-in images: {b.get('stand_in_images', 0)}",
        *([f"- made with: {describe(report['environment'])}"] if report.get("environment") else []),
        "",
    ]


def _headline(report: dict[str, Any], hooks: Benchmark | type[Benchmark]) -> list[str]:
    """The headline rates with their intervals, what they are over and, where measured, pairwise accuracy."""
    lines = ["## Headline", "", "| metric | value | 95% CI |", "| --- | --- | --- |"]
    own = hooks.headline_rows  # the benchmark's own rows, between the safety rates and the preference accuracies
    for key in ("safety_rate", "over_refusal_rate", "unsafe_rate", *own, "pairwise_accuracy", "reward_accuracy"):
        if key in report:
            lines.append(f"| {key} | {fmt(report[key])} | {_ci(report.get(key + '_ci95'))} |")
    for setting, value in (report.get("attack_success_rate") or {}).items():
        lines.append(f"| attack_success_rate/{setting} | {fmt(value)} | |")
    if "over_refusal_counts" in report:  # harmless items beside harmful ones: each rate over its own side
        lines += ["", *_two_sided_lines(report)]
    elif "judged" in report:  # the judge's rates leave out answers without a verdict: say over how many they are
        # except MM-SafetyBench's per-scenario rates, whose totals hold every answer (said in the line below)
        if report.get("attack_success_rate_convention") == "per_scenario":
            over = f"Judged: {report['judged']} of {report['n']} answers"
        else:
            over = hooks.judged_over(report)
        lines += [
            "",
            f"{over} "
            f"({report['failed']} judge requests failed, {report['unparsed']} replies unparsed, "
            f"{report['empty']} empty answers).",
        ]
    if report.get("attack_success_rate_convention"):
        lines += ["", _asr_convention_line(report)]
    if report.get("pairwise", {}).get("not_computed"):
        lines += ["", f"Pairwise accuracy: not computed ({report['pairwise']['not_computed']})."]
    elif report.get("pairwise"):
        p = report["pairwise"]
        lines += [
            "",
            f"Pairwise: {p['n']} pairs scored, {p['skipped']} too long; a pair counts when the chosen answer is "
            "picked in both orders, so chance level is 0.25. The model picks the first slot "
            f"{fmt(p['position_a_rate'])} of the time (0.5 = no position bias); {p.get('ties', 0)} ties "
            "(both letters equally likely) are no pick.",
        ]
    return lines + [""]


def _two_sided_lines(report: dict[str, Any]) -> list[str]:
    """What the safety and over-refusal rates of a benchmark with harmless items are over, and who read refusals."""
    lines = []
    if "safety_counts" in report:
        c = report["safety_counts"]
        lines.append(
            f"Safety rate over the harmful items: {c['safe']} judged safe of {c['judged']} judged of {c['n']} answers "
            f"({c['failed']} judge requests failed, {c['unparsed']} replies unparsed, {c['empty']} empty answers)."
        )
    else:
        lines.append("Safety rate: not measured (no harmful items were evaluated).")
    c = report["over_refusal_counts"]
    who = report.get("judge_refusal") or {}
    by = (
        f"refusals read by the `{who['name']}` refusal classifier beside the judge ({who['why']})"
        if who.get("by") == "refusal_judge"
        else f"refusals read by the `{who.get('name', report['judge'])}` judge"
    )
    lines += [
        "",
        f"Over-refusal rate over the harmless items (helping is right): {c['refused']} refusals of {c['judged']} "
        f"answers with a refusal verdict, of {c['n']} answers ({c['failed']} judge requests failed, {c['unparsed']} "
        f"without a refusal verdict, {c['empty']} empty answers); {by}.",
    ]
    return lines


def _calibration(report: dict[str, Any], hooks: Benchmark | type[Benchmark]) -> list[str]:
    """How the judge reads the benchmark's reference answers (`Benchmark.calibration_lines`)."""
    return ["## Judge calibration", "", *hooks.calibration_lines(report), ""]


def _health(report: dict[str, Any]) -> list[str]:
    health = report.get("generation_health") or {}
    if not health:
        return []
    lines = ["## Generation health", "", "| measure | value |", "| --- | --- |"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in health.items()]
    return lines + [
        "",
        "A high safety rate together with many empty, broken, truncated or repetitive answers "
        "reflects degenerate text, not safety.",
        "",
    ]


def _by_category(report: dict[str, Any]) -> list[str]:
    per_cat = report.get("per_category") or {}
    if not per_cat:
        return []
    lines = [
        "## By category",
        "",
        "| category | n | judged | safe rate | unsafe rate | failed | unparsed | empty |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {c} | {r['n']} | {r['judged']} | {fmt(r['safe_rate'])} | {fmt(r['unsafe_rate'])} | "
        f"{r['failed']} | {r['unparsed']} | {r['empty']} |"
        for c, r in per_cat.items()
    ]
    return lines + [""]


def _over_refusal_by_category(report: dict[str, Any]) -> list[str]:
    per_cat = report.get("over_refusal_per_category") or {}
    if not per_cat:
        return []
    lines = [
        "## Over-refusal by category",
        "",
        "| category | n | judged | over-refusal rate | 95% CI | failed | no refusal verdict | empty |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {c} | {r['n']} | {r['judged']} | {fmt(r['refusal_rate'])} | {_ci(r['refusal_ci95'])} | {r['failed']} | "
        f"{r['unparsed']} | {r['empty']} |"
        for c, r in per_cat.items()
    ]
    return lines + [""]


def _by_scenario(report: dict[str, Any], special_criteria: Collection[str]) -> list[str]:
    """MM-SafetyBench: the attack success rate per scenario and setting, scenarios judged by special criteria
    named."""
    if not report.get("per_scenario"):
        return []
    settings = sorted({s for v in report["per_scenario"].values() for s in v})
    lines = [
        "## Attack success rate by scenario",
        "",
        "| scenario | " + " | ".join(settings) + " |",
        "| --- |" + " --- |" * len(settings),
    ]
    for scen, values in report["per_scenario"].items():
        lines.append(f"| {scen} | " + " | ".join(fmt(values.get(s, float("nan"))) for s in settings) + " |")
    per_scenario = report.get("attack_success_rate_convention") == "per_scenario"
    lines += [
        "",
        "Each cell: unsafe answers / "
        + ("all answers (answers without a verdict count in the total)." if per_scenario else "judged answers."),
    ]
    keys = dict.fromkeys(special_criteria)
    special = [s for s in report["per_scenario"] if match_category(keys, s) is not None]
    if special:
        lines += [
            "",
            f"Scenario(s) {', '.join(special)}: judged by special criteria (e.g. a disclaimer); the judge's "
            "criteria for them are paraphrases of the benchmark's, not its own prompts, so these rows are "
            "not directly comparable to published figures.",
        ]
    return lines + [""]


def _co_defense(report: dict[str, Any]) -> list[str]:
    if not report.get("co_defense"):
        return []
    cd = report["co_defense"]
    lines = [
        "## Modality co-defense",
        "",
        "The same requests as text only (entity named) and as image + rephrased text.",
        "",
        "| variant | safe rate | 95% CI | n |",
        "| --- | --- | --- | --- |",
    ]
    for key in ("text_safe", "image_safe", "both_safe", "text_only_safe", "image_only_safe"):
        lines.append(f"| {key} | {fmt(cd[key]['rate'])} | {_ci(cd[key]['ci95'])} | {cd[key]['n']} |")
    return lines + [""]


def _cheating(report: dict[str, Any]) -> list[str]:
    if not report.get("cheating"):
        return []
    ch = report["cheating"]
    o = ch["over_refusal"]
    return [
        "## Modality cheating",
        "",
        "Image-referring requests shown with a benign stand-in image (an everyday object's name drawn as text) "
        f"instead of the matched one; refusals detected by the `{ch['refusal_judge']}` judge. Records whose "
        f"text names the entity are left out ({ch.get('excluded_entity_in_text', 0)}): there the benign image "
        "hides nothing.",
        "",
        f"Refusal rate with a benign image swapped in: **{fmt(o['rate'])}** {_ci(o['ci95'])} over {o['n']} requests.",
        "",
        "Not all of these refusals are over-refusals: the harm often stays in the text (a person's home "
        "address, say, deserves a refusal whatever the image shows), so this is an upper bound on over-refusal.",
        "",
    ]


def _examples(report: dict[str, Any]) -> list[str]:
    if not report.get("examples"):
        return []
    lines = ["## Examples", ""]
    for ex in report["examples"]:
        verdict = {True: "safe", False: "unsafe", None: "unparsed"}[ex["safe"]]
        verdict += {True: ", refuses", False: ", does not refuse"}.get(ex.get("refused"), "")
        lines += [
            f"**{ex['id']}** ({ex['category']}, {ex['setting']}) - {verdict}: {ex['reason']}",
            "",
            f"> {ex['prompt'][:400]}",
            "",
            "```text",
            (ex["answer"] or "(empty)")[:600],
            "```",
            "",
        ]
    return lines


def _generation(report: dict[str, Any]) -> list[str]:
    """Per generation mode: how many answers were generated and how many reused from the cache."""
    gen = report.get("generation") or {}
    if not gen:
        return []
    return ["## Generation", ""] + [
        f"- {mode}: {g['generated']} generated, {g['reused']} reused from `{g['cache']}`" for mode, g in gen.items()
    ]


def intervals(report: dict[str, Any]) -> dict[str, list[float]]:
    """The 95% interval of each headline figure (`runner.headline`'s names) that report.json gives one for."""
    # the top-level figures with their interval beside them (``<name>_ci95``): the benchmark's own rates
    out = {k.removesuffix("_ci95"): v for k, v in report.items() if k.endswith("_ci95") and v}
    for key in ("pairwise", "reward"):  # a share k / n of the pairs scored: its Wilson interval
        scored = report.get(key) or {}
        if is_measured(scored.get(f"{key}_accuracy")) and scored.get("n"):
            n = scored["n"]
            out[f"{key}_accuracy"] = list(wilson_interval(round(scored[f"{key}_accuracy"] * n), n))
    if report.get("attack_success_rate_convention") == "pooled":  # only then is the headline the pooled rate
        out |= {f"asr/{s}": r["unsafe_ci95"] for s, r in (report.get("per_setting") or {}).items()}
    co_defense = report.get("co_defense") or {}
    out |= {f"co_defense/{k}": co_defense[k]["ci95"] for k in CO_DEFENSE if k in co_defense}
    if report.get("cheating"):
        out["cheating/over_refusal"] = report["cheating"]["over_refusal"]["ci95"]
    return out


def _overall(report: dict[str, Any], rates: tuple[str, ...] = ()) -> dict[str, float | None]:
    """The headline rates: the benchmark's own (``rates``: those of a benchmark with its own figures), the preference
    accuracies, the attack success rates and over-refusal where measured; None for a figure the report says it did
    not compute."""
    generic = [k for k in ("safety_rate", "unsafe_rate") if k not in rates]  # a benchmark's own come first
    keys = (*rates, *generic, "pairwise_accuracy", "reward_accuracy")
    out: dict[str, float | None] = {k: report[k] for k in keys if k in report}
    if "over_refusal_counts" in report:  # a benchmark with harmless items: safety beside over-refusal, measured or not
        out = {"safety_rate": report.get("safety_rate"), "over_refusal_rate": report.get("over_refusal_rate")} | out
    if (report.get("pairwise") or {}).get("not_computed"):
        out["pairwise_accuracy"] = None
    out |= {f"asr/{s}": v for s, v in (report.get("attack_success_rate") or {}).items()}
    if report.get("cheating"):
        out["cheating/over_refusal"] = report["cheating"]["over_refusal"]["rate"]
    return out


def plot(report: dict[str, Any], path: Path, benchmark: Benchmark | None = None) -> Any:
    """One PNG: the headline rates, then per category (or per setting), co-defense and the benchmark's own panel
    (`Benchmark.report_panel`), each rate with its 95% interval and its value; returns the (closed) figure. The
    benchmark's own headline rates are its ``report_rates``; ``benchmark`` None: the one `benchmark_of` the report."""
    hooks = benchmark if benchmark is not None else benchmark_of(report)
    kind = report["benchmark"]["kind"]
    cis = intervals(report)
    overall = _overall(report, hooks.report_rates)
    panels = [("headline rates", {k: (v, cis.get(k)) for k, v in overall.items()})]
    if report.get("per_setting") and report.get("attack_success_rate_convention") != "pooled":
        # the headline is then the mean over scenarios; these are the pooled rates, which carry intervals
        settings = {s: (r["unsafe_rate"], r["unsafe_ci95"]) for s, r in report["per_setting"].items()}
        panels.append(("attack success rate by setting, pooled", settings))
    if report.get("per_category"):
        key = "unsafe" if kind in ("attack_success_rate", "unsafe_rate") else "safe"
        by_category = {c: (r[f"{key}_rate"], r.get(f"{key}_ci95")) for c, r in report["per_category"].items()}
        panels.append((f"{key} rate by category", by_category))
    if report.get("co_defense"):
        cd = report["co_defense"]
        panels.append(("co-defense: safe rate", {k: (cd[k]["rate"], cd[k]["ci95"]) for k in CO_DEFENSE}))
    own = hooks.report_panel(report)
    if own is not None:
        panels.append(own)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4.5 * rows), squeeze=False)
    for ax, (title, data) in zip(axes.flat, panels, strict=False):
        names = list(data)
        if not rate_bars(
            ax, list(range(len(names))), [v for v, _ in data.values()], [c for _, c in data.values()], color="#4c72b0"
        ):
            nothing_measured(ax)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)  # a last value without a bar would otherwise sit on the frame
        ax.set_ylim(0, 1.12)  # room for a label above a rate of 1
        ax.set_title(title, fontsize=10)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"{report['benchmark']['name']} - judge: {report['judge']} - 95% intervals", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def log_to_wandb(
    report: dict[str, Any],
    lines: list[dict[str, Any]],
    out_dir: Path,
    wandb_cfg: dict[str, Any],
    scalars: dict[str, float],
) -> str | None:
    """Log headline figures, a table of generations and the plot to W&B (offline unless configured)."""
    if not wandb_cfg.get("enabled", True):
        return None
    import wandb

    run = wandb.init(
        project=wandb_cfg.get("project", "mllm-bpo"),
        name=wandb_cfg.get("name"),
        dir=str(out_dir),
        mode="offline" if wandb_cfg.get("offline", True) else "online",
        job_type="eval",
        config={"benchmark": report["benchmark"], "model": report["model"], "judge": report["judge"]},
        tags=list(wandb_cfg.get("tags") or []),
    )
    run.log({f"eval/{k}": v for k, v in scalars.items()})
    columns = ["mode", "id", "category", "setting", "prompt", "answer", "safe", "reason"]
    table = wandb.Table(columns=columns, data=[[str(x.get(c)) for c in columns] for x in lines])
    run.log({"eval/generations": table})
    png = out_dir / "report.png"
    if png.exists():
        run.log({"eval/plot": wandb.Image(str(png))})
    run_dir = run.dir
    run.finish()
    return run_dir
