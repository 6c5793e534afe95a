"""BPO end to end (blind answers generated, reference log-probs computed, one epoch) and one job of a 4-job sweep.

Blind answers: `fill_blind_answers` (what `train.py` runs) with greedy decoding of the text-only prompts by the
initial policy (= the reference). The tiny random model never emits EOS, so every answer runs to
``max_new_tokens``; it is set, before any timing, to the mean token length of the workload's real chosen and
rejected answers (rounded; EOS included), so the generated total is what a model answering at the data's length
would generate.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from perf.step.common import BLIND_BATCH_SIZE, make_optimizer, peak_rss_mb, stamp
from perf.step.data import ours_datamodule
from perf.step.ours import ours_module, precompute, train_loop


def bpo_job(args: argparse.Namespace, cache_dir: Path, beta: float) -> dict[str, Any]:
    """Build the model and the data module, fill the blind answers (cache ``cache_dir/blind``), compute the reference
    log-probs (cache ``cache_dir/reference``) and train one epoch, as one `train.py` run does; timed in parts."""
    import torch

    from src.models.generation import GenerationSettings, fill_blind_answers, read_generations

    start = stamp()
    module, (_, answers) = ours_module("ours_bpo_epoch", args.data, beta)
    built = time.perf_counter()
    settings = GenerationSettings(
        max_new_tokens=args.blind_tokens, batch_size=args.blind_batch_size or BLIND_BATCH_SIZE, max_length=2048
    )
    blind: dict[str, Any] = {}

    def fill(records: list[Any]) -> list[Any]:
        t = time.perf_counter()
        # the workload's stand-in blind answers are dropped: every record gets (or reads) a generated one
        filled, summary = fill_blind_answers(
            [replace(r, blind=None) for r in records], module.policy, module.processor, settings, cache_dir / "blind"
        )
        blind.update(summary, generation_s=time.perf_counter() - t)
        return filled

    dm = ours_datamodule(args.data, module.processor, answers, fill=fill)
    setup_s = time.perf_counter() - built - blind["generation_s"]  # reading and encoding the data
    # tokens are counted only when every answer was generated now into this job's fresh cache folder: its file then
    # holds this run's lines only
    fresh = blind["generated"] > 0 and blind["from_cache"] == 0
    tokens = sum(ln["num_tokens"] for ln in read_generations(Path(blind["cache"])).values()) if fresh else None
    t0 = time.perf_counter()
    reference = precompute(module, dm, str(cache_dir / "reference"))
    precompute_s = time.perf_counter() - t0
    torch.manual_seed(0)
    stamps, _ = train_loop(module, dm, None, make_optimizer(module.policy))
    end = stamp()
    return {
        "job_s": end[0] - start[0],  # model build included, as in a training run
        "epoch_s": end[0] - built,  # from the data module on: what `ours_bpo_epoch` times, plus generation
        "build_s": built - start[0],
        "setup_s": setup_s,
        "epoch_cpu_s": end[1] - start[1],
        "generation_s": blind["generation_s"],
        "generated": blind["generated"],
        "generated_tokens": tokens,
        "blind_tokens_per_s": tokens / blind["generation_s"] if tokens else None,
        "unfinished": blind.get("unfinished"),
        "max_new_tokens": settings.max_new_tokens,
        "blind_batch_size": settings.batch_size,
        "precompute_s": precompute_s,
        "precomputed": reference["computed"],
        "steps": len(stamps),
        "beta": beta,
        "peak_rss_mb": peak_rss_mb(),
        "loadavg": os.getloadavg()[0],
    }


def worker_ours_end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    """`bpo_job` on a fresh cache: every blind answer generated, every reference log-prob computed."""
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as cache:
        result = bpo_job(args, Path(cache), args.beta)
    records = sum(1 for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip())
    assert result["generated"] == records and result["precomputed"] > 0, result
    return result


def worker_ours_sweep_job(args: argparse.Namespace) -> dict[str, Any]:
    """Job ``args.sweep_job`` (1-4) of a sweep sharing ``args.cache_dir``: job 1 fills the caches, jobs 2-4 read
    them (generate nothing, compute nothing), as Hydra's basic launcher runs a multirun's jobs one after another."""
    result = bpo_job(args, Path(args.cache_dir), args.beta)
    if args.sweep_job == 1:
        assert result["generated"] > 0 and result["precomputed"] > 0, result
    else:
        assert result["generated"] == 0 and result["precomputed"] == 0, (
            f"sweep job {args.sweep_job} did not reuse the caches of job 1: {result}"
        )
    return result | {"sweep_job": args.sweep_job}
