"""TRL's side: `DPOTrainer` on the same records, and the parity check of its tokens, loss and log-probs vs ours."""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from perf.step.common import (
    BATCH_SIZE,
    BETA,
    BETAS,
    LR,
    MAX_GRAD_NORM,
    build_policy,
    make_optimizer,
    model_fingerprint,
    peak_rss_mb,
    stamp,
    step_stats,
)
from perf.step.data import ordered_loader, ours_datamodule
from perf.step.ours import ours_module, precompute
from perf.step.padding import CountingCollator


def trl_examples(data: str, processor: Any) -> dict[str, list[Any]]:
    """The same records in TRL's vision preference format: ``images`` (list of one image) + standard
    (non-conversational) ``prompt``/``chosen``/``rejected`` text.

    The text is rendered by the model's chat template exactly as the project renders it (BOS + prompt with the
    ``<image>`` marker; each answer is what the template appends after ``ASSISTANT:``, closed by EOS), so TRL's
    collator, which tokenizes with ``add_special_tokens=False``, yields the same token ids as ours (checked by
    the ``check`` worker). TRL's conversational format would render the same text plus one trailing space token
    after EOS and no BOS.
    """
    from src.data.encoding import PromptEncoder
    from src.data.readers import read_records

    encoder = PromptEncoder(processor)
    tok = processor.tokenizer
    out: dict[str, list[Any]] = {"images": [], "prompt": [], "chosen": [], "rejected": []}
    for record in read_records(data, "jsonl"):
        prompt = encoder.prompt_text(record)
        out["images"].append([str(Path(data).parent / record.image)])
        out["prompt"].append(tok.bos_token + prompt)
        for key in ("chosen", "rejected"):
            answer = {"role": "assistant", "content": [{"type": "text", "text": getattr(record, key)}]}
            messages = [*record.messages(), answer]
            full = processor.apply_chat_template(messages, tokenize=False)
            assert full.startswith(prompt)
            out[key].append(full[len(prompt) :].rstrip())
    return out


def trl_dataset(data: str, processor: Any) -> Any:
    """A `datasets.Dataset` whose ``images`` column decodes the PNG files on access (as a hub data set would)."""
    from datasets import Dataset, Features, Image, List, Value

    features = Features(
        {"images": List(Image()), "prompt": Value("string"), "chosen": Value("string"), "rejected": Value("string")}
    )
    return Dataset.from_dict(trl_examples(data, processor), features=features)


def _no_checkpointing() -> dict[str, bool]:
    """transformers 5.x renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name warns)."""
    import dataclasses

    from trl import DPOConfig

    names = {f.name for f in dataclasses.fields(DPOConfig)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def trl_config(output_dir: str, max_steps: int, beta: float = BETA) -> Any:
    """TRL's fastest valid settings for image data on this machine (fp32, CPU); batches in file order, as ours."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=1,
        max_steps=max_steps,  # -1: one epoch
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        max_grad_norm=MAX_GRAD_NORM,
        beta=beta,
        loss_type=["sigmoid"],
        max_length=None,  # never truncate (576 image tokens + prompt + ~100-token answer)
        padding_free=False,  # disabled in TRL 1.16 ("temporarily unavailable"), and FlashAttention-only anyway
        precompute_ref_log_probs=False,  # TRL raises for vision data sets (see module docstring)
        **_no_checkpointing(),  # TRL's default is on: it saves memory but is slower; off is its fastest setting
        bf16=False,  # DPOConfig defaults to bf16=True; the comparison is fp32
        fp16=False,
        use_cpu=True,
        disable_dropout=True,
        use_liger_kernel=False,
        activation_offloading=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        train_sampling_strategy="sequential",  # the same batches as ours (the workload file is in epoch order)
    )


def build_trl_trainer(
    model: Any, processor: Any, dataset: Any, output_dir: str, max_steps: int, callbacks=None, beta: float = BETA
):
    """DPOTrainer with an explicit frozen reference copy (TRL would otherwise reload the model from its hub id /
    path, which an in-memory model does not have) and the same AdamW as ours under a constant schedule."""
    import torch
    from trl import DPOTrainer

    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=trl_config(output_dir, max_steps, beta),
        train_dataset=dataset,
        processing_class=processor,
        optimizers=(optimizer, scheduler),
        callbacks=callbacks or [],
    )


def worker_trl_steps(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import TrainerCallback

    model, processor = build_policy()
    fp = model_fingerprint(model)
    stamps: list[tuple[float, float]] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(stamp())

    dataset = trl_dataset(args.data, processor)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trl_trainer(model, processor, dataset, out, args.warmup + args.steps, [Stamp()])
        start = stamp()
        trainer.train()
    stats = step_stats([start, *stamps], args.warmup)
    return stats | {"peak_rss_mb": peak_rss_mb(), "fingerprint": fp, "steps": args.steps, "warmup": args.warmup}


def worker_trl_epoch(args: argparse.Namespace) -> dict[str, Any]:
    """One epoch (``epoch_s``: data set, trainer and train(); ``job_s``: the model build too, as a sweep job) with
    ``args.beta``; counts the padding of the batches TRL's collator builds."""
    built = time.perf_counter()
    model, processor = build_policy()
    start = stamp()
    dataset = trl_dataset(args.data, processor)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trl_trainer(model, processor, dataset, out, -1, beta=args.beta)  # incl. the reference copy
        trainer.data_collator = counter = CountingCollator(trainer.data_collator)
        ready = time.perf_counter()
        trainer.train()
    end = stamp()
    return {
        "epoch_s": end[0] - start[0],
        "job_s": end[0] - built,
        "build_s": start[0] - built,
        "beta": args.beta,
        "padding_share": counter.share,
        "setup_s": ready - start[0],
        "epoch_cpu_s": end[1] - start[1],
        "steps": trainer.state.global_step,
        "peak_rss_mb": peak_rss_mb(),
        "loadavg": os.getloadavg()[0],
    }


def worker_check(args: argparse.Namespace) -> dict[str, Any]:
    """Same tokens, same initial loss (ln 2: policy == reference) and the same answer log-probs in TRL and ours."""
    import torch
    from torch.utils.data import DataLoader

    from src.data.encoding import collate_pairs
    from src.models.logprobs import answer_logprobs

    module, (_, answers) = ours_module("ours_dpo", args.data)
    model, processor, pad = module.policy, module.processor, module.pad_token_id
    dm = ours_datamodule(args.data, processor, answers)
    with tempfile.TemporaryDirectory() as cache:
        precompute(module, dm, cache)
    first = [dm.train_set[i] for i in range(BATCH_SIZE)]  # records in file order (val_fraction=0: no split)
    batch = next(iter(DataLoader(first, batch_size=BATCH_SIZE, collate_fn=lambda x: collate_pairs(x, pad))))
    with torch.no_grad():
        ours_loss, _ = module.forward_batch(batch)
        packed = answer_logprobs(model, batch, pad, "packed")
        padded = answer_logprobs(model, batch, pad, "padded")

    dataset = trl_dataset(args.data, processor)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trl_trainer(model, processor, dataset, out, 1)
        inputs = trainer.data_collator([dataset[i] for i in range(BATCH_SIZE)])
        # TRL's first training batch is the first BATCH_SIZE records of the file, as ours (`ordered_loader`) is
        trl_first = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            trl_loss = trainer.compute_loss(model, inputs)
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            kwargs = {k: v for k, v in inputs.items() if k != "completion_mask"}
            trl_logps = model(**kwargs, labels=labels, fused_lm_head=True).log_probs.sum(dim=1)
    trl_logps = torch.stack(trl_logps.chunk(2), dim=1)  # (B, 2): rows are [chosen..., rejected...]

    same_tokens = True
    for i, pair in enumerate(p["pair"] for p in first):
        for j in range(2):
            row = inputs["input_ids"][j * BATCH_SIZE + i][inputs["attention_mask"][j * BATCH_SIZE + i].bool()]
            same_tokens &= row.tolist() == pair.prompt_ids + pair.answer_ids[j]
    ln2 = math.log(2)
    ours_first = next(iter(ordered_loader(dm, pad)))
    return {
        "same_tokens": bool(same_tokens),
        "same_batches": torch.equal(trl_first["input_ids"].cpu(), inputs["input_ids"])
        and torch.equal(ours_first["prompt_ids"], batch["prompt_ids"]),
        "prompt_tokens": len(first[0]["pair"].prompt_ids),
        "image_tokens": first[0]["pair"].prompt_ids.count(model.config.image_token_id),
        "mean_answer_tokens": sum(len(a) for it in dm.train_set.pairs for a in it.answer_ids)
        / sum(len(it.answer_ids) for it in dm.train_set.pairs),
        "model_vocab": model.config.get_text_config().vocab_size,
        "tokenizer_vocab": len(processor.tokenizer),
        "ours_loss": ours_loss.item(),
        "trl_loss": trl_loss.item(),
        "ln2": ln2,
        "ours_logps": packed.tolist(),
        "trl_logps": trl_logps.tolist(),
        "max_abs_logp_diff_trl_vs_ours": (packed - trl_logps).abs().max().item(),
        "max_abs_logp_diff_packed_vs_padded": (packed - padded).abs().max().item(),
        "precomputed_vs_policy": (batch["reference_logps"] - packed).abs().max().item(),
        "trainable": {
            "vision": sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n and p.requires_grad),
            "total": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "all": sum(p.numel() for p in model.parameters()),
        },
    }
