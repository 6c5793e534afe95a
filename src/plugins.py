"""The plug-ins: packages above src/evaluation that add to the floors below without those floors naming them.

Each registers what it adds when it is imported: picture drawers (`src.data.images.register_drawer`), benchmarks
with hooks of their own (subclasses of `src.evaluation.protocol.Benchmark`, found by name from a report.json) and
parts of reproduce's comparison (`src.evaluation.reproduction.register`). The entry points that read data, reports
or comparisons (train, generate, validate, eval, compare, reproduce) import this module, so that each of them reads
a plug-in's data, reports and comparisons alike; a new plug-in is one more import here.
"""

import src.world  # noqa: F401  (the grounded-safety world: its picture drawer, benchmark and comparison part)
