"""Training-step benchmark: TRL's DPOTrainer vs this project's PreferenceModule, on one LLaVA-shaped tiny model.

    python perf/bench_step.py                 # all 200 MMSafe-PO records, 2 quiet cores: ~25 min, + ~45 min sweep
    python perf/bench_step.py --quick         # 1 + 2 steps, 16 records, no extra rows, no sweep
    python perf/bench_step.py --workload synthetic --records 32   # uniform ~100-token answers, no data needed
    python perf/bench_step.py --skip-trl      # ours only (JSON has nulls for the TRL-based keys)
    python perf/bench_step.py --no-sweep --no-end-to-end --steps 10 --warmup 3 --repeat 2 --json-out r.json
    python perf/bench_step.py --only trl_dpo_epoch,ours_bpo_epoch --profile
    python perf/bench_step.py --widths llava_1_5_7b --text-layers 2   # real widths: ~25 min, ~20 GB RAM

Models (``--widths``):

- ``tiny`` (default): the LLaVA-shaped tiny model below (`common.TINY`), vocabulary resized to 4096.
- ``llava_1_5_7b``: llava-hf/llava-1.5-7b-hf's architecture at full width with random weights, built offline
  (``model=llava_1_5_7b_random``: Llama 4096 wide, MLP 11008, 32 heads, vocabulary 32064; CLIP ViT-L/14 at 336 px,
  576 image tokens), cut to ``--text-layers`` decoder layers (default 1) and 1 vision layer; the pictures are drawn
  at 336 px. The tokenizer is the project's offline BPE (`src.models.random_init` says what differs from the
  checkpoint), so the answers take more tokens than under the real one. Runs the parity check and the three step
  rows only (no extras, epochs, end to end or sweeps), 16 records, 1 warm-up + 2 timed steps, unless told otherwise.

Workloads (``--workload``):

- ``mmsafe`` (default): the 200 MMSafe-PO records of the shared data (``--mmsafe-path``, else
  ``$MLLM_BPO_SHARED_DATA/data/``, else ``../shared/data/`` next to the checkout, as the tests find them), read by
  the project's ``mmsafe_po`` reader, so prompts (history turns included), answers and their lengths are what
  training sees. Images: the stand-in ``data.missing_images=render`` draws (the real images are not shipped). The
  blind answer of the step and epoch rows is the chosen answer of the next record ((i + 1) % N): real text with
  the real answers' length distribution. Its token statistics are printed on stderr.
- ``synthetic``: generated records with uniform ~100-token answers and random block images.

The workload is written once as generic JSONL in the order of training's first-epoch shuffle; TRL (sequential
sampler) and ours (the data set in file order) read that file unshuffled, so both sides train on the same batches
(the ``check`` worker compares their first batches).

What is compared (same initial weights, same prompts, images and answer token ids, same AdamW, fp32, sdpa):

- ``trl_dpo``: `trl.DPOTrainer` on a vision preference data set (``images`` + standard-format
  ``prompt``/``chosen``/``rejected`` text, see `trl_examples`), with its fastest settings valid for image data
  (see `trl_config`): one padded row per (pair, answer), so the image and the prompt run twice; a frozen
  reference model scores every batch (TRL refuses ``precompute_ref_log_probs`` for vision data sets:
  `DPOTrainer.__init__` raises "`precompute_ref_log_probs=True` is not supported for vision datasets");
  its fused LM head (log-probs of completion positions only); no gradient checkpointing; ``padding_free`` is
  disabled in TRL 1.16 whatever it is set to.
- ``ours_dpo`` / ``ours_bpo``: `PreferenceModule(layout="packed", reference={"strategy": "precomputed"},
  model.gradient_checkpointing="selective")` on the batches of `PreferenceDataModule`'s data set whose pairs
  got ``reference_logps`` from `precompute_reference_logps`; a bare loop: ``forward_batch`` -> backward -> clip 1.0
  -> AdamW step -> zero_grad
  (no Lightning Trainer: its per-step overhead is a few ms and would only blur the comparison). DPO scores
  [chosen, rejected], BPO [chosen, rejected, blind]. Selective recompute reruns the element-wise ops of each
  decoder layer in the backward pass and keeps the matmul and attention outputs: the same gradients, less
  activation memory, a little more time.
- extra rows (not in the JSON): ours DPO / BPO without the selective recompute, ours DPO in the padded layout, and
  ours DPO with a frozen reference copy, to show where the memory and the speed come from.
- epochs: one pass over the data set (4 pairs a step). TRL: building its data set and trainer (incl. the
  reference copy) + ``train()``; ours BPO: building the data module (tokenization) + computing the reference
  log-probs into a fresh cache + the epoch. Building the model is outside both.
- ``ours_bpo_end_to_end``: the BPO epoch preceded by what real BPO training also does first: generating every
  blind answer with `fill_blind_answers` (fresh cache, text-only prompts, greedy; see `perf.step.endtoend`
  for ``max_new_tokens``: the workload's mean real answer length, so the generated total is realistic). It reports
  the generation time and tokens/s; ``bpo_end_to_end_speedup_vs_trl_dpo_epoch`` = TRL DPO epoch / this.
- sweeps: 4 jobs (beta 0.05, 0.1, 0.2, 0.5), one process each, one after another as a Hydra multirun with the
  basic launcher: TRL DPO epochs, and our BPO jobs sharing one cache folder, so job 1 generates the blind answers
  and computes the reference log-probs and jobs 2-4 read them (asserted). Each job's time runs from building its
  model to the end of its epoch; ``sweep4_speedup_vs_trl`` = TRL's total / ours.
- padding shares (epoch batches): ``trl_padding_share`` counted on the rows TRL's collator builds,
  ``padding_share_before`` on our packed rows as they were (one row per record, padded to the batch's longest
  record) and ``padding_share`` as ours trains (`padding_share`: under sdpa one padding-free row per batch).
- ``check``: before timing, TRL's collator and ours must give the same token ids, the same first batch, the same
  initial DPO loss (ln 2: policy == reference) and the same answer log-probs (fp32 round-off).

Every configuration runs in its own subprocess (``--worker NAME``, result passed back as one JSON line), so the
peak RSS (``ru_maxrss`` of the worker, measured the same way for every row) is per configuration. A step's time
is the wall time between the ends of consecutive optimizer steps after the warm-up, so it includes fetching and
collating the batch (TRL processes images in its collator, ours in the data set's ``__getitem__``).

The numbers are only as quiet as the machine: the table shows each worker's CPU time, the cores it actually got
(CPU / wall; ~2 when nothing else runs) and the 1-minute load average. ``--repeat N`` runs all configurations N
times round-robin and keeps each one's fastest run. The last line printed is one JSON object with the headline
numbers.

The pieces are in perf/step/: common (settings, timers), workload (the MMSafe-PO workload, token statistics),
data (the synthetic data, our data module and loader), padding, ours, endtoend (blind answers + epoch, sweep jobs),
trl_side (TRL and the parity check), runner (the worker subprocesses, the sweeps) and report (what is printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: perf/ is on the path, the repository root is not
    sys.path.insert(0, str(ROOT))

from perf.step.common import BETA, BLIND_BATCH_SIZE, WIDTHS, configure, setup_env  # noqa: E402
from perf.step.report import print_epochs, print_parity, print_setup, print_table, summary  # noqa: E402
from perf.step.runner import CONFIGURATIONS, configurations, run_all, run_worker, trl_available  # noqa: E402
from perf.step.workload import WORKLOADS, default_mmsafe_path, prepare  # noqa: E402
from src.files import write_atomic  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with the ``--quick`` defaults filled in; bad values exit 2 with a one-line error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2)")
    parser.add_argument("--widths", choices=WIDTHS, default="tiny", help="the model (default tiny; see above)")
    parser.add_argument("--text-layers", type=int, default=1, help="decoder layers at real widths (default 1)")
    parser.add_argument("--workload", choices=WORKLOADS, default="mmsafe", help="the data (default mmsafe)")
    parser.add_argument("--mmsafe-path", help="the MMSafe-PO JSON of --workload mmsafe (default: the shared data)")
    parser.add_argument("--records", type=int, default=None, help="records (default: mmsafe all 200, synthetic 32)")
    parser.add_argument(
        "--quick", action="store_true", help="1 warm-up + 2 timed steps, 16 records, no extras, no sweep"
    )
    parser.add_argument("--no-end-to-end", action="store_true", help="skip BPO end to end (blind answers generated)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the 4-job sweeps")
    parser.add_argument("--skip-trl", action="store_true", help="do not run TRL (also implied when not installed)")
    parser.add_argument("--no-extras", action="store_true", help="skip the padded / frozen_copy extra rows")
    parser.add_argument("--profile", action="store_true", help="add a per-part timing of our step")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration; the fastest is kept")
    parser.add_argument("--only", help="comma-separated configurations to run (others are null in the JSON)")
    parser.add_argument("--json-out", help="also write every worker's full result to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--beta", type=float, default=BETA, help=argparse.SUPPRESS)
    parser.add_argument("--blind-tokens", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--blind-batch-size", type=int, default=BLIND_BATCH_SIZE, help=argparse.SUPPRESS)
    parser.add_argument("--sweep-job", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    real = args.widths != "tiny"
    if args.text_layers < 1:
        parser.error("--text-layers must be >= 1")
    configure(args.widths, args.text_layers)
    args.steps = args.steps if args.steps is not None else (2 if args.quick or real else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick or real else 2)
    if args.worker:
        return args
    if real:  # a step of a 7B-wide model takes tens of seconds here: the check and the step rows only
        args.no_extras = args.no_end_to_end = args.no_sweep = args.no_epochs = True
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    unknown = set(args.only.split(",")) - set(CONFIGURATIONS) if args.only else set()
    if unknown:
        parser.error(f"--only: unknown configuration(s) {sorted(unknown)}")
    if args.records is not None and args.records < 2:
        parser.error("--records must be >= 2")
    args.records = args.records or (16 if args.quick or real else None if args.workload == "mmsafe" else 32)
    if args.workload == "mmsafe":
        path, looked = (Path(args.mmsafe_path), args.mmsafe_path) if args.mmsafe_path else default_mmsafe_path()
        if path is None or not path.is_file():
            print(
                f"bench_step.py: error: --workload mmsafe: no MMSafe-PO records at {looked} (set --mmsafe-path or "
                "MLLM_BPO_SHARED_DATA to the folder holding data/); --workload synthetic needs no data",
                file=sys.stderr,
            )
            raise SystemExit(2)
        args.mmsafe_path = path
    return args


def trl_to_run(args: argparse.Namespace) -> str | None:
    """TRL's version, or None (said on stdout) when it is skipped or not installed."""
    trl_version = None if args.skip_trl else trl_available()
    if not args.skip_trl and trl_version is None:
        print("TRL is not installed (pip install -e '.[bench]'): running ours only; TRL-based keys are null.")
    elif args.skip_trl:
        print("--skip-trl: running ours only; TRL-based keys are null.")
    return trl_version


def save_partial(args: argparse.Namespace, data: dict[str, Any]) -> Callable[[dict[str, Any]], None] | None:
    """With ``--json-out``: after every worker, every run so far goes to that file (``"complete": false``), so a
    run stopped part-way (Ctrl-C, a time limit) keeps what it measured; the full result replaces it at the end."""
    if not args.json_out:
        return None
    return lambda runs: write_atomic(
        Path(args.json_out), json.dumps({"complete": False, "data": data, "runs": runs}, indent=1)
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:  # one configuration, in the subprocess the driver below started
        run_worker(args)
        return
    setup_env()
    trl_version = trl_to_run(args)
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        data = prepare(args, Path(tmp))  # the workload file, its token statistics (stderr) and our padding shares
        args.blind_tokens = data["blind_max_new_tokens"]
        # the parity check, then ours and TRL's configurations alternating (a burst of load hits both alike)
        results = run_all(configurations(args, trl_version is not None), args, data["path"], save_partial(args, data))
    results["workload"] = data
    print_setup(results, data, args, trl_version)
    print_parity(results)
    print_table(results)
    print_epochs(results, args)
    if args.json_out:
        write_atomic(Path(args.json_out), json.dumps({"complete": True, "data": data, "results": results}, indent=1))
    print(json.dumps(summary(results)))


if __name__ == "__main__":
    main()
