"""Our side: `PreferenceModule` in a bare training loop (forward_batch -> backward -> clip -> AdamW step)."""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from typing import Any

from perf.step.common import (
    BATCH_SIZE,
    BETA,
    BETAS,
    LR,
    MAX_GRAD_NORM,
    OURS,
    PRECOMPUTE_BATCH_SIZE,
    make_optimizer,
    model_fingerprint,
    model_spec,
    peak_rss_mb,
    real_widths,
    resize_vocab,
    stamp,
    step_stats,
)
from perf.step.data import ordered_loader, ours_datamodule


def ours_module(name: str, data: str, beta: float = BETA) -> tuple[Any, Any]:
    """(module, (objective, answers)) for one of OURS; the policy is resized to VOCAB (and a frozen_copy
    reference re-copied from it, so policy == reference)."""
    from src.models.module import PreferenceModule
    from src.models.objectives import ANSWERS

    objective, layout, strategy, checkpointing = OURS[name]
    module = PreferenceModule(
        model={**model_spec(), "attn_implementation": "sdpa", "gradient_checkpointing": checkpointing},
        objective={"name": objective, "beta": beta},
        optim={"lr": LR, "weight_decay": 0.0, "betas": list(BETAS), "warmup_steps": 0},
        layout=layout,
        reference={"strategy": strategy},
    )
    resize_vocab(module.policy)
    # frozen_copy was made before the resize: copy the resized policy (real widths are not resized)
    if module.reference is not None and not real_widths():
        module.reference = copy.deepcopy(module.policy).eval().requires_grad_(False)
    return module, (objective, ANSWERS[objective])


def precompute(module: Any, dm: Any, cache_dir: str) -> dict[str, Any]:
    from src.models.reference import precompute_reference_logps

    values, summary = precompute_reference_logps(
        module.policy, [dm.train_set], module.pad_token_id, cache_dir, module.layout, PRECOMPUTE_BATCH_SIZE
    )
    dm.train_set.set_reference_logps(values[0])
    return summary


def train_loop(module: Any, dm: Any, total_steps: int | None, optimizer: Any) -> tuple[list[Any], list[float]]:
    """Bare training loop over the batches in file order (TRL's too); returns (step end stamps, losses).
    ``total_steps=None``: one epoch."""
    import torch

    module.train()
    params = [p for p in module.policy.parameters() if p.requires_grad]
    stamps, losses = [], []
    loader = ordered_loader(dm, module.pad_token_id)
    it = iter(loader)
    step = 0
    while total_steps is None or step < total_steps:
        try:
            batch = next(it)
        except StopIteration:
            if total_steps is None:
                break
            it = iter(loader)
            batch = next(it)
        loss, _ = module.forward_batch(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        stamps.append(stamp())
        step += 1
    return stamps, losses


def worker_ours_steps(args: argparse.Namespace, name: str) -> dict[str, Any]:
    import torch

    module, (_, answers) = ours_module(name, args.data)
    fp = model_fingerprint(module.policy)
    # the records the timed steps use (file order, as TRL's step row): no reference log-probs for the rest
    dm = ours_datamodule(args.data, module.processor, answers, max_records=(args.warmup + args.steps) * BATCH_SIZE)
    precompute_s = None
    with tempfile.TemporaryDirectory() as cache:
        if module.reference_strategy == "precomputed":
            t0 = time.perf_counter()
            precompute(module, dm, cache)
            precompute_s = time.perf_counter() - t0
    torch.manual_seed(0)
    optimizer = make_optimizer(module.policy)
    start = stamp()
    stamps, losses = train_loop(module, dm, args.warmup + args.steps, optimizer)
    stats = step_stats([start, *stamps], args.warmup)
    profile = _profile_ours(module, dm, optimizer) if args.profile else None
    return stats | {
        "peak_rss_mb": peak_rss_mb(),
        "fingerprint": fp,
        "first_loss": losses[0],
        "precompute_s": precompute_s,
        "steps": args.steps,
        "warmup": args.warmup,
        "profile": profile,
    }


def worker_ours_epoch(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    module, (_, answers) = ours_module("ours_bpo_epoch", args.data)
    start = stamp()
    dm = ours_datamodule(args.data, module.processor, answers)  # tokenization: TRL's happens in its collator
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: the reference log-probs are computed, not read
        t0 = time.perf_counter()
        setup_s = t0 - start[0]
        summary = precompute(module, dm, cache)
        precompute_s = time.perf_counter() - t0
    torch.manual_seed(0)
    stamps, _ = train_loop(module, dm, None, make_optimizer(module.policy))
    end = stamp()
    return {
        "epoch_s": end[0] - start[0],
        "epoch_cpu_s": end[1] - start[1],
        "loadavg": os.getloadavg()[0],
        "setup_s": setup_s,
        "precompute_s": precompute_s,
        "precomputed": summary["computed"],
        "steps": len(stamps),
        "peak_rss_mb": peak_rss_mb(),
    }


def _profile_ours(module: Any, dm: Any, optimizer: Any, steps: int = 3) -> dict[str, float]:
    """Where one training step of ours spends its time (wall seconds per step, averaged over ``steps`` steps run
    after the timed ones, with the warm optimizer)."""
    import torch

    from src.models import logprobs

    timers: dict[str, float] = {}

    def timed(key: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[key] = timers.get(key, 0.0) + time.perf_counter() - t

        return wrapper

    originals = {n: getattr(logprobs, n) for n in ("packed_rows", "padded_rows", "_hidden_and_head")}
    for n, fn in originals.items():
        setattr(logprobs, n, timed(n, fn))
    vision = module.policy.model.vision_tower
    vision_forward = vision.forward
    vision.forward = timed("vision_tower", vision_forward)
    params = [p for p in module.policy.parameters() if p.requires_grad]
    loader = iter(ordered_loader(dm, module.pad_token_id))
    try:
        for _ in range(steps):
            t = time.perf_counter()
            batch = next(loader)
            timers["data"] = timers.get("data", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            loss, _ = module.forward_batch(batch)
            timers["forward_batch"] = timers.get("forward_batch", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            loss.backward()
            timers["backward"] = timers.get("backward", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            timers["clip+optimizer"] = timers.get("clip+optimizer", 0.0) + time.perf_counter() - t
    finally:
        for n, fn in originals.items():
            setattr(logprobs, n, fn)
        vision.forward = vision_forward
    return {k: round(v / steps, 4) for k, v in timers.items()}
