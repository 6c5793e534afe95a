"""The pieces of perf/bench_step.py: shared settings (common), the workloads (workload: MMSafe-PO; data:
synthetic, our data module and loader), padding shares (padding), our side (ours; endtoend: blind answers + epoch,
sweep jobs), TRL's side and the parity check (trl_side), the worker subprocesses (runner) and the printed table
(report)."""
