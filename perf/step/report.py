"""What `make bench` prints: the setup lines, the parity check, the step table, the epochs and the JSON summary."""

from __future__ import annotations

import argparse
from typing import Any

from perf.step.common import BATCH_SIZE, EXTRAS, HEADLINE, LABELS, LR, MAX_GRAD_NORM, VOCAB, describe_model


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _get(results: dict[str, Any], name: str, key: str) -> float | None:
    r = results.get(name)
    return None if r is None else r.get(key)


def print_setup(
    results: dict[str, Any], data: dict[str, Any], args: argparse.Namespace, trl_version: str | None
) -> None:
    """Versions, the model, the batch and the step counts."""
    import torch
    import transformers

    print()
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"trl {trl_version or 'not run'}"
    )
    check = results.get("check")
    vocab = check["model_vocab"] if check else VOCAB
    print(f"model: {describe_model()}, vocab {vocab} (tokenizer learns {data['tokenizer_vocab']}), sdpa, fp32")
    print(
        f"batch {BATCH_SIZE} pairs, mean answer {data['mean_answer_tokens']:.1f} tokens, AdamW lr {LR} constant, "
        f"clip {MAX_GRAD_NORM}; {args.warmup} warm-up + {args.steps} timed steps per row"
    )


def print_parity(results: dict[str, Any]) -> None:
    """Same initial weights in every worker and, when TRL ran, the ``check`` worker's token / loss / log-prob
    comparison of TRL and ours."""
    fps = {r["fingerprint"] for r in results.values() if r and "fingerprint" in r}
    check = results.get("check")
    if fps:
        print(f"same initial weights in every worker: {len(fps) == 1} ({', '.join(sorted(fps))})")
    if check:
        print(
            f"check: same token ids TRL vs ours: {check['same_tokens']}; same first batch (file order on both "
            f"sides): {check['same_batches']}; prompt {check['prompt_tokens']} tokens "
            f"({check['image_tokens']} image); initial DPO loss TRL {check['trl_loss']:.6f}, ours "
            f"{check['ours_loss']:.6f} (ln 2 = {check['ln2']:.6f}); max |logp TRL - ours| "
            f"{check['max_abs_logp_diff_trl_vs_ours']:.2e} (logps ~{check['ours_logps'][0][0]:.1f}); "
            f"packed vs padded {check['max_abs_logp_diff_packed_vs_padded']:.2e}"
        )


def print_table(results: dict[str, Any]) -> None:
    """One row per step configuration that ran: time per step, speed-up and memory vs TRL, CPU use, load."""
    trl_step = _get(results, "trl_dpo", "s_per_step")
    trl_rss = _get(results, "trl_dpo", "peak_rss_mb")
    print()
    header = (
        f"{'configuration':<46} {'s/step':>8} {'vs TRL':>8} {'median':>8} {'CPU s':>7} {'cores':>6} "
        f"{'peak RSS MB':>12} {'RSS vs TRL':>11} {'load':>5} {'ref pre s':>10}"
    )
    print(header)
    print("-" * len(header))
    for name in [*HEADLINE, *EXTRAS]:
        if name not in results:
            continue
        r = results[name]
        if r is None:
            print(f"{LABELS[name]:<46} {'failed':>8}")
            continue
        speed = _ratio(trl_step, r["s_per_step"]) if name != "trl_dpo" else None
        rss = _ratio(r["peak_rss_mb"], trl_rss) if name != "trl_dpo" else None
        print(
            f"{LABELS[name]:<46} {r['s_per_step']:>8.3f} {f'{speed:.2f}x' if speed else '':>8} "
            f"{r['median_s_per_step']:>8.3f} {r['cpu_s_per_step']:>7.2f} "
            f"{r['cpu_s_per_step'] / r['s_per_step']:>6.2f} {r['peak_rss_mb']:>12.0f} "
            f"{f'{rss:.2f}x' if rss else '':>11} {r['loadavg']:>5.1f} "
            f"{f'{pre:.1f}' if (pre := r.get('precompute_s')) is not None else '':>10}"
        )


def print_epochs(results: dict[str, Any], args: argparse.Namespace) -> None:
    """The one-epoch rows, BPO end to end, the sweeps, the padding shares, every run's time under ``--repeat`` and
    the ``--profile`` split of our step."""
    trl_epoch = _get(results, "trl_dpo_epoch", "epoch_s")
    ours_epoch = _get(results, "ours_bpo_epoch", "epoch_s")
    print()
    rows = (
        ("trl_dpo_epoch", "TRL DPO epoch"),
        ("ours_bpo_epoch", "ours BPO epoch incl. ref precompute"),
        ("ours_bpo_end_to_end", "ours BPO end to end (+ blind answers)"),
    )
    for name, label in rows:
        r = results.get(name)
        if name in results and r:
            extra = f", ref precompute {r['precompute_s']:.1f} s" if "precompute_s" in r else ""
            if r.get("generation_s") is not None:
                extra += (
                    f", blind answers {r['generation_s']:.1f} s ({r['generated']} x {r['max_new_tokens']} tokens "
                    f"max, {r['generated_tokens']} tokens, {r['blind_tokens_per_s']:.0f} tokens/s, "
                    f"batch {r['blind_batch_size']})"
                )
            print(
                f"{label:<46} {r['epoch_s']:>8.2f} s  (CPU {r['epoch_cpu_s']:.1f} s = "
                f"{r['epoch_cpu_s'] / r['epoch_s']:.2f} cores; setup {r.get('setup_s', 0):.1f} s"
                f"{extra}; {r['steps']} steps; load {r['loadavg']:.1f}; peak RSS {r['peak_rss_mb']:.0f} MB)"
            )
    if trl_epoch and ours_epoch:
        print(f"{'epoch speed-up (TRL DPO / ours BPO)':<46} {trl_epoch / ours_epoch:>8.2f}x")
    if trl_epoch and (e2e := _get(results, "ours_bpo_end_to_end", "epoch_s")):
        print(f"{'end-to-end speed-up (TRL DPO / ours BPO e2e)':<46} {trl_epoch / e2e:>8.2f}x")
    for name, label in (("trl_dpo_sweep", "TRL DPO 4-job sweep"), ("ours_bpo_sweep", "ours BPO 4-job sweep")):
        if name in results and (r := results[name]):
            jobs = ", ".join(f"beta {j['beta']}: {j['job_s']:.1f} s" for j in r["jobs"])
            print(f"{label:<46} {r['sweep_s']:>8.2f} s  ({jobs}; peak RSS {r['peak_rss_mb']:.0f} MB)")
    if (trl_sweep := _get(results, "trl_dpo_sweep", "sweep_s")) and (
        ours := _get(results, "ours_bpo_sweep", "sweep_s")
    ):
        print(f"{'sweep speed-up (TRL DPO / ours BPO)':<46} {trl_sweep / ours:>8.2f}x")
    w = results.get("workload")
    if w:
        trl_pad = _get(results, "trl_dpo_epoch", "padding_share")
        print(
            f"padding share of the epoch's batches: TRL DPO {_pct(trl_pad)}; "
            f"ours BPO packed {_pct(w['padding_share'])} (one row per record: {_pct(w['padding_share_before'])}); "
            f"ours DPO packed {_pct(w['padding_share_dpo'])}"
        )
    if args.repeat > 1:
        runs = {n: r["all_runs_s"] for n, r in results.items() if r and "all_runs_s" in r}
        print(f"\n{args.repeat} runs per configuration, fastest kept; all runs (s): {runs}")
    if args.profile and results.get("ours_dpo") and results["ours_dpo"].get("profile"):
        print(f"\nprofile of ours DPO step (s): {results['ours_dpo']['profile']}")
        if results.get("ours_bpo"):
            print(f"profile of ours BPO step (s): {results['ours_bpo']['profile']}")


def _pct(share: float | None) -> str:
    return "not run" if share is None else f"{100 * share:.1f}%"


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers, printed as the last line (one JSON object); null where a configuration did not run."""
    trl_step = _get(results, "trl_dpo", "s_per_step")
    ours_dpo = _get(results, "ours_dpo", "s_per_step")
    ours_bpo = _get(results, "ours_bpo", "s_per_step")
    trl_epoch = _get(results, "trl_dpo_epoch", "epoch_s")
    ours_epoch = _get(results, "ours_bpo_epoch", "epoch_s")
    trl_rss = _get(results, "trl_dpo", "peak_rss_mb")
    ours_bpo_rss = _get(results, "ours_bpo", "peak_rss_mb")
    workload = results.get("workload") or {}
    headline = {
        "workload": workload.get("workload"),
        "widths": workload.get("widths"),
        "text_layers": workload.get("text_layers"),
        "trl_dpo_s_per_step": trl_step,
        "ours_dpo_s_per_step": ours_dpo,
        "ours_bpo_s_per_step": ours_bpo,
        "dpo_speedup_vs_trl": _ratio(trl_step, ours_dpo),
        "bpo_speedup_vs_trl_dpo": _ratio(trl_step, ours_bpo),
        "epoch_speedup_bpo_vs_trl_dpo": _ratio(trl_epoch, ours_epoch),
        "bpo_end_to_end_speedup_vs_trl_dpo_epoch": _ratio(trl_epoch, _get(results, "ours_bpo_end_to_end", "epoch_s")),
        "sweep4_speedup_vs_trl": _ratio(
            _get(results, "trl_dpo_sweep", "sweep_s"), _get(results, "ours_bpo_sweep", "sweep_s")
        ),
        "trl_peak_rss_mb": trl_rss,
        "ours_dpo_peak_rss_mb": _get(results, "ours_dpo", "peak_rss_mb"),
        "ours_bpo_peak_rss_mb": ours_bpo_rss,
        "bpo_rss_vs_trl": _ratio(ours_bpo_rss, trl_rss),
        "padding_share": workload.get("padding_share"),
        "padding_share_before": workload.get("padding_share_before"),
        "trl_padding_share": _get(results, "trl_dpo_epoch", "padding_share"),
        "blind_tokens_per_s": _get(results, "ours_bpo_end_to_end", "blind_tokens_per_s"),
    }
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in headline.items()}
