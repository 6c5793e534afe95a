"""src/compare.py's comparison: one table (markdown + JSON) and one plot from several evaluation reports; and the
writer of the comparison files that src/reproduce.py's comparison over seeds shares (`write_comparison`)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from src.environment import describe
from src.evaluation.plots import fmt, is_measured, nothing_measured, plt, rate_bars
from src.evaluation.protocol import benchmark_of
from src.evaluation.report import intervals
from src.evaluation.runner import headline
from src.files import replacing, write_atomic


class CompareError(ValueError):
    """A setting the user must change; reported in one line without a stack trace."""


def natural_key(path: Path) -> list[tuple[int, int | str]]:
    """Sort key reading digit runs as numbers, so sweep job folders order 0, 1, 2, ..., 10, 11 (as labels given in
    sweep order expect), not 0, 1, 10, 11, 2 as text."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", str(path)) if t]


def find_reports(inputs: list[Path]) -> list[Path]:
    """report.json files named directly or found below the given folders (in job-number order)."""
    found: list[Path] = []
    for p in inputs:
        if p.is_dir():
            found += sorted(p.rglob("report.json"), key=natural_key)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such report or folder")
    if not found:
        raise FileNotFoundError(f"no report.json under {[str(p) for p in inputs]}")
    return found


# why answers got no verdict, beside the judged count (report.json, from metrics.verdict_rates)
COUNTS = ("judged", "failed", "unparsed", "empty")
# row fields that are not headline metrics
INFO = {
    "label",
    "benchmark",
    "judge",
    "n",
    "setup",
    "marker",
    *COUNTS,
    "denominators",
    "report",
    "overrides",
    "judge_separation",
    "environment",
}


def _label(report: dict[str, Any], path: Path) -> str:
    model = report.get("model", {}).get("path")
    if not model:
        return path.parent.name
    parts = Path(str(model)).parts
    return "/".join(parts[-3:-1]) if parts and parts[-1] == "model" else str(model)


def compare_reports(paths: list[Path], labels: list[str] | None, out_dir: Path) -> dict[str, Any]:
    """Write comparison.{md,json,png} to ``out_dir``; returns the table."""
    reports = [json.loads(p.read_text()) for p in paths]
    if labels is not None and len(labels) != len(reports):
        raise CompareError(
            f"{len(labels)} labels for {len(reports)} reports: labels= needs one label per report.json found from "
            f"inputs= ({', '.join(str(p) for p in paths)}), in that order, or labels=null"
        )
    labels = labels or [_label(r, p) for r, p in zip(reports, paths, strict=True)]
    rows = []
    for label, report, path in zip(labels, reports, paths, strict=True):
        cal = report.get("judge_calibration") or {}
        rows.append(
            {
                "label": label,
                "benchmark": report["benchmark"]["name"],
                "judge": _judge_name(report["judge"]),
                "n": report.get("n"),
                "setup": setup(report),
                **{c: report.get(c) for c in COUNTS},
                "denominators": denominators(report),
                "judge_separation": cal.get("separation"),
                "report": str(path),
                "overrides": _overrides(path),
                "environment": report.get("environment"),
                **headline(report),
            }
        )
    metrics = order_metrics({k for r in rows for k in r} - INFO)
    differs, setups = mark_setups(rows)
    head = ["model", "benchmark", "judge", "answers", *COUNTS, *metrics, "judge separation"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [
            r["label"] + (f" [{r['marker']}]" if r["marker"] else ""),
            r["benchmark"],
            r["judge"],
            *[fmt(r[c], "") for c in ("n", *COUNTS)],
        ]
        cells += [fmt(r.get(m), "") + _over(r["denominators"].get(m), m in r) for m in metrics]
        lines.append("| " + " | ".join(cells + [fmt(r["judge_separation"], "")]) + " |")
    note = (
        "Each rate is over the answers the judge gave a verdict, `judged` of `answers` (pairwise and reward "
        "accuracy: over the pairs scored); (n=...) beside a rate is its denominator. Answers without a verdict: "
        "`failed` judge requests, `unparsed` judge replies, `empty` answers."
    )
    if differs:
        note += (
            f"\n\n**Rows measured differently** (they differ in {', '.join(differs)}): only rows with the same "
            "[mark] share a judge, generation settings, benchmark settings and item count.\n\n"
            + "\n".join(f"- [{m}] " + ", ".join(f"{k}={_show(v)}" for k, v in s.items()) for m, s in setups.items())
        )
    made = {r["label"]: describe(r["environment"]) if r["environment"] else "not recorded" for r in rows}
    if len(set(made.values())) == 1:
        note += f"\n\nMade with: {next(iter(made.values()))}."
    else:
        note += "\n\n**Made with different versions or devices**:\n\n" + "".join(
            f"- {label}: {text}\n" for label, text in made.items()
        )
    cis = [intervals(r) for r in reports]
    md = (
        "# Comparison\n\n"
        + "\n".join(lines)
        + f"\n\n{note}\n\n"
        + "\n".join(side_by_side(rows, cis))
        + "\n\nReports:\n\n"
        + "".join(f"- {m}\n" for m in mapping(rows))
    )
    table = {"metrics": metrics, "rows": rows, "differs": differs, "setups": setups}
    write_comparison(out_dir, table, md, lambda path: _plot(rows, metrics, cis, path))
    return table


# the over-refusal figures a row may have, each with what it measures: the share of harmless items refused
# (benchmarks with harmless items), or the MMSafe-PO benign-image probe, whose refusals are not all over-refusals
# (the text may carry the harm): an upper bound
OVER_REFUSAL = {
    "over_refusal_rate": "harmless items refused",
    "cheating/over_refusal": "upper bound: refusals with a benign image swapped in",
}


def order_metrics(names: set[str]) -> list[str]:
    """The table's metric columns, by name, but each over-refusal figure right after the safety rate."""
    paired = [m for m in ("safety_rate", *OVER_REFUSAL) if m in names]
    rest = sorted(names - set(paired))
    if "safety_rate" not in names:
        return sorted(names)
    at = sorted([*rest, "safety_rate"]).index("safety_rate")
    return rest[:at] + paired + rest[at:]


def over_refusal(row: dict[str, Any]) -> tuple[str, float] | None:
    """A row's over-refusal figure (name, value): the over-refusal rate where measured, else the benign-image upper
    bound; None when it has neither."""
    return next(((m, row[m]) for m in OVER_REFUSAL if is_measured(row.get(m))), None)


def _cell(value: Any, ci: list[float] | None, n: int | None) -> str:
    if not is_measured(value):
        return "not measured"
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and all(map(is_measured, ci)) else ""
    return f"{value:.4f}{interval}" + _over(n, True)


def side_by_side(rows: list[dict[str, Any]], cis: list[dict[str, list[float]]]) -> list[str]:
    """comparison.md's table of each row's safety rate beside its over-refusal, with intervals and denominators: a
    model that refuses everything scores a perfect safety rate, and only the second column shows the cost. A figure
    a report lacks reads "not measured", never 0."""
    lines = [
        "## Safety beside over-refusal",
        "",
        "| model | safety rate [95% CI] | over-refusal [95% CI] | over-refusal measured as |",
        "| --- | --- | --- | --- |",
    ]
    for row, ci in zip(rows, cis, strict=True):
        label = row["label"] + (f" [{row['marker']}]" if row["marker"] else "")
        safety = _cell(row.get("safety_rate"), ci.get("safety_rate"), row["denominators"].get("safety_rate"))
        found = over_refusal(row)
        if found is None:
            cells = ["not measured", "-"]
        else:
            name, value = found
            cells = [_cell(value, ci.get(name), row["denominators"].get(name)), OVER_REFUSAL[name]]
        lines.append(f"| {label} | {safety} | {' | '.join(cells)} |")
    return lines + [
        "",
        "A safety rate alone rewards refusing everything: read it beside the over-refusal of the same row. "
        '"Upper bound" rows (MMSafe-PO with a benign image swapped in) count every refusal, but there the harm may '
        "stay in the text, so not every refusal is an over-refusal.",
    ]


def write_comparison(
    out_dir: Path, result: dict[str, Any], text: str, draw: Callable[[Path], Any], ensure_ascii: bool = False
) -> None:
    """comparison.json (``result``), comparison.md (``text``) and comparison.png (``draw(path)`` saves the figure
    there, or nothing when there is nothing to draw: then an earlier comparison.png is removed, not left beside
    the new table) in ``out_dir``, each written whole, then renamed; a figure that fails half-way replaces nothing."""
    write_atomic(out_dir / "comparison.json", json.dumps(result, indent=2, ensure_ascii=ensure_ascii, default=str))
    write_atomic(out_dir / "comparison.md", text)
    with replacing(out_dir / "comparison.png", suffix=".png") as tmp:
        draw(tmp)


def print_written(out_dir: Path, folders: bool = False) -> None:
    """The closing line of a comparison: the folder and the comparison files in it (and, with ``folders``, the
    folders beside them, hidden ones left out)."""
    written = [f.name for f in sorted(out_dir.glob("comparison.*"))]
    if folders:
        written += sorted(f"{d.name}/" for d in out_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    print(f"comparison: {out_dir} ({', '.join(written)})")


def _judge_name(judge: Any) -> str:
    return str(judge.get("name")) if isinstance(judge, dict) else str(judge)


def setup(report: dict[str, Any]) -> dict[str, Any]:
    """What a row's figures were measured with: rows that differ in any of it do not share a column unmarked.

    The judge (its name, or every identity field the report gives: ``judge`` as a dict and any ``judge_*`` field
    but the calibration result), generation settings, benchmark settings, the attack settings and scenarios
    scored, and the number of items."""
    judge = {k: v for k, v in report.items() if k.startswith("judge_") and k != "judge_calibration"}
    return {
        "judge": report["judge"] if not judge else {"judge": report["judge"], **judge},
        "generation": report.get("generation_settings"),
        "benchmark": report.get("benchmark"),
        "settings": sorted(report.get("per_setting") or report.get("attack_success_rate") or []),
        "scenarios": sorted(report.get("per_scenario") or []),
        "n": report.get("n"),
    }


def mark_setups(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Give each row a mark (S1, S2, ...) per distinct setup, when the rows' setups differ.

    Returns the setup fields that differ and, per mark, those fields' values; sets ``row["marker"]`` ("" when all
    rows share one setup)."""
    keys = [k for k in rows[0]["setup"] if len({_show(r["setup"][k]) for r in rows}) > 1] if rows else []
    setups: dict[str, dict[str, Any]] = {}
    for r in rows:
        r["marker"] = ""
        if not keys:
            continue
        mine = {k: r["setup"][k] for k in keys}
        found = [m for m, s in setups.items() if _show(s) == _show(mine)]
        r["marker"] = found[0] if found else f"S{len(setups) + 1}"
        setups.setdefault(r["marker"], mine)
    return keys, setups


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def denominators(report: dict[str, Any]) -> dict[str, int | None]:
    """How many answers (or pairs) each headline figure of ``runner.headline`` is a share of; None where the
    report does not say (reports written before the judged count)."""
    out: dict[str, int | None] = {k: report.get("judged") for k in ("safety_rate", "unsafe_rate")}
    # a benchmark with harmless items: the safety rate is over the harmful ones, over-refusal over the harmless ones
    if "safety_counts" in report:
        out["safety_rate"] = report["safety_counts"].get("judged")
    if "over_refusal_counts" in report:
        out["over_refusal_rate"] = report["over_refusal_counts"].get("judged")
    out |= benchmark_of(report).denominators(report)  # figures of a benchmark's own, over counts of its own
    for key in ("pairwise", "reward"):
        if report.get(key):
            out[f"{key}_accuracy"] = report[key].get("n")
    per_setting = report.get("per_setting") or {}
    for setting in report.get("attack_success_rate") or {}:
        out[f"asr/{setting}"] = per_setting.get(setting, {}).get("judged")
    if "average" in (report.get("attack_success_rate") or {}):  # the mean of the settings' rates
        out["asr/average"] = report.get("judged")
    for k, v in (report.get("co_defense") or {}).items():
        if isinstance(v, dict) and "n" in v:
            out[f"co_defense/{k}"] = v["n"]
    if report.get("cheating"):
        out["cheating/over_refusal"] = report["cheating"]["over_refusal"]["n"]
    return out


def _over(n: int | None, present: bool) -> str:
    """`` (n=...)`` after a rate: its denominator (``n=?`` when the report does not give it)."""
    if not present:
        return ""
    return f" (n={n})" if n is not None else " (n=?)"


def _overrides(report: Path) -> list[str] | None:
    """The sweep job's command-line overrides saved by Hydra beside the report (None when there are none)."""
    saved = report.parent / ".hydra" / "overrides.yaml"
    return [str(o) for o in yaml.safe_load(saved.read_text()) or []] if saved.is_file() else None


def mapping(rows: list[dict[str, Any]]) -> list[str]:
    """One line per row: its label, the report it shows and that job's overrides, to check labels against."""
    return [
        f"{r['label']}: `{r['report']}`" + (f" (overrides: {' '.join(r['overrides'])})" if r["overrides"] else "")
        for r in rows
    ]


def _plot(rows: list[dict[str, Any]], metrics: list[str], cis: list[dict[str, list[float]]], path: Path) -> Any:
    """Grouped bars, one group per metric and one bar per row, with each report's 95% intervals (``cis``, per row)
    and values; a metric a row's report lacks is marked "not measured", never drawn as 0. Returns the figure."""
    if not metrics:
        return None
    wide = max(6, 1.2 * len(metrics) * len(rows) / 2 + 3)
    fig, (ax, trade_off) = plt.subplots(1, 2, figsize=(wide + 5, 4.5), width_ratios=[wide, 5])
    width = 0.8 / len(rows)
    measured = False
    for i, (row, ci) in enumerate(zip(rows, cis, strict=True)):
        label = row["label"] + (f" [{row['marker']}]" if row["marker"] else "")
        xs = [j + i * width for j in range(len(metrics))]
        measured |= rate_bars(ax, xs, [row.get(m) for m in metrics], [ci.get(m) for m in metrics], width, label=label)
    if not measured:
        nothing_measured(ax)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(metrics) - 0.5 + 0.8 - width)  # room for a last value without a bar
    # a figure that is a difference of rates may fall below 0
    values = [x for row, ci in zip(rows, cis, strict=True) for m in metrics for x in (row.get(m), *(ci.get(m) or ()))]
    ax.set_ylim(min([0.0, *filter(is_measured, values)]), 1.12)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    judges = ", ".join(dict.fromkeys(r["judge"] for r in rows))
    benchmarks = ", ".join(dict.fromkeys(r["benchmark"] for r in rows))
    ax.set_title(
        f"{benchmarks} - judge: {judges} - {' vs '.join(r['label'] for r in rows)} (95% intervals)", fontsize=10
    )
    safety_vs_over_refusal(trade_off, rows, cis)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def _error_bar(value: float, ci: list[float] | None) -> list[list[float]] | None:
    """matplotlib's [[below], [above]] of one value's interval (clipped at 0 against rounding); None without one."""
    if not ci or not all(map(is_measured, ci)):
        return None
    return [[max(0.0, value - ci[0])], [max(0.0, ci[1] - value)]]


def safety_vs_over_refusal(ax: Any, rows: list[dict[str, Any]], cis: list[dict[str, list[float]]]) -> None:
    """One point per row: over-refusal (x) against safety rate (y), each with its 95% interval as an error bar; the
    best corner is top left. A benign-image upper bound is drawn hollow and says so in the legend; rows lacking
    either figure are named under the plot as not measured, never drawn at 0."""
    missing = []
    for i, (row, ci) in enumerate(zip(rows, cis, strict=True)):
        label = row["label"] + (f" [{row['marker']}]" if row["marker"] else "")
        found = over_refusal(row)
        if found is None or not is_measured(row.get("safety_rate")):
            has = {"safety rate": is_measured(row.get("safety_rate")), "over-refusal": found is not None}
            missing.append(f"{label}: {' and '.join(n for n, ok in has.items() if not ok)} not measured")
            continue
        name, x = found
        y = row["safety_rate"]
        xerr, yerr = _error_bar(x, ci.get(name)), _error_bar(y, ci.get("safety_rate"))
        bound = name != "over_refusal_rate"
        colour = f"C{i % 10}"
        ax.errorbar(
            [x],
            [y],
            xerr=xerr,
            yerr=yerr,
            fmt="o",
            capsize=3,
            color=colour,
            markerfacecolor="none" if bound else colour,
            label=label + (" (upper bound)" if bound else ""),
        )
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("over-refusal (harmless items refused)", fontsize=9)
    ax.set_ylabel("safety rate", fontsize=9)
    ax.set_title("safety vs over-refusal (95% intervals)", fontsize=10)
    if ax.containers:
        ax.legend(fontsize=7)
    else:
        nothing_measured(ax)
    if missing:
        ax.text(0.5, -0.22, "\n".join(missing), transform=ax.transAxes, ha="center", va="top", fontsize=7)
