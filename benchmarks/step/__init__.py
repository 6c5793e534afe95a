"""The pieces of benchmarks/bench_step.py: shared settings (common), the synthetic data set (data), our side (ours),
TRL's side and the parity check (trl_side), the worker subprocesses (runner) and the printed table (report)."""
