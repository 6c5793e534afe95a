"""The comparison over seeds that src/reproduce.py writes: each arm's figures as a mean over seeds with a 95%
t-interval (`seed_interval`), summarized from its evaluations' report.json files (`summarize`), as comparison.md
(`markdown`), comparison.json, comparison.png (`plot`) and a W&B table (`table`).

What is summarized, written and drawn is a `Summary`'s: `SAFETY`, the safety benchmarks', unless a plug-in's
registered one (`register`) takes the comparison's config; the result names that one, which writes and draws it."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from src.environment import describe
from src.evaluation.comparison import write_comparison
from src.evaluation.metrics import t_quantile, wilson_interval

BASE = "base"


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


def last_step(run_dir: Path) -> int:
    """The number of optimizer steps a run took."""
    return int(json.loads((run_dir / "run_summary.json").read_text())["optimizer_steps"])


def training_curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key) not in (None, "")]


# over_refusal_rate: measured only on benchmarks with harmless items (eval_overrides naming one); "not measured" else
METRICS = ("safety_rate", "over_refusal_rate", "reward_accuracy", "pairwise_accuracy")
HEALTH = ("empty", "broken", "truncated", "repetitive")
NO_VERDICT = ("judged", "failed", "unparsed", "empty")  # report.json counts beside its judged rates
COUNTS = ("n", *NO_VERDICT)


class Summary:
    """What a comparison over seeds summarizes, writes and draws: this one, the safety benchmarks' figures (safety
    rate, over-refusal where measured, reward and pairwise accuracy). A benchmark with figures of its own brings
    a subclass, registered by its plug-in (`register`): it takes the comparisons whose config `takes` says so, and
    names itself (``name``) in the result it summarizes, which it then writes and draws."""

    name: str | None = None  # the result's "benchmark"; None: none named

    def takes(self, cfg: DictConfig) -> bool:
        """Whether this is the summary of the comparison configured by ``cfg``."""
        return False

    def summarize(
        self, cfg: DictConfig, reports: dict[str, dict[Any, dict]], arms: dict[str, dict[int, Path]], base: str
    ) -> dict[str, Any]:
        """Per arm: each of `METRICS` over seeds, the safety rate pooled over seeds, the answers judged and not, the
        generation health, the judge's separation and the steps."""
        rows = {}
        for name, by_seed in reports.items():
            row: dict[str, Any] = {
                m: seed_interval([r.get(m, float("nan")) for r in by_seed.values()]) for m in METRICS
            }
            row["over_refusal_rate"]["measured"] = any("over_refusal_rate" in r for r in by_seed.values())
            row["safety_rate_pooled"] = _pooled(list(by_seed.values()))
            # the safety rate's denominators, all seeds together: judged answers and why the others got no verdict
            # (a benchmark with harmless items: over its harmful ones); None where a seed's report lacks the count
            # (written before it was counted): never a 0 it did not measure
            row["answers"] = _summed([r.get("safety_counts") or r for r in by_seed.values()])
            if row["over_refusal_rate"]["measured"]:  # over-refusal's, over the harmless items
                row["over_refusal_answers"] = _summed([r.get("over_refusal_counts") or {} for r in by_seed.values()])
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

    def markdown(self, result: dict[str, Any]) -> str:
        """comparison.md: one row per arm, what each figure is, how well the judge separates the references."""
        lines = [
            "# Base vs DPO vs BPO on held-out prompts",
            "",
            f"Base model: `{result['base_model']}`; seeds {result['seeds']}; judge `{result['judge']}`; "
            f"{result['n_heldout']} held-out prompts. Mean over seeds [95% t-interval across seeds] (n = seeds with a "
            "value; a seed without one is named, never counted as a value).",
            *made_with(result),
            "",
            "| arm | safety rate | over-refusal | judged / answers (all seeds) | held-out reward accuracy | "
            "pairwise accuracy | empty answers | broken answers | steps |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, row in result["arms"].items():
            steps = ", ".join(str(s) for s in row["steps"]) if row["steps"] else "-"
            judged = _judged(row["answers"])
            over = row.get("over_refusal_rate") or {}
            over_cell = "not measured" if not over.get("measured") else fmt_seeds(over)
            if over.get("measured"):
                judged += f"; over-refusal: {_judged(row['over_refusal_answers'])}"
            lines.append(
                f"| {name} | {fmt_seeds(row['safety_rate'])} | {over_cell} | {judged} | "
                f"{fmt_seeds(row['reward_accuracy'])} | {fmt_seeds(row['pairwise_accuracy'])} | "
                f"{fmt_seeds(row['health']['empty'])} | "
                f"{fmt_seeds(row['health']['broken'])} | {steps} |"
            )
        sep = result["arms"][BASE]["judge_separation"]
        lines += [
            "",
            "Held-out reward accuracy: share of held-out pairs whose log pi(chosen) - log pi(rejected) grew relative "
            "to the base model. Pairwise accuracy: shown the request and both answers, the model picks the chosen one "
            "as the safer in both orders. Empty / broken answers: share of generations with no text / with split "
            "multi-byte or control characters. The safety rate of each seed is over the answers the judge gave a "
            "verdict (judged); judged / answers counts them over all seeds, with the answers that got none: failed "
            "judge requests, unparsed judge replies, empty answers. Over-refusal: share of answers to harmless items "
            "that refuse, measured on benchmarks with harmless items only (MSSBench, MOSSBench); a safety rate "
            "without it cannot tell caution from refusing everything.",
            f"Judge check: on the held-out reference answers the judge calls chosen answers safe more often than "
            f"rejected ones by {sep:.3f}"
            + (" (weak: little separation, treat its rates with care)." if sep < 0.2 else ".")
            if isinstance(sep, int | float)
            else "",
        ]
        return "\n".join(lines) + "\n"

    def rate_figure(self, result: dict[str, Any]) -> tuple[Any, Any]:
        """The figure with the arms' rates drawn (safety, reward accuracy, safety against over-refusal), and the
        panel left for the training reward margins."""
        from src.evaluation.plots import plt  # matplotlib only where a plot is drawn

        names = list(result["arms"])
        fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
        _trade_off(axes[3], result)
        for ax, metric, title in (
            (axes[0], "safety_rate", "safety rate (held-out)"),
            (axes[1], "reward_accuracy", "held-out reward accuracy vs base"),
        ):
            bars(ax, names, [(metric, [result["arms"][n][metric] for n in names])])
            ax.set_title(title)
        return fig, axes[2]

    def table(self, result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
        """The W&B table: arm and the mean of each headline figure (None: no seed has a value)."""
        return ["arm", *METRICS], [[n, *[r[m]["mean"] for m in METRICS]] for n, r in result["arms"].items()]


_SUMMARIES: dict[str, Summary] = {}
SAFETY = Summary()  # the summary of a comparison no registered one takes


def register(summary: Summary) -> None:
    """Adds a plug-in's summary under its ``name``; the same class again replaces it, another is an error."""
    if not summary.name:
        raise ValueError(f"{type(summary).__qualname__}: a summary registers under a name")
    known, kind = _SUMMARIES.get(summary.name), (type(summary).__module__, type(summary).__qualname__)
    if known is not None and (type(known).__module__, type(known).__qualname__) != kind:
        raise ValueError(f"summary name {summary.name!r} is taken by {type(known).__qualname__}")
    _SUMMARIES[summary.name] = summary


def summary_for(cfg: DictConfig) -> Summary:
    """The registered summary that takes the comparison ``cfg`` configures, else `SAFETY`."""
    return next((s for s in _SUMMARIES.values() if s.takes(cfg)), SAFETY)


def summary_of(result: dict[str, Any]) -> Summary:
    """The summary that summarized ``result`` (its ``benchmark``), else `SAFETY`."""
    return _SUMMARIES.get(result.get("benchmark"), SAFETY)


def summarize(
    cfg: DictConfig, reports: dict[str, dict[Any, dict]], arms: dict[str, dict[int, Path]], base: str
) -> dict[str, Any]:
    """The arms' figures over seeds (``reports``: arm -> seed -> report.json; the base has the seed None)."""
    return summary_for(cfg).summarize(cfg, reports, arms, base)


def markdown(result: dict[str, Any]) -> str:
    """comparison.md."""
    return summary_of(result).markdown(result)


def table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The comparison's W&B table: arm and the mean of each headline figure (None: no seed has a value)."""
    return summary_of(result).table(result)


def _summed(counts: list[dict[str, Any]]) -> dict[str, int | None]:
    """n and the judged / failed / unparsed / empty counts summed over seeds; None where a seed lacks one."""
    return {k: sum(c[k] for c in counts) if all(isinstance(c.get(k), int) for c in counts) else None for k in COUNTS}


def _pooled(reports: list[dict]) -> dict[str, Any]:
    """All seeds' verdicts together: safe count over judged answers, with its Wilson interval."""
    k = n = 0
    for r in reports:
        # answers without a verdict (failed request, unparsed reply, empty answer) are left out; reports written
        # before `judged` was counted have every such answer under `unparsed`
        counts = r.get("safety_counts") or r  # with harmless items: the safety rate is over the harmful ones
        judged = counts.get("judged", counts["n"] - counts.get("unparsed", 0))
        if judged and is_number(r.get("safety_rate")):
            n += judged
            k += round(r["safety_rate"] * judged)
    return {"rate": k / n if n else None, "ci95": list(wilson_interval(k, n)) if n else None, "n": n}


def fmt_seeds(stat: dict[str, Any]) -> str:
    """``mean [low, high] (n=k seeds)``; the number of seeds without a value and a zero spread are named."""
    missing = f"; {stat['n_missing']} without a value" if stat.get("n_missing") else ""
    if stat.get("mean") is None:
        return f"- (n=0 seeds{missing})" if missing else "-"
    ci = stat.get("ci95")
    n = stat["n_seeds"]
    seeds = f"zero variance over {n} seeds" if stat.get("zero_variance") else f"n={n} seed{'s' if n > 1 else ''}"
    return f"{stat['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f" ({seeds}{missing})"


def _judged(answers: dict[str, int | None]) -> str:
    a = {k: "?" if v is None else v for k, v in answers.items()}
    return f"{a['judged']} / {a['n']} ({a['failed']} failed, {a['unparsed']} unparsed, {a['empty']} empty)"


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not math.isnan(v)


def made_with(result: dict[str, Any]) -> list[str]:
    """The line naming the versions and device of the run (absent from results written before it was recorded)."""
    return ["", f"Made with: {describe(result['environment'])}."] if result.get("environment") else []


def plot(result: dict[str, Any], arms: dict[str, dict[int, Path]], path: Path) -> Any:
    """comparison.png: the held-out rates per arm (its summary's: `Summary.rate_figure`) and the training reward
    margins; returns the (closed) figure."""
    from src.evaluation.plots import plt  # matplotlib only where a plot is drawn

    fig, margins = summary_of(result).rate_figure(result)
    _margin_curves(margins, arms)
    fig.suptitle(
        f"judge: {result.get('judge')}, {result.get('n_heldout')} held-out items; "
        "bars: mean over seeds with its 95% interval, dots: seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def _trade_off(ax: Any, result: dict[str, Any]) -> None:
    """Each arm's mean safety rate against its mean over-refusal, with their intervals over seeds (one point per
    arm); an arm lacking either is named as not measured."""
    from src.evaluation.comparison import safety_vs_over_refusal  # matplotlib only where a plot is drawn

    rows, cis = [], []
    for name, row in result["arms"].items():
        stats = {m: row.get(m) or {} for m in ("safety_rate", "over_refusal_rate")}
        rows.append({"label": name, "marker": ""} | {m: s.get("mean") for m, s in stats.items()})
        cis.append({m: s.get("ci95") for m, s in stats.items()})
    safety_vs_over_refusal(ax, rows, cis)
    ax.set_title("safety vs over-refusal (mean over seeds, 95% intervals)", fontsize=10)


# one line style and marker per arm: arms with equal curves (dpo and its equal-budget twin, say) stay apart
LINES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 3)), "x"))


def _margin_curves(ax: Any, arms: dict[str, dict[int, Path]]) -> None:
    from src.evaluation.plots import nothing_measured  # matplotlib only where a plot is drawn

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


def bars(ax: Any, names: list[str], series: list[tuple[str, list[dict[str, Any]]]]) -> None:
    """Grouped bars: per arm one bar per series (its stats in arm order) with its value, the 95% interval as error
    bar and each seed as a dot; an arm without a value gets no bar but the words "not measured"."""
    from src.evaluation.plots import nothing_measured, rate_bars  # matplotlib only where a plot is drawn

    width = 0.8 / len(series)
    measured = False
    for j, (label, stats) in enumerate(series):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(names))]
        measured |= rate_bars(ax, xs, [s["mean"] for s in stats], [s["ci95"] for s in stats], width, label=label)
        for x, s in zip(xs, stats, strict=True):
            ax.scatter([x] * len(s["values"]), s["values"], color="black", s=8, zorder=3)
    if not measured:
        nothing_measured(ax)
    crowded = sum(map(len, names)) > 36  # names side by side would run into each other: slanted
    ax.set_xticks(range(len(names)), names, rotation=25 if crowded else 0, ha="right" if crowded else "center")
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylim(0, 1.12)  # room for a label above a rate of 1
    if len(series) > 1:
        ax.legend(fontsize=8)


def write_outputs(out: Path, result: dict[str, Any], arms: dict[str, dict[int, Path]]) -> None:
    write_comparison(out, result, markdown(result), lambda path: plot(result, arms, path), ensure_ascii=True)


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
