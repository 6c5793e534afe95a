"""The training callback that shows what the policy actually says, judged, in the run's logs after each validation.

It judges, so it lives with the judges; the callbacks that only show the run (progress bar, parameter summary) are
in ``src.models.callbacks``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from src.evaluation.judges import JudgeInput
from src.models.generation import AnswerGenerator, GenerationSettings

log = logging.getLogger(__name__)


class GenerationSamples(Callback):
    """After each validation, answer a few held-out prompts (with their images), judge the answers, and
    log a table (prompt, image, answer, verdict, reason) to W&B and ``<run>/samples/epoch_NNN.jsonl``.
    """

    def __init__(
        self, num_samples: int = 4, max_new_tokens: int = 48, judge: str | None = None, every_n_epochs: int = 1
    ):
        self.num_samples = num_samples
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=num_samples)
        self.judge_config = judge
        self.every_n_epochs = every_n_epochs
        self._judge = None

    def judge(self) -> Any:
        if self._judge is None and self.judge_config:
            self._judge = hydra.utils.instantiate(OmegaConf.load(self.judge_config))
        return self._judge

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        dm = getattr(trainer, "datamodule", None)
        if (
            trainer.sanity_checking
            or not trainer.is_global_zero
            or dm is None
            or dm.val_set is None
            or trainer.current_epoch % self.every_n_epochs
        ):
            return
        records = [dm.val_set.records[p.id] for p in dm.val_set.pairs[: self.num_samples]]
        out = Path(trainer.default_root_dir) / "samples" / f"epoch_{trainer.current_epoch:03d}.jsonl"
        out.unlink(missing_ok=True)  # a fresh file per validation: these are the policy's current answers
        generator = AnswerGenerator(
            pl_module.policy,
            pl_module.processor,
            self.settings,
            dm.resolver,
            prompt_format=dm.prompt_format,
        )
        answers = generator.run(records, out, with_image=True, desc="val samples")
        judge = self.judge()
        texts = [answers[r.id]["answer"] for r in records]
        inputs = [
            JudgeInput(r.turns[-1].text, a, None, str(r.meta.get("category") or ""))
            for r, a in zip(records, texts, strict=True)
        ]
        verdicts = judge.judge(inputs) if judge else [None] * len(records)
        rows = []
        for record, answer, verdict in zip(records, texts, verdicts, strict=True):
            rows.append(
                {
                    "id": record.id,
                    "prompt": record.turns[-1].text,
                    "answer": answer,
                    "verdict": None
                    if verdict is None
                    else {True: "safe", False: "unsafe", None: "unparsed"}[verdict.safe],
                    "reason": None if verdict is None else verdict.reason,
                }
            )
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self._log_wandb(trainer, records, rows, dm)

    def _log_wandb(self, trainer: Any, records: list[Any], rows: list[dict[str, Any]], dm: Any) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                columns = ["id", "prompt", "image", "answer", "verdict", "reason"]
                data = []
                for record, row in zip(records, rows, strict=True):
                    image = dm.resolver(record)
                    data.append(
                        [
                            row["id"],
                            row["prompt"],
                            wandb.Image(image) if image is not None else None,
                            row["answer"],
                            row["verdict"],
                            row["reason"],
                        ]
                    )
                logger.log_table(key="val/samples", columns=columns, data=data, step=trainer.global_step)
