"""perf/bench_step.py: its pieces time one step of ours in-process, and the table prints what it measured."""

import argparse
import math

import numpy as np
import pytest
from PIL import Image

from perf.bench_step import parse_args
from perf.step import data as bench_data
from perf.step.common import BATCH_SIZE, LABELS, TINY
from perf.step.data import make_data, ordered_loader, ours_datamodule
from perf.step.endtoend import worker_ours_end_to_end, worker_ours_sweep_job
from perf.step.ours import worker_ours_steps
from perf.step.padding import ours_padding_share, packed_padding
from perf.step.report import print_table, summary
from perf.step.runner import CONFIGURATIONS, configurations
from perf.step.workload import epoch_order, make_mmsafe

COLUMNS = ["configuration", "s/step", "vs TRL", "median", "CPU s", "cores", "peak RSS MB", "RSS vs TRL", "load"]


def test_one_step_of_ours_starts_at_ln2_and_fills_its_table_row(tmp_path, capsys, monkeypatch):
    # the benchmark's model and data, smaller: 32 px images (64 image tokens, not 576), 20-token answers
    monkeypatch.setitem(TINY, "image_size", 32)
    monkeypatch.setattr(bench_data, "ANSWER_TOKENS", 20)
    data = make_data(tmp_path, n_records=BATCH_SIZE)  # one batch
    args = argparse.Namespace(data=data["path"], steps=1, warmup=0, profile=False)
    result = worker_ours_steps(args, "ours_dpo")
    # the benchmark's parity check: policy == (precomputed) reference at the first step, so the DPO loss is ln 2
    assert result["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result["precompute_s"] > 0 and result["s_per_step"] > 0 and len(result["step_times"]) == 1

    capsys.readouterr()
    print_table({"ours_dpo": result})
    blank, header, rule, row = capsys.readouterr().out.splitlines()
    assert blank == ""
    # the columns in their order; the last one is "ref pre s"
    assert [c for c in COLUMNS if c in header] == COLUMNS and header.rstrip().endswith("ref pre s")
    assert [header.index(c) for c in COLUMNS] == sorted(header.index(c) for c in COLUMNS)
    assert rule == "-" * len(header) and len(row) == len(header)
    assert row.startswith(LABELS["ours_dpo"])
    assert row[len(header) - 10 :].strip() == f"{result['precompute_s']:.1f}"
    step, vs_trl = row[46:55].strip(), row[55:64].strip()
    assert step == f"{result['s_per_step']:.3f}" and vs_trl == ""  # no TRL row: no ratio

    headline = summary({"ours_dpo": result})
    assert headline["ours_dpo_s_per_step"] == round(result["s_per_step"], 4)
    assert headline["trl_dpo_s_per_step"] is None and headline["dpo_speedup_vs_trl"] is None


def test_configurations_without_trl_and_quick():
    args = argparse.Namespace(quick=True, no_extras=False, only=None)
    assert configurations(args, run_trl=False) == ["ours_dpo", "ours_bpo", "ours_bpo_epoch", "ours_bpo_end_to_end"]
    assert configurations(args, run_trl=True)[0] == "check"  # the parity check runs before any timing
    args = argparse.Namespace(quick=False, no_extras=False, only="ours_bpo,trl_dpo")
    assert configurations(args, run_trl=False) == ["ours_bpo"]
    assert set(configurations(argparse.Namespace(quick=False, no_extras=False, only=None), True)) == set(CONFIGURATIONS)
    assert configurations(argparse.Namespace(quick=False, no_extras=True, only=None), True)[-2:] == [
        "trl_dpo_sweep",
        "ours_bpo_sweep",
    ]
    args = argparse.Namespace(quick=False, no_extras=True, only=None, no_sweep=True, no_end_to_end=True)
    assert configurations(args, run_trl=True) == ["check", "trl_dpo", "ours_dpo", "ours_bpo", *EPOCH_ROWS]


EPOCH_ROWS = ["trl_dpo_epoch", "ours_bpo_epoch"]
JSON_KEYS = {
    "workload",
    "widths",
    "text_layers",
    "trl_dpo_s_per_step",
    "ours_dpo_s_per_step",
    "ours_bpo_s_per_step",
    "dpo_speedup_vs_trl",
    "bpo_speedup_vs_trl_dpo",
    "epoch_speedup_bpo_vs_trl_dpo",
    "bpo_end_to_end_speedup_vs_trl_dpo_epoch",
    "sweep4_speedup_vs_trl",
    "trl_peak_rss_mb",
    "ours_dpo_peak_rss_mb",
    "ours_bpo_peak_rss_mb",
    "bpo_rss_vs_trl",
    "padding_share",
    "padding_share_before",
    "trl_padding_share",
    "blind_tokens_per_s",
}


def test_summary_has_every_key_null_when_not_run_and_the_ratios_when_run():
    assert summary({}) == dict.fromkeys(JSON_KEYS)
    results = {
        "workload": {"workload": "mmsafe", "widths": "tiny", "padding_share": 0.1, "padding_share_before": 0.3},
        "trl_dpo": {"s_per_step": 4.0, "peak_rss_mb": 2000.0},
        "ours_bpo": {"s_per_step": 1.0, "peak_rss_mb": 1000.0},
        "trl_dpo_epoch": {"epoch_s": 60.0, "padding_share": 0.25},
        "ours_bpo_end_to_end": {"epoch_s": 40.0, "blind_tokens_per_s": 123.0},
        "trl_dpo_sweep": {"sweep_s": 300.0},
        "ours_bpo_sweep": {"sweep_s": 100.0},
    }
    out = summary(results)
    assert set(out) == JSON_KEYS and out["workload"] == "mmsafe" and out["widths"] == "tiny"
    assert out["bpo_speedup_vs_trl_dpo"] == 4.0 and out["bpo_rss_vs_trl"] == 0.5
    assert out["bpo_end_to_end_speedup_vs_trl_dpo_epoch"] == 1.5 and out["sweep4_speedup_vs_trl"] == 3.0
    assert (out["padding_share"], out["padding_share_before"], out["trl_padding_share"]) == (0.1, 0.3, 0.25)
    assert out["blind_tokens_per_s"] == 123.0 and out["dpo_speedup_vs_trl"] is None


def test_mmsafe_workload_is_the_readers_records_in_epoch_order(mmsafe_path, tmp_path):
    from src.data.images import render_stand_in
    from src.data.readers import read_records

    source = read_records(mmsafe_path, "mmsafe_po")[:6]
    data = make_mmsafe(mmsafe_path, tmp_path, 6)
    written = read_records(data["path"], "jsonl")
    order = epoch_order(6)
    assert sorted(order) == list(range(6)) and order != list(range(6))
    assert [r.id for r in written] == [source[i].id for i in order]  # training's first-epoch order
    for i, w in zip(order, written, strict=True):
        s = source[i]
        # the prompt turns (history included, "USER:" / "ASSISTANT:" stripped) and answers the reader gives
        assert (w.turns, w.image_turn, w.chosen, w.rejected) == (s.turns, s.image_turn, s.chosen, s.rejected)
        assert w.blind == source[(i + 1) % 6].chosen and w.group == s.group
        # the stand-in `data.missing_images=render` draws at the model's image size, pixel for pixel
        with Image.open(tmp_path / w.image) as im:
            assert np.array_equal(np.asarray(im), np.asarray(render_stand_in(s.stand_in_text(), TINY["image_size"])))
    assert data["stand_ins"] == 6


def test_missing_shared_data_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setenv("MLLM_BPO_SHARED_DATA", "none")
    with pytest.raises(SystemExit) as e:
        parse_args([])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MLLM_BPO_SHARED_DATA=none" in err and "--workload synthetic" in err
    assert parse_args(["--workload", "synthetic"]).records == 32  # needs no data


@pytest.fixture
def widths():
    """`parse_args` sets the model of the run for every worker of the process: back to the tiny model after."""
    from perf.step.common import configure

    yield
    configure("tiny", 1)


def test_real_widths_run_the_check_and_the_step_rows_of_llava_1_5_7b(widths):
    from perf.step.common import describe_model, image_size, model_spec

    args = parse_args(["--widths", "llava_1_5_7b", "--text-layers", "2", "--workload", "synthetic"])
    assert (args.records, args.warmup, args.steps) == (16, 1, 2)
    assert configurations(args, run_trl=True) == ["check", "trl_dpo", "ours_dpo", "ours_bpo"]
    shapes = model_spec()["shapes"]
    assert shapes["text"]["hidden_size"] == 4096 and shapes["text"]["vocab_size"] == 32064
    assert (shapes["text_layers"], shapes["vision_layers"], image_size()) == (2, 1, 336)
    assert "4096 x 2 layers" in describe_model() and "576 image tokens" in describe_model()
    with pytest.raises(SystemExit):
        parse_args(["--widths", "llava_1_5_7b", "--text-layers", "0", "--workload", "synthetic"])


@pytest.fixture
def small(tmp_path, monkeypatch):
    """The benchmark's model and data, smaller: 32 px images (64 image tokens, not 576), 20-token answers."""
    monkeypatch.setitem(TINY, "image_size", 32)
    monkeypatch.setattr(bench_data, "ANSWER_TOKENS", 20)
    return make_data(tmp_path, n_records=BATCH_SIZE + 2)


def test_packed_padding_counts_the_pad_positions_of_each_row(small):
    from src.models.tiny import build_tiny_llava

    model, processor = build_tiny_llava(vocab_size=TINY["vocab_size"], image_size=32, patch_size=4)
    pad = processor.tokenizer.pad_token_id
    dm = ours_datamodule(small["path"], processor, ("chosen", "rejected", "blind"))
    batch = next(iter(ordered_loader(dm, pad)))
    pairs = dm.train_set.pairs[:BATCH_SIZE]  # file order
    rows = [len(p.prompt_ids) + sum(len(a) for a in p.answer_ids) for p in pairs]
    assert packed_padding(batch, pad) == (sum(max(rows) - n for n in rows), BATCH_SIZE * max(rows))
    # over the epoch: this batch and the last, 2-record one
    last = dm.train_set.pairs[BATCH_SIZE:]
    tail = [len(p.prompt_ids) + sum(len(a) for a in p.answer_ids) for p in last]
    pads = sum(max(rows) - n for n in rows) + sum(max(tail) - n for n in tail)
    assert ours_padding_share(ordered_loader(dm, pad), pad) == pytest.approx(
        pads / (BATCH_SIZE * max(rows) + 2 * max(tail))
    )
    # as trained under sdpa: the records of a batch back to back in one row, no padding
    assert ours_padding_share(ordered_loader(dm, pad), pad, model) == 0.0


def test_bpo_end_to_end_generates_every_blind_answer(small):
    args = argparse.Namespace(data=small["path"], blind_tokens=3, blind_batch_size=4, beta=0.1)
    e2e = worker_ours_end_to_end(args)
    assert e2e["generated"] == BATCH_SIZE + 2 and e2e["generated_tokens"] == (BATCH_SIZE + 2) * 3  # no EOS
    assert e2e["blind_tokens_per_s"] > 0 and e2e["steps"] == 2 and e2e["precomputed"] > 0
    assert e2e["epoch_s"] > e2e["generation_s"] + e2e["precompute_s"]


@pytest.mark.slow
def test_sweep_jobs_after_the_first_reuse_its_caches(small, tmp_path):
    args = argparse.Namespace(data=small["path"], blind_tokens=3, blind_batch_size=4, beta=0.1)
    cache = tmp_path / "sweep"
    first = worker_ours_sweep_job(argparse.Namespace(**vars(args), cache_dir=str(cache), sweep_job=1))
    assert first["generated"] == BATCH_SIZE + 2 and first["precomputed"] > 0
    second = worker_ours_sweep_job(argparse.Namespace(**vars(args) | {"beta": 0.5}, cache_dir=str(cache), sweep_job=2))
    assert second["generated"] == 0 and second["precomputed"] == 0 and second["beta"] == 0.5
    with pytest.raises(AssertionError, match="did not reuse"):  # a job after the first that had to compute
        worker_ours_sweep_job(argparse.Namespace(**vars(args), cache_dir=str(tmp_path / "fresh"), sweep_job=2))


def test_json_out_keeps_every_finished_worker_when_the_run_stops(tmp_path, monkeypatch):
    """With --json-out each worker's result is saved as soon as it finishes: a run stopped part-way (a time limit,
    Ctrl-C) keeps what it measured, marked incomplete."""
    import json

    from perf import bench_step
    from perf.step import runner

    def spawn(name, args, data, extra=()):
        if name == "ours_bpo":
            raise KeyboardInterrupt  # stopped during the second worker
        return {"s_per_step": 1.5, "name": name}

    monkeypatch.setattr(runner, "spawn", spawn)
    out = tmp_path / "bench.json"
    args = argparse.Namespace(repeat=1, json_out=str(out))
    with pytest.raises(KeyboardInterrupt):
        runner.run_all(["ours_dpo", "ours_bpo"], args, "data.jsonl", bench_step.save_partial(args, {"records": 2}))
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and saved["data"] == {"records": 2}
    assert saved["runs"] == {"ours_dpo": [{"s_per_step": 1.5, "name": "ours_dpo"}], "ours_bpo": []}


def test_a_real_width_row_runs_the_checkpoints_architecture_on_its_own_picture_size(widths, tmp_path, monkeypatch):
    """--widths llava_1_5_7b through the same workers, narrowed here (text 64 wide, vision 32) to stay fast: the
    llava-1.5 shapes build by `build_random` (336 px pictures: 576 image tokens, the 32064-row vocabulary, no
    resize) and the first DPO loss is ln 2 (policy == precomputed reference)."""
    from perf.step import common

    common.configure("llava_1_5_7b", 1)
    wide = common.shapes

    def narrow():
        out = wide()
        out["text"] |= {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}
        out["text"]["num_key_value_heads"] = 2
        out["vision"] |= {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
        out["vision"]["projection_dim"] = 32
        return out

    monkeypatch.setattr(common, "shapes", narrow)
    monkeypatch.setattr(bench_data, "ANSWER_TOKENS", 12)
    data = make_data(tmp_path, n_records=2)
    with Image.open(tmp_path / "images" / "r000.png") as im:
        assert im.size == (336, 336)
    result = worker_ours_steps(argparse.Namespace(data=data["path"], steps=1, warmup=0, profile=False), "ours_dpo")
    assert result["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    model, processor = common.build_policy()
    assert model.config.text_config.vocab_size == 32064 and model.config.text_config.hidden_size == 64
    dm = ours_datamodule(data["path"], processor, ("chosen", "rejected"))
    assert dm.train_set.pairs[0].prompt_ids.count(model.config.image_token_index) == 576
