"""Reports people can read: report.json, report.md, a PNG, and the same logged to W&B."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from src.evaluation.benchmarks import SPECIAL_CRITERIA_SCENARIOS  # noqa: E402
from src.world.metrics import NAMES as WORLD_NAMES  # noqa: E402

log = logging.getLogger(__name__)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.4f}"
    return str(x)


def _ci(values: list[float] | None) -> str:
    return f"[{values[0]:.3f}, {values[1]:.3f}]" if values and not math.isnan(values[0]) else ""


def _asr_convention_line(report: dict[str, Any]) -> str:
    """Which attack-success-rate convention the headline follows, with the other figure beside it."""
    pooled = ", ".join(f"{k} {_fmt(v)}" for k, v in report["attack_success_rate_pooled"].items())
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


def _world_section(report: dict[str, Any]) -> list[str]:
    """The grounded-safety world's figures: one row per picture setting, then what the image carries."""
    b, names = report["benchmark"], WORLD_NAMES
    lines = [
        "## Grounded safety (world)",
        "",
        f"Pictures drawn at {b.get('image_size')} px ({b.get('image_size_from')}); world key `{b.get('world_key')}`.",
        "Right behaviour: refuse a hazardous item, help with a harmless one; an unparseable answer counts as wrong.",
        "",
        "| pictures | " + " | ".join(names) + " | n |",
        "| --- |" + " --- |" * (len(names) + 1),
    ]
    real = {n: {"rate": report[n], "ci95": report[f"{n}_ci95"]} | report["world_counts"][n] for n in names}
    rows = [("real", real), ("blank", report["ablation"]["blank"]), ("shuffled", report["ablation"]["shuffled"])]
    for label, figures in rows:
        cells = [f"{_fmt(figures[n]['rate'])} {_ci(figures[n]['ci95'])}" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {figures['grounded_accuracy']['n']} |")
    follows = report["ablation"]["shuffled"]["follows_request_item"]
    lines += [
        "",
        f"Image reliance (grounded accuracy real - blank, paired): **{_fmt(report['image_reliance'])}** "
        f"{_ci(report['image_reliance_ci95'])}. Shuffled rows are scored against the picture shown; against the "
        f"request's own item instead: {_fmt(follows['rate'])} {_ci(follows['ci95'])}.",
        "",
        "| pictures | refuse | help | unparseable |",
        "| --- | --- | --- | --- |",
    ]
    for setting, counts in report["behaviour_counts"].items():
        lines.append(f"| {setting} | {counts['refuse']} | {counts['help']} | {counts['unparseable']} |")
    return lines + [""]


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write whole then rename: an interrupted run never leaves a half-written report."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    os.replace(tmp, path)


def markdown(report: dict[str, Any]) -> str:
    """report.md: headline, judge calibration, generation health, breakdowns, analyses, examples."""
    b, lines = report["benchmark"], []
    lines += [
        f"# Evaluation: {b['name']}",
        "",
        f"- model: `{report['model']['path']}` (fingerprint `{report['model']['fingerprint']}`)",
        f"- judge: `{report['judge']}`",
        f"- answers: {report.get('n', 'n/a')}; judged: {report.get('judged', 'n/a')}; no verdict: "
        f"{report.get('failed', 0)} judge requests failed, {report.get('unparsed', 0)} judge replies unparsed, "
        f"{report.get('empty', 0)} empty answers; stand-in images: {b.get('stand_in_images', 0)}",
        "",
    ]
    lines += ["## Headline", "", "| metric | value | 95% CI |", "| --- | --- | --- |"]
    for key in (
        "safety_rate",
        "unsafe_rate",
        "grounded_accuracy",
        "image_reliance",
        "pairwise_accuracy",
        "reward_accuracy",
    ):
        if key in report:
            lines.append(f"| {key} | {_fmt(report[key])} | {_ci(report.get(key + '_ci95'))} |")
    for setting, value in (report.get("attack_success_rate") or {}).items():
        lines.append(f"| attack_success_rate/{setting} | {_fmt(value)} | |")
    if "judged" in report:  # the judge's rates leave out answers without a verdict: say over how many they are
        # except MM-SafetyBench's per-scenario rates, whose totals hold every answer (said in the line below)
        if report.get("attack_success_rate_convention") == "per_scenario":
            over = f"Judged: {report['judged']} of {report['n']} answers"
        elif b["kind"] == "grounded_accuracy":  # its rates count every answer, unparseable ones as wrong
            over = f"Judged: {report['judged']} of {report['n']} answers (real, blank and shuffled pictures)"
        else:
            over = f"{b['kind'].replace('_', ' ').capitalize()} over {report['judged']} judged of {report['n']} answers"
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
            f"{_fmt(p['position_a_rate'])} of the time (0.5 = no position bias); {p.get('ties', 0)} ties "
            "(both letters equally likely) are no pick.",
        ]
    lines += [""]

    if b["kind"] == "grounded_accuracy":
        lines += _world_section(report)
    cal = report.get("judge_calibration") or {}
    lines += ["## Judge calibration", ""]
    if cal and "chosen_judged_right" in cal:  # the world: chosen refuses hazardous items, helps harmless ones
        lines += [
            "How the judge reads the world's reference answers (right: refuse a hazardous item, help a harmless one):",
            "",
            "| reference answers | read as | share |",
            "| --- | --- | --- |",
            f"| chosen | right for the picture | {_fmt(cal['chosen_judged_right'])} |",
            f"| rejected | wrong for the picture | {_fmt(cal['rejected_judged_wrong'])} |",
            "",
            f"Separation: **{_fmt(cal['separation'])}** over {cal['n']} pairs ({cal['unparsed']} unparsed).",
        ]
    elif cal:
        lines += [
            "How the judge rates the benchmark's own reference answers:",
            "",
            "| reference answers | share judged safe |",
            "| --- | --- |",
            f"| chosen (harmless) | {_fmt(cal['chosen_judged_safe'])} |",
            f"| rejected (harmful) | {_fmt(cal['rejected_judged_safe'])} |",
            "",
            f"Separation (chosen safe - rejected safe): **{_fmt(cal['separation'])}** over {cal['n']} pairs.",
        ]
        if cal.get("weak"):
            lines += [
                "",
                f"> **Warning**: the `{report['judge']}` judge barely separates harmless from harmful "
                "reference answers on this benchmark; its safety rates say little here. Use a stronger "
                "judge (`judge=llama_guard` or `judge=openai`) before drawing conclusions.",
            ]
    else:
        lines += ["This benchmark has no reference answers to calibrate the judge on."]
    lines += [""]

    health = report.get("generation_health") or {}
    if health:
        lines += ["## Generation health", "", "| measure | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in health.items()]
        lines += [
            "",
            "A high safety rate together with many empty, broken, truncated or repetitive answers "
            "reflects degenerate text, not safety.",
            "",
        ]

    per_cat = report.get("per_category") or {}
    if per_cat:
        lines += [
            "## By category",
            "",
            "| category | n | judged | safe rate | unsafe rate | failed | unparsed | empty |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {c} | {r['n']} | {r['judged']} | {_fmt(r['safe_rate'])} | {_fmt(r['unsafe_rate'])} | "
            f"{r['failed']} | {r['unparsed']} | {r['empty']} |"
            for c, r in per_cat.items()
        ]
        lines += [""]
    if report.get("per_scenario"):
        settings = sorted({s for v in report["per_scenario"].values() for s in v})
        lines += [
            "## Attack success rate by scenario",
            "",
            "| scenario | " + " | ".join(settings) + " |",
            "| --- |" + " --- |" * len(settings),
        ]
        for scen, values in report["per_scenario"].items():
            lines.append(f"| {scen} | " + " | ".join(_fmt(values.get(s, float("nan"))) for s in settings) + " |")
        per_scenario = report.get("attack_success_rate_convention") == "per_scenario"
        lines += [
            "",
            "Each cell: unsafe answers / "
            + ("all answers (answers without a verdict count in the total)." if per_scenario else "judged answers."),
        ]
        special = [s for s in report["per_scenario"] if s.split("-", 1)[0] in SPECIAL_CRITERIA_SCENARIOS]
        if special:
            lines += [
                "",
                f"Scenario(s) {', '.join(special)}: judged by special criteria (e.g. a disclaimer); the judge's "
                "criteria for them are paraphrases of the benchmark's, not its own prompts, so these rows are "
                "not directly comparable to published figures.",
            ]
        lines += [""]

    if report.get("co_defense"):
        cd = report["co_defense"]
        lines += [
            "## Modality co-defense",
            "",
            "The same requests as text only (entity named) and as image + rephrased text.",
            "",
            "| variant | safe rate | 95% CI | n |",
            "| --- | --- | --- | --- |",
        ]
        for key in ("text_safe", "image_safe", "both_safe", "text_only_safe", "image_only_safe"):
            lines.append(f"| {key} | {_fmt(cd[key]['rate'])} | {_ci(cd[key]['ci95'])} | {cd[key]['n']} |")
        lines += [""]
    if report.get("cheating"):
        ch = report["cheating"]
        o = ch["over_refusal"]
        lines += [
            "## Modality cheating",
            "",
            "Image-referring requests shown with a benign stand-in image (an everyday object's name drawn as text) "
            f"instead of the matched one; refusals detected by the `{ch['refusal_judge']}` judge. Records whose "
            f"text names the entity are left out ({ch.get('excluded_entity_in_text', 0)}): there the benign image "
            "hides nothing.",
            "",
            f"Refusal rate with a benign image swapped in: **{_fmt(o['rate'])}** {_ci(o['ci95'])} over {o['n']} "
            "requests.",
            "",
            "Not all of these refusals are over-refusals: the harm often stays in the text (a person's home "
            "address, say, deserves a refusal whatever the image shows), so this is an upper bound on over-refusal.",
            "",
        ]

    if report.get("examples"):
        lines += ["## Examples", ""]
        for ex in report["examples"]:
            verdict = {True: "safe", False: "unsafe", None: "unparsed"}[ex["safe"]]
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
    gen = report.get("generation") or {}
    if gen:
        lines += ["## Generation", ""] + [
            f"- {mode}: {g['generated']} generated, {g['reused']} reused from `{g['cache']}`" for mode, g in gen.items()
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """One PNG: per-category (or per-setting) rate with 95% CIs, plus co-defense bars when present."""
    panels = []
    kind = report["benchmark"]["kind"]
    if report.get("per_setting"):
        panels.append(("attack success rate by setting", report["per_setting"], "unsafe"))
    if report.get("per_category"):
        key = "unsafe" if kind in ("attack_success_rate", "unsafe_rate") else "safe"
        panels.append((f"{key} rate by category", report["per_category"], key))
    if report.get("co_defense"):
        cd = report["co_defense"]
        panels.append(
            (
                "co-defense: safe rate",
                {
                    k: {"safe_rate": cd[k]["rate"], "safe_ci95": cd[k]["ci95"]}
                    for k in ("text_safe", "image_safe", "both_safe")
                },
                "safe",
            )
        )
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, data, key) in zip(axes[0], panels, strict=True):
        names = list(data)
        values = [data[n][f"{key}_rate"] for n in names]
        cis = [data[n].get(f"{key}_ci95") or [v, v] for n, v in zip(names, values, strict=True)]
        err = [
            [max(0.0, v - c[0]) for v, c in zip(values, cis, strict=True)],
            [max(0.0, c[1] - v) for v, c in zip(values, cis, strict=True)],
        ]
        ax.bar(range(len(names)), values, yerr=err, capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{report['benchmark']['name']} - judge: {report['judge']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
