"""LightningModule: a policy MLLM trained by a preference objective against a reference model, or by SFT."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from lightning import LightningModule
from torchmetrics import MeanMetric, SumMetric
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from src.errors import SettingError
from src.models.device import torch_dtype
from src.models.factory import build_model
from src.models.logprobs import answer_logprobs
from src.models.lora import adapters_disabled, is_peft
from src.models.objectives import LIKELIHOOD, OBJECTIVES, resolve_answers
from src.models.reference import STRATEGIES

log = logging.getLogger(__name__)

SCHEDULES = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}


# answers that only records with an image have: their metrics are means over those records
IMAGE_ONLY_ANSWERS = ("chosen_corrupted",)


def _image_keys(answer: str) -> tuple[str, ...]:
    return (f"rewards/{answer}", f"rewards/{answer}_margins", f"rewards/{answer}_accuracies", f"logps/{answer}")


def image_only(key: str) -> str | None:
    """The count (rewards/<answer>_count) of the records with an image whose mean metric ``key`` is, for an
    answer of `IMAGE_ONLY_ANSWERS`; None for a metric over the whole batch."""
    return next((f"rewards/{a}_count" for a in IMAGE_ONLY_ANSWERS if key in _image_keys(a)), None)


def preference_metrics(
    policy_logps: torch.Tensor,
    rewards: torch.Tensor,
    answers: Sequence[str],
    has_image: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Batch means under the names dashboards use, from (B, K) log-probs and rewards of ``answers``.

    rewards/<answer> and logps/<answer> for every answer; the chosen answer's margin over each other answer and
    how often it wins: rewards/margins and rewards/accuracies over rejected, rewards/<answer>_margins and
    rewards/<answer>_accuracies over any other (blind, chosen_corrupted).

    A text-only record has no corrupted image: its chosen_corrupted column is the chosen answer again and would
    count as a tie. The chosen_corrupted metrics are means over the records with an image (``has_image`` (B,);
    None: every record has one), counted in rewards/chosen_corrupted_count, and left out of a batch with none
    (`image_only` names them; an epoch's mean weighs each batch by its count).
    """
    policy_logps = policy_logps.detach()
    rows = {answer: slice(None) for answer in answers}
    count: dict[str, torch.Tensor] = {}
    for answer in IMAGE_ONLY_ANSWERS:
        if answer in answers:
            mask = torch.ones(len(rewards), dtype=torch.bool) if has_image is None else has_image.bool()
            rows[answer] = mask.to(rewards.device)
            count[f"rewards/{answer}_count"] = mask.sum().float()
    out = {f"rewards/{answer}": rewards[rows[answer], k].mean() for k, answer in enumerate(answers)}
    if "chosen" in answers:
        chosen = rewards[:, list(answers).index("chosen")]
        for k, answer in enumerate(answers):
            if answer != "chosen":
                prefix = "" if answer == "rejected" else f"{answer}_"
                wins = chosen[rows[answer]] - rewards[rows[answer], k]
                out[f"rewards/{prefix}margins"] = wins.mean()
                out[f"rewards/{prefix}accuracies"] = (wins > 0).float().mean()
    out |= {f"logps/{answer}": policy_logps[rows[answer], k].mean() for k, answer in enumerate(answers)}
    # a batch with no record with an image has no such means (not NaN, not 0): only its count of 0
    empty = {
        key
        for answer in IMAGE_ONLY_ANSWERS
        if count.get(f"rewards/{answer}_count", 1) == 0
        for key in _image_keys(answer)
    }
    return {key: value for key, value in out.items() if key not in empty} | count


def likelihood_metrics(
    policy_logps: torch.Tensor, token_mean_logps: torch.Tensor, answers: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Batch means for a reference-free objective, per answer: nll/* (token-mean NLL), logps/* (summed)."""
    policy_logps = policy_logps.detach()
    out = {}
    for k, answer in enumerate(answers):
        out[f"nll/{answer}"] = -token_mean_logps[:, k].mean()
        out[f"logps/{answer}"] = policy_logps[:, k].mean()
    return out


def metric_names(answers: Sequence[str], likelihood: bool = False, terms: Sequence[str] = ()) -> list[str]:
    """Names the module logs for these answers: the loss, likelihood (nll/*) or preference (rewards/*) metrics,
    and the value of each of a composite's ``terms`` (terms/*)."""
    fake = torch.zeros(1, len(answers))
    metrics = likelihood_metrics(fake, fake, answers) if likelihood else preference_metrics(fake, fake, answers)
    return ["loss", *metrics, *(f"terms/{name}" for name in terms)]


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def low_precision_matmuls(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the weights of matrix products (linear, convolution) in ``dtype``, the rest as they are.

    Under autocast to ``dtype`` the policy casts exactly these weights to ``dtype`` and keeps embeddings,
    norms and the residual stream in float32, so a copy stored this way computes the same numbers while
    holding most of its memory (the matrices) at half the size. Casting the whole copy would also put its
    residual stream and norms in ``dtype``, and its log-probs would differ from the policy's at step 0.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and id(module.weight) not in embeddings:
            module.to(dtype)  # a head tied to the input embeddings stays as it is, like the embeddings


class PreferenceModule(LightningModule):
    """Holds the policy, its processor and the reference.

    ``model``: arguments of `build_model`; ``objective``: ``{name, answers, beta, ...}`` (``answers``
    checked by `resolve_answers`, the rest goes to the objective function); ``optim``: ``{lr,
    weight_decay, betas, warmup_steps, schedule}``; ``layout``: ``packed`` or ``padded`` (see
    `src.models.logprobs`); ``reference``: ``{strategy, dtype}`` where the strategy is ``precomputed``
    (batches carry reference log-probs computed before training: no reference model in memory),
    ``frozen_copy`` (a frozen copy of the initial weights scores every batch), with LoRA,
    ``adapters_disabled`` (the policy with its adapters off scores every batch; chosen automatically
    instead of a frozen copy), or ``none``: no reference, which a reference-free objective
    (`Objective.reference_free`: sft, simpo) always gets. Likelihood objectives (`LIKELIHOOD`: sft) log ``nll/*`` and
    ``logps/*`` per answer; every other objective, simpo included, logs ``rewards/*`` and ``logps/*``, and a
    composite also ``terms/<name>``.
    """

    def __init__(
        self,
        model: dict[str, Any],
        objective: dict[str, Any],
        optim: dict[str, Any],
        layout: str = "packed",
        reference: dict[str, Any] | None = None,
        nonfinite: str = "raise",
    ):
        super().__init__()
        self.save_hyperparameters()
        objective = dict(objective)
        name = objective.pop("name")
        objective.pop("corruption", None)  # the conditional term's image: what the data needs (`data_needs`)
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; available: {sorted(OBJECTIVES)}")
        self.objective_name = name
        declared = OBJECTIVES[name]
        self.objective_fn = declared.fn
        # what the objective takes besides the policy's log-probs, as it declares it (read once, not every step)
        self.reference_free = declared.reference_free
        self.objective_inputs = declared.inputs
        self.likelihood = name in LIKELIHOOD
        self.answers, self.term_names = self._check_objective(name, objective)
        self.objective_kwargs = objective
        # checkpoints of runs from before the prompt format had a config node of its own hold model.system_prompt
        self.policy, self.processor = build_model(**{k: v for k, v in model.items() if k != "system_prompt"})
        tok = getattr(self.processor, "tokenizer", self.processor)
        self.pad_token_id = tok.pad_token_id
        self.layout = layout
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        # a non-finite loss or gradient stops training naming the records, or skips the step (counted)
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.tokens_trained = 0  # prompt + answer tokens of this device's training batches (`train/tokens`)
        self._batch_ids: list[str] = []
        reference = dict(reference or {"strategy": "frozen_copy"})
        self.reference_strategy = reference.get("strategy", "frozen_copy")
        if self.reference_strategy not in STRATEGIES:
            raise ValueError(f"reference.strategy must be one of {STRATEGIES}, got {self.reference_strategy!r}")
        if self.reference_free:
            if self.reference_strategy != "none":
                log.info("%s has no reference model: reference.strategy=%s ignored", name, self.reference_strategy)
            self.reference_strategy = "none"
        elif self.reference_strategy == "none":
            raise ValueError(
                f"objective {name} needs a reference model; reference.strategy=none is for objectives without one"
            )
        self.reference: torch.nn.Module | None = None
        if is_peft(self.policy) and self.reference_strategy == "frozen_copy":
            log.info("LoRA: the reference is the policy with adapters disabled (no second copy in memory)")
            self.reference_strategy = "adapters_disabled"
        if self.reference_strategy == "adapters_disabled" and not is_peft(self.policy):
            raise ValueError("reference.strategy=adapters_disabled needs model.lora.enabled=true")
        self.reference_dtype = torch_dtype(reference["dtype"]) if reference.get("dtype") else None
        if self.reference_strategy == "frozen_copy":
            self.reference = copy.deepcopy(self.policy)
            if self.reference_dtype is not None:
                low_precision_matmuls(self.reference, self.reference_dtype)
            self.reference.requires_grad_(False)
            self.reference.eval()
        # ModuleDict keys cannot hold "/", so val metric names are stored with "/" -> "__"
        # counts (rewards/<answer>_count) add up over an epoch; every other metric is a mean
        self.val_metrics = torch.nn.ModuleDict(
            {
                k.replace("/", "__"): SumMetric() if k.endswith("_count") else MeanMetric()
                for k in metric_names(self.answers, self.likelihood, self.term_names)
            }
        )

    def _check_objective(self, name: str, objective: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The answers the objective scores and the terms it reports, from one call on a one-row batch: a wrong
        setting (objective.answers, an unknown key, a value out of range) stops the run here, before any data or
        reference work, rather than at the first training step."""
        try:
            answers = resolve_answers(name, objective.pop("answers", None), objective.get("terms"))
        except ValueError as e:
            raise SettingError(str(e)) from e
        try:
            k = len(answers)
            probe = {"num_tokens": torch.ones(1, k), "has_image": torch.ones(1, dtype=torch.bool)}
            inputs = {key: value for key, value in probe.items() if key in self.objective_inputs}
            reference = () if self.reference_free else (torch.zeros(1, k),)
            out = self.objective_fn(torch.zeros(1, k), *reference, **inputs, **objective)
        except (TypeError, ValueError) as e:
            raise SettingError(f"objective {name}: {e}") from e
        return answers, tuple(out.terms)

    # The reference never trains: keep it in eval mode whatever Lightning does to the module.
    def train(self, mode: bool = True) -> PreferenceModule:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def forward_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and metrics for one batch; policy and reference score the same padded rows."""
        policy_logps = answer_logprobs(self.policy, batch, self.pad_token_id, self.layout)
        inputs: dict[str, torch.Tensor] = {}
        if "num_tokens" in self.objective_inputs:
            inputs["num_tokens"] = batch["answer_lengths"].T.to(policy_logps.device)  # (K, B) -> (B, K)
        if "has_image" in self.objective_inputs:
            inputs["has_image"] = batch["has_image"].to(policy_logps.device)  # (B,)
        if self.reference_strategy == "none":
            out = self.objective_fn(policy_logps, **inputs, **self.objective_kwargs)
        else:
            reference_logps = self.reference_logps(batch, policy_logps.device)
            out = self.objective_fn(policy_logps, reference_logps, **inputs, **self.objective_kwargs)
        if self.likelihood:
            metrics = likelihood_metrics(policy_logps, out.rewards, self.answers)
        else:
            metrics = preference_metrics(policy_logps, out.rewards, self.answers, batch.get("has_image"))
        metrics |= {f"terms/{name}": value.mean() for name, value in out.terms.items()}
        loss = out.loss.mean()
        return loss, {"loss": loss.detach()} | metrics

    def reference_logps(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        """Reference log-probs (B, K) of the batch: precomputed, or scored now without gradients."""
        if "reference_logps" in batch:
            return batch["reference_logps"].to(device)
        with torch.no_grad():
            if self.reference is not None:
                with self._reference_autocast(device):
                    return answer_logprobs(self.reference, batch, self.pad_token_id, self.layout)
            if self.reference_strategy == "adapters_disabled":
                with adapters_disabled(self.policy):
                    return answer_logprobs(self.policy, batch, self.pad_token_id, self.layout)
        raise RuntimeError(
            f"records {batch['ids']} have no precomputed reference log-probs and there is no reference "
            "model (reference.strategy=precomputed needs precompute_reference_logps before training)"
        )

    def _reference_autocast(self, device: torch.device) -> Any:
        """A low-precision copy computes as the policy does under the run's autocast; without autocast (a
        full-precision run) it still needs one, and then differs from the policy: said once."""
        name = str(self.reference_dtype).removeprefix("torch.")
        if self.reference_dtype is None or torch.is_autocast_enabled(device.type):
            if self.reference_dtype not in (None, torch.get_autocast_dtype(device.type)):
                _warn_once(f"reference.dtype={name} differs from the run's autocast dtype: rewards start off zero")
            return contextlib.nullcontext()
        _warn_once(
            f"reference.dtype={name} in a full-precision run: the reference computes in {name} autocast while "
            "the policy does not, so rewards start off zero (5e-3 nats on the tiny model); use a matching "
            "trainer.precision (bf16-mixed) or reference.dtype=null"
        )
        return torch.autocast(device.type, dtype=self.reference_dtype)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        loss, metrics = self.forward_batch(batch)
        size = len(batch["ids"])
        self._batch_ids = list(batch["ids"])
        # the prompt once per record and each answer, padding excluded: the tokens the packed layout computes
        self.tokens_trained += int(batch["prompt_lengths"].sum()) + int(batch["answer_lengths"].sum())
        if self._trainer is not None:  # called outside a Trainer (a bare loop): counted, nothing to log to
            self.log("train/tokens", float(self.tokens_trained), on_step=True, on_epoch=False, batch_size=size)
        if not torch.isfinite(loss):
            if self.nonfinite == "raise":
                raise FloatingPointError(f"non-finite loss {loss.item()} on records {batch['ids']}")
            return self._skip(f"non-finite loss {loss.item()}")
        for key, value in metrics.items():
            self.log(
                f"train/{key}",
                value,
                on_step=True,
                on_epoch=False,
                batch_size=size,
                prog_bar=key in ("loss", "rewards/accuracies", "rewards/margins"),
            )
        return loss

    def on_after_backward(self) -> None:
        bad = [n for n, p in self.policy.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if not bad:
            return
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite gradient in {bad[0]} (and {len(bad) - 1} more) on records {self._batch_ids}"
            )
        for p in self.policy.parameters():
            p.grad = None  # no update at all: AdamW skips parameters without gradients
        self._skip(f"non-finite gradient in {bad[0]}")

    def _skip(self, why: str) -> None:
        """Skip this optimizer step (nonfinite=skip), counted and logged with the records involved."""
        self.skipped_steps += 1
        log.warning("skipping step %d: %s on records %s", self.global_step, why, self._batch_ids)
        if self._trainer is not None:
            self.log("train/skipped_nonfinite_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        return None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        _, metrics = self.forward_batch(batch)
        size = len(batch["ids"])
        for key, value in metrics.items():
            metric = self.val_metrics[key.replace("/", "__")]
            if key.endswith("_count"):
                metric.update(value)
            elif image_only(key):
                # a mean over the records with an image, weighted by their count; logged at the epoch's end
                metric.update(value, weight=metrics[image_only(key)])
                continue
            else:
                metric.update(value, weight=size)
            # logging the torchmetrics object lets Lightning reduce it across batches and devices
            self.log(
                f"val/{key}",
                metric,
                on_step=False,
                on_epoch=True,
                batch_size=size,
                prog_bar=key == "rewards/accuracies",
            )

    def on_validation_epoch_end(self) -> None:
        """The means over records with an image (`image_only`), logged when the epoch had any (summed over every
        device: each device computes the same sums, so all log alike), else left out rather than logged as NaN."""
        for name, metric in self.val_metrics.items():
            count_key = image_only(name.replace("__", "/"))
            if count_key is None:
                continue
            with warnings.catch_warnings():  # a device without such records has an empty share: not worth a warning
                warnings.filterwarnings("ignore", message=".*compute.*before.*update", category=UserWarning)
                # on every device: compute gathers the other devices' sums (the count's is reused by Lightning)
                count, value = self.val_metrics[count_key.replace("/", "__")].compute(), metric.compute()
            metric.reset()
            if count > 0:
                self.log(f"val/{name.replace('__', '/')}", value, on_step=False, on_epoch=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams.optim
        params = [p for p in self.policy.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]  # biases and norms are not decayed
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.get("weight_decay", 0.0)}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp["lr"],
            betas=tuple(hp.get("betas", (0.9, 0.999))),
        )
        schedule = hp.get("schedule", "cosine")
        if schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = SCHEDULES[schedule](optimizer, num_warmup_steps=hp.get("warmup_steps", 0), num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # Checkpoints hold the policy only: the reference is the initial model, rebuilt on load.
    def _resume_data_order(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint taken mid-epoch: the data module skips the batches that epoch already trained on."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        done = progress.get("current", {}).get("processed", 0)  # steps run, also when saved mid-batch-end
        if datamodule is not None and hasattr(datamodule, "resume_within_epoch") and done:
            datamodule.resume_within_epoch(done, trainer.world_size)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("reference.")]:
            del state[key]
        checkpoint["tokens_trained"] = self.tokens_trained

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resume_data_order(checkpoint)
        self.tokens_trained = int(checkpoint.get("tokens_trained", 0))
        if self.reference is None:
            return
        state = checkpoint["state_dict"]
        for key, value in self.reference.state_dict().items():
            state.setdefault(f"reference.{key}", value)
