"""Training callbacks that show the run: a progress bar with a few metrics under short names and a parameter summary
without made-up FLOPs. (The validation samples, which are judged, are ``src.evaluation.validation_samples``.)"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback, RichProgressBar


class ShortMetricsBar(RichProgressBar):
    """The rich progress bar showing ``names`` (logged name -> short name shown) only.

    Logged names such as ``train/rewards/accuracies`` are cut at the bar's width; the logged names (W&B,
    metrics.csv) stay as they are. A metric shows only when the module logs it with ``prog_bar=True``.
    """

    def __init__(self, names: dict[str, str], **kwargs: Any):
        super().__init__(**kwargs)
        self.names = dict(names)

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        # leaves out the W&B run id (v_num) too: it is in the run folder's wandb/ name
        metrics = super().get_metrics(trainer, pl_module)
        return {short: metrics[name] for name, short in self.names.items() if name in metrics}


class ParameterSummary(Callback):
    """At fit start (rank 0), the module's parameters per sub-module to ``max_depth``: type, parameters, trainable
    or frozen, train / eval mode, then the totals and the size in MB.

    Lightning's own summary adds a FLOPs column that reads 0 for a module without an example input (this one has
    none: its batches are dicts of variable shape), a figure that looks measured and is not: it is left out here.
    """

    def __init__(self, max_depth: int = 1):
        self.max_depth = max_depth

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        from lightning.pytorch.utilities.model_summary import summarize
        from rich import get_console
        from rich.table import Table

        if not trainer.is_global_zero or self.max_depth < 1:
            return
        summary = summarize(pl_module, max_depth=self.max_depth)
        columns = [(name, values) for name, values in summary._get_summary_data() if name != "FLOPs"]
        table = Table(header_style="bold magenta")
        for name, _ in columns:
            table.add_column(name or " ", justify="right" if name == "Params" else "left")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        trainable, total = summary.trainable_parameters, summary.total_parameters
        frozen = total - trainable
        size = summary.model_size
        console.print(f"params: {trainable:,} trainable, {frozen:,} frozen, {total:,} total, {size:.1f} MB")
