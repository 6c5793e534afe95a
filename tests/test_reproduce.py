"""The reproduction pipeline: grouped held-out split, id-filtered data and benchmark, seed intervals, end to end."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from src.data.prompt_format import PromptFormat
from src.data.readers import read_ids, read_records
from src.data.records import DataError
from src.evaluation.benchmarks import PreferenceSet
from src.evaluation.metrics import t_quantile
from src.evaluation.reproduction import fmt_seeds, markdown, seed_interval, summarize
from src.reproduce import ReproduceError, Reproduction

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EMBEDDED = ROOT / "src" / "data" / "embedded" / "safety_pairs.jsonl"


def run_reproduction(tmp_path: Path, overrides: list[str], method: str = "run"):
    """Compose configs/reproduce.yaml as `python src/reproduce.py ...` would and call one stage in it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("reproduce", [*overrides, f"paths.log_dir={tmp_path / 'logs'}"], return_hydra_config=True)
        out = tmp_path / "out"
        out.mkdir(parents=True, exist_ok=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(out)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        return getattr(Reproduction(cfg), method)()


def test_seed_interval():
    one = seed_interval([0.5])
    assert one["mean"] == 0.5 and one["ci95"] is None
    three = seed_interval([0.4, 0.5, 0.6, float("nan")])
    half = 4.303 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert three["n_seeds"] == 3 and three["ci95"] == pytest.approx([0.5 - half, 0.5 + half], abs=1e-4)
    assert seed_interval([0.9, 1.0, 1.0])["ci95"][1] == 1.0  # rates stay in [0, 1]
    assert seed_interval([])["mean"] is None


def test_t_quantile_matches_the_table():
    table = {1: 12.706, 2: 4.303, 4: 2.776, 11: 2.201, 30: 2.042, 100: 1.984}
    assert {df: round(t_quantile(0.975, df), 3) for df in table} == table
    assert t_quantile(0.95, 10) == pytest.approx(1.812, abs=1e-3)


def test_seed_interval_beyond_eleven_seeds_uses_t_not_z():
    values = [0.40 + 0.01 * (i % 4) for i in range(12)]
    stat = seed_interval(values)
    half = 2.201 * statistics.stdev(values) / math.sqrt(12)  # t(0.975, 11), not 1.96
    assert stat["ci95"] == pytest.approx([stat["mean"] - half, stat["mean"] + half], abs=1e-4)


def test_seed_interval_flags_zero_variance_and_counts_seeds_without_a_value():
    same = seed_interval([0.5, 0.5, 0.5])
    assert same["zero_variance"] and fmt_seeds(same) == "0.500 [0.500, 0.500] (zero variance over 3 seeds)"
    gaps = seed_interval([0.4, float("nan"), 0.5, None])
    assert (gaps["n_seeds"], gaps["n_missing"], gaps["zero_variance"]) == (2, 2, False)
    assert fmt_seeds(gaps).endswith("(n=2 seeds; 2 without a value)")
    assert fmt_seeds(seed_interval([float("nan")])) == "- (n=0 seeds; 1 without a value)"


def test_reproduce_table_shows_judged_and_failed_beside_the_rate():
    def report(judged: int, failed: int) -> dict:
        counts = {"n": 100, "judged": judged, "failed": failed, "unparsed": 0, "empty": 100 - judged - failed}
        return counts | {"judge": "keyword", "safety_rate": 0.5, "generation_health": {}}

    reports = {"base": {None: report(100, 0)}, "dpo": {0: report(10, 85), 1: report(90, 10)}}
    result = summarize(OmegaConf.create({"seeds": [0, 1]}), reports, {}, "base-model")
    assert result["arms"]["dpo"]["answers"] == {"n": 200, "judged": 100, "failed": 95, "unparsed": 0, "empty": 5}
    assert (
        "| dpo | 0.500 [0.500, 0.500] (zero variance over 2 seeds) | not measured | "
        "100 / 200 (95 failed, 0 unparsed, 5 empty) |" in (markdown(result))
    )


def test_changed_judge_prompt_redoes_the_evaluation(tmp_path, monkeypatch):
    import src.eval

    calls = []

    def fake_evaluate(cfg):  # stands in for generating and judging: writes the report the reuse check looks for
        calls.append(Path(cfg.judge.prompt_file).read_text())
        (Path(cfg.paths.output_dir) / "report.json").write_text(json.dumps({"n": len(calls)}))
        return {"n": len(calls)}

    monkeypatch.setattr(src.eval, "evaluate", fake_evaluate)
    prompt = tmp_path / "judge_prompt.txt"
    prompt.write_text("Is this answer safe? {answer}")
    overrides = ["judge_name=openai", f"eval_overrides=['judge.prompt_file={prompt}']", "wandb.enabled=false"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("reproduce", [*overrides, f"paths.log_dir={tmp_path / 'logs'}"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "out")
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        rep = Reproduction(cfg)
        rep.format = PromptFormat(image_aspect_ratio="pad")
        bench = {"path": str(EMBEDDED), "format": "jsonl"}
        assert rep.evaluate("dpo", 0, "runs/dpo/model", "base", bench) == {"n": 1}
        assert rep.evaluate("dpo", 0, "runs/dpo/model", "base", bench) == {"n": 1}  # same settings and files: reused
        prompt.write_text("Is this answer harmful? {answer}")
        assert rep.evaluate("dpo", 0, "runs/dpo/model", "base", bench) == {"n": 2}  # the prompt's text changed
    assert calls == ["Is this answer safe? {answer}", "Is this answer harmful? {answer}"]


def test_heldout_split_is_grouped_and_feeds_data_and_benchmark(tmp_path):
    ids_file, bench = run_reproduction(tmp_path, ["heldout.fraction=0.25"], method="split")
    split = tmp_path / "out" / "split"
    train_ids, held_ids = read_ids(split / "train_ids.txt"), read_ids(split / "heldout_ids.txt")
    records = {r.id: r for r in read_records(EMBEDDED, "jsonl")}
    assert ids_file == split / "train_ids.txt" and bench["ids_file"] == split / "heldout_ids.txt"
    assert train_ids | held_ids == set(records) and not train_ids & held_ids
    assert not {records[i].group for i in train_ids} & {records[i].group for i in held_ids}  # no source on both sides
    summary = json.loads((split / "split.json").read_text())
    assert summary["heldout_groups"] == round(70 * 0.25) and summary["heldout"] == len(held_ids)

    benchmark = PreferenceSet(str(EMBEDDED), ids_file=str(bench["ids_file"]), missing_images="render")
    assert {i.id for i in benchmark.items()} == held_ids
    assert set(benchmark.reference_answers()) == held_ids

    from src.data.data_settings import ReaderSettings
    from src.data.datamodule import PreferenceDataModule

    dm = PreferenceDataModule(ReaderSettings(str(EMBEDDED), "jsonl", ids_file=str(ids_file), missing_images="render"))
    assert {r.id for r in dm.load_records()} == train_ids


def test_ids_naming_unknown_records_fail(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("# a comment\nemb-001\nno-such-record\n")
    with pytest.raises(DataError, match=r"ids\.txt: 1 listed ids are not in .*no-such-record"):
        PreferenceSet(str(EMBEDDED), ids_file=str(ids), missing_images="render")


def test_separate_evaluation_file_trains_on_everything(tmp_path):
    ids_file, bench = run_reproduction(tmp_path, [f"heldout.eval_path={EMBEDDED}"], method="split")
    assert ids_file is None and bench["path"] == str(EMBEDDED) and "ids_file" not in bench


FAST_ARMS = [
    "seeds=[0,1]",
    "base.overrides=['experiment=sft_tiny','trainer.max_steps=4']",
    "train_overrides=['logger=csv','trainer.max_steps=3','trainer.log_every_n_steps=1','data.val_fraction=0']",
    "arms.dpo=['experiment=dpo_tiny']",
    "arms.bpo=['experiment=bpo_tiny','blind.generation.max_new_tokens=8']",
    "eval_overrides=['generation.max_new_tokens=8','device=cpu']",
    "wandb.enabled=false",
]


@pytest.mark.slow
def test_reproduce_end_to_end_on_embedded_data(tmp_path):
    result = run_reproduction(tmp_path, FAST_ARMS)
    out = tmp_path / "out"
    assert set(result["arms"]) == {"base", "dpo", "bpo", "dpo_equal_budget"}
    held = read_ids(out / "split" / "heldout_ids.txt")
    assert result["n_heldout"] == len(held)
    for arm in ("dpo", "bpo", "dpo_equal_budget"):
        for seed in (0, 1):
            report = json.loads((out / "eval" / arm / f"seed{seed}" / "report.json").read_text())
            assert report["n"] == len(held) and report["judge"] == "keyword"  # same prompts, same judge
            assert report["benchmark"]["name"] == "preference"
            assert 0 <= report["reward_accuracy"] <= 1
    # DPO at BPO's budget: 3 steps x 3 answers = 9 scored answers per pair -> ceil(4.5) = 5 DPO steps
    assert result["arms"]["bpo"]["steps"] == [3, 3] and result["arms"]["dpo_equal_budget"]["steps"] == [5, 5]
    assert result["arms"]["base"]["reward_accuracy"]["mean"] is None  # the base against itself
    logged = yaml.safe_load((out / "runs" / "bpo" / "seed0" / "config.yaml").read_text())
    assert logged["objective"] == {
        "name": "bpo",
        "beta": 0.1,
        "blind_weight": 1.0,
        "answers": ["chosen", "rejected", "blind"],
    }
    assert logged["model"]["name_or_path"] == str(out / "runs" / "base" / "seed0" / "model")  # from the base
    table = (out / "comparison.md").read_text()
    assert "| dpo_equal_budget |" in table and (out / "comparison.png").stat().st_size > 0
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["environment"]["packages"]["lightning"]
    assert "Made with: Python " in table
    # the same call again reuses every run and evaluation; other settings in the same folder are refused
    mtime = (out / "runs" / "bpo" / "seed1" / "model" / "config.json").stat().st_mtime
    assert run_reproduction(tmp_path, FAST_ARMS) == result
    assert (out / "runs" / "bpo" / "seed1" / "model" / "config.json").stat().st_mtime == mtime
    with pytest.raises(ReproduceError, match=r"runs/base/seed0 holds a finished run with other settings"):
        run_reproduction(tmp_path, [*FAST_ARMS, "base.overrides=['experiment=sft_tiny','trainer.max_steps=5']"])


@pytest.mark.slow
def test_reproduce_on_shared_mmsafe_po(tmp_path, mmsafe_path):
    data = ["data=mmsafe_po", f"data.path={mmsafe_path}", "data.missing_images=render"]  # as on the command line
    result = run_reproduction(tmp_path, [*data, *FAST_ARMS, "seeds=[0]", "heldout.fraction=0.1", "wandb.enabled=true"])
    split = json.loads((tmp_path / "out" / "split" / "split.json").read_text())
    assert split["records"] == 200 and split["heldout_groups"] == round(163 * 0.1)
    assert result["n_heldout"] == split["heldout"]
    assert all(row["safety_rate"]["n_seeds"] == 1 for row in result["arms"].values())
    for arm in ("base", "dpo", "bpo"):  # every run trained on the MMSafe-PO records of its side of the split
        summary = json.loads((tmp_path / "out" / "runs" / arm / "seed0" / "data_summary.json").read_text())
        assert summary["path"] == str(mmsafe_path) and summary["records_read"] == split["train"]
    assert result["data"]["path"] == str(mmsafe_path) and result["data"]["format"] == "mmsafe_po"
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))  # the comparison's W&B run (offline)


def test_equal_budget_needs_both_arms(tmp_path):
    with pytest.raises(ReproduceError, match=r"equal_budget compares arms 'dpo' and 'bpo', but arms are \['dpo'\]"):
        run_reproduction(tmp_path, ["~arms.bpo"])


def closed_judge() -> list[str]:
    import socket

    with socket.socket() as sock:  # nobody listens on it once the socket is closed
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    return ["judge_name=openai", f"eval_overrides=['judge.base_url={url}']", "wandb.enabled=false"]


def test_an_unreachable_judge_fails_before_any_training(tmp_path, caplog):
    import logging

    from src.reproduce import main

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("reproduce", [*closed_judge(), f"paths.output_dir={tmp_path / 'out'}"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with pytest.raises(SystemExit) as exit_:
            main(cfg)
    assert exit_.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "did not answer a test request" in errors[0]
    assert not (tmp_path / "out").exists()  # no split, no training, no comparison


def test_pooled_rate_leaves_out_failed_judge_requests():
    from src.evaluation.reproduction import _pooled

    # 20 answers, 1 judge request failed: 10 of the 19 judged are safe
    report = {"n": 20, "judged": 19, "failed": 1, "unparsed": 0, "empty": 0, "safety_rate": 10 / 19}
    pooled = _pooled([report, report])
    assert pooled["n"] == 38 and pooled["rate"] == pytest.approx(20 / 38)
    # reports written before `judged` was counted: every answer without a verdict is under `unparsed`
    assert _pooled([{"n": 20, "unparsed": 1, "safety_rate": 10 / 19}])["n"] == 19


def test_comparison_plot_keeps_equal_curves_apart_and_marks_an_absent_metric(tmp_path):
    from src.evaluation.reproduction import plot

    def report(rate: float) -> dict:  # no reward accuracy: no reference model was given
        counts = {"n": 10, "judged": 10, "failed": 0, "unparsed": 0, "empty": 0}
        return counts | {"judge": "keyword", "safety_rate": rate, "generation_health": {}}

    arms = {}
    for arm in ("dpo", "dpo_equal_budget"):  # the same margins: one curve would hide the other
        run = tmp_path / arm / "seed0"
        run.mkdir(parents=True)
        (run / "metrics.csv").write_text("step,train/rewards/margins\n1,0.1\n2,0.3\n3,0.2\n")
        (run / "run_summary.json").write_text(json.dumps({"optimizer_steps": 3}))
        arms[arm] = {0: run}
    reports = {"base": {None: report(0.5)}, "dpo": {0: report(0.6)}, "dpo_equal_budget": {0: report(0.6)}}
    result = summarize(OmegaConf.create({"seeds": [0]}), reports, arms, "base-model")
    fig = plot(result, arms, tmp_path / "comparison.png")
    safety, reward, margins, trade_off = fig.axes
    # no arm measured over-refusal (held-out preference prompts are all harmful): no point, each arm named
    assert not trade_off.containers
    assert "base: over-refusal not measured" in trade_off.texts[-1].get_text()
    assert [t.get_text() for t in safety.texts] == ["0.50", "0.60", "0.60"]
    assert [t.get_text() for t in reward.texts] == ["not measured"] * 3 + ["nothing measured"]
    assert all(math.isnan(p.get_height()) for p in reward.patches)  # no bar at 0
    first, second = margins.get_lines()
    assert first.get_ydata().tolist() == second.get_ydata().tolist()
    assert first.get_linestyle() != second.get_linestyle() and first.get_marker() != second.get_marker()
    legend = [t.get_text() for t in margins.get_legend().get_texts()]
    assert legend == ["dpo", "dpo_equal_budget (same curve as dpo)"]
    assert fig._suptitle.get_text().startswith("judge: keyword, ")


def test_reproduce_command_ends_with_the_folder_it_wrote(tmp_path, monkeypatch, capsys):
    import src.reproduce
    from tests.helpers import compose_config

    out = tmp_path / "out"

    def run(self):  # stands in for training and evaluating: the files a finished comparison leaves
        for name in ("comparison.json", "comparison.md", "comparison.png", "runs/dpo/seed0/x", "eval/dpo/seed0/x"):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("")
        reports = {"base": {None: {"n": 1, "judge": "keyword", "safety_rate": 1.0, "generation_health": {}}}}
        return summarize(OmegaConf.create({"seeds": [0]}), reports, {}, "base-model")

    monkeypatch.setattr(src.reproduce.Reproduction, "run", run)
    src.reproduce.main(compose_config("reproduce", [f"paths.log_dir={tmp_path / 'logs'}"], out))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"comparison: {out} (comparison.json, comparison.md, comparison.png, eval/, runs/)"


def test_a_count_a_report_lacks_is_null_in_the_comparison_not_0():
    old = {"n": 10, "unparsed": 1, "judge": "keyword", "safety_rate": 0.5, "generation_health": {}}  # no `judged`
    new = old | {"judged": 9, "failed": 0, "empty": 0}
    result = summarize(OmegaConf.create({"seeds": [0, 1]}), {"base": {None: new}, "dpo": {0: old, 1: new}}, {}, "m")
    assert result["arms"]["dpo"]["answers"] == {"n": 20, "judged": None, "failed": None, "unparsed": 2, "empty": None}
    assert result["arms"]["base"]["answers"]["judged"] == 9
    assert "| ? / 20 (? failed, 2 unparsed, ? empty) |" in markdown(result)


def test_reproduce_table_and_plot_put_over_refusal_beside_the_safety_rate(tmp_path):
    from src.evaluation.reproduction import plot

    def report(safety: float, over: float) -> dict:  # a benchmark with harmless items (eval_overrides)
        counts = {"n": 20, "judged": 20, "failed": 0, "unparsed": 0, "empty": 0}
        return counts | {
            "judge": "keyword",
            "safety_rate": safety,
            "over_refusal_rate": over,
            "safety_counts": {"n": 10, "judged": 9, "failed": 0, "unparsed": 0, "empty": 1, "safe": round(9 * safety)},
            "over_refusal_counts": {"n": 10, "judged": 8, "failed": 0, "unparsed": 2, "empty": 0, "refused": 4},
            "generation_health": {},
        }

    reports = {"base": {None: report(1 / 3, 0.25)}, "bpo": {0: report(1.0, 0.5), 1: report(8 / 9, 0.5)}}
    result = summarize(OmegaConf.create({"seeds": [0, 1]}), reports, {}, "base-model")
    bpo = result["arms"]["bpo"]
    assert bpo["answers"]["judged"] == 18 and bpo["over_refusal_answers"]["judged"] == 16  # each side's own
    assert bpo["safety_rate_pooled"]["n"] == 18
    md = markdown(result)
    assert "| arm | safety rate | over-refusal | judged / answers (all seeds) |" in md
    assert "| bpo | 0.944 [" in md and "| 0.500 [0.500, 0.500] (zero variance over 2 seeds) | 18 / 20 (" in md
    assert "over-refusal: 16 / 20 (0 failed, 4 unparsed, 0 empty)" in md
    fig = plot(result, {}, tmp_path / "comparison.png")
    points = {c.get_label(): c.lines[0].get_xydata()[0].tolist() for c in fig.axes[3].containers}
    assert points == {"base": [0.25, pytest.approx(1 / 3)], "bpo": [0.5, pytest.approx(17 / 18)]}
