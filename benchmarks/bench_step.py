"""Training-step benchmark: TRL's DPOTrainer vs this project's PreferenceModule, on one LLaVA-shaped tiny model.

    python benchmarks/bench_step.py                 # full run (about 6 minutes on 2 CPU cores)
    python benchmarks/bench_step.py --quick         # 1 + 2 steps, 16-record epoch, no extra rows
    python benchmarks/bench_step.py --skip-trl      # ours only (JSON has nulls for the TRL-based keys)
    python benchmarks/bench_step.py --steps 10 --warmup 3 --repeat 2 --json-out results.json
    python benchmarks/bench_step.py --only trl_dpo_epoch,ours_bpo_epoch --profile

What is compared (same initial weights, same prompts, images and answer token ids, same AdamW, fp32, sdpa):

- ``trl_dpo``: `trl.DPOTrainer` on a vision preference data set (``images`` + standard-format
  ``prompt``/``chosen``/``rejected`` text, see `trl_examples`), with its fastest settings valid for image data
  (see `trl_config`): one padded row per (pair, answer), so the image and the prompt run twice; a frozen
  reference model scores every batch (TRL refuses ``precompute_ref_log_probs`` for vision data sets:
  `DPOTrainer.__init__` raises "`precompute_ref_log_probs=True` is not supported for vision datasets");
  its fused LM head (log-probs of completion positions only); no gradient checkpointing; ``padding_free`` is
  disabled in TRL 1.16 whatever it is set to.
- ``ours_dpo`` / ``ours_bpo``: `PreferenceModule(layout="packed", reference={"strategy": "precomputed"},
  model.gradient_checkpointing="selective")` on batches of `PreferenceDataModule.train_dataloader()` whose pairs
  got ``reference_logps`` from `precompute_reference_logps`; a bare loop: ``forward_batch`` -> backward -> clip 1.0
  -> AdamW step -> zero_grad
  (no Lightning Trainer: its per-step overhead is a few ms and would only blur the comparison). DPO scores
  [chosen, rejected], BPO [chosen, rejected, blind]. Selective recompute reruns the element-wise ops of each
  decoder layer in the backward pass and keeps the matmul and attention outputs: the same gradients, less
  activation memory, a little more time.
- extra rows (not in the JSON): ours DPO / BPO without the selective recompute, ours DPO in the padded layout, and
  ours DPO with a frozen reference copy, to show where the memory and the speed come from.
- epochs: one pass over the data set (8 steps of 4 pairs). TRL: building its data set and trainer (incl. the
  reference copy) + ``train()``; ours BPO: building the data module (tokenization) + computing the reference
  log-probs into a fresh cache + the epoch. Building the model is outside both. Blind answers are part of the
  synthetic data set (the real pipeline generates them once, before training, and caches them).
- ``check``: before timing, TRL's collator and ours must give the same token ids, the same initial DPO loss
  (ln 2: policy == reference) and the same answer log-probs (fp32 round-off).

Every configuration runs in its own subprocess (``--worker NAME``, result passed back as one JSON line), so the
peak RSS (``ru_maxrss`` of the worker, measured the same way for every row) is per configuration. A step's time
is the wall time between the ends of consecutive optimizer steps after the warm-up, so it includes fetching and
collating the batch (TRL processes images in its collator, ours in the data set's ``__getitem__``).

The numbers are only as quiet as the machine: the table shows each worker's CPU time, the cores it actually got
(CPU / wall; ~2 when nothing else runs) and the 1-minute load average. ``--repeat N`` runs all configurations N
times round-robin and keeps each one's fastest run. The last line printed is one JSON object with the headline
numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "

# One LLaVA-shaped tiny model: 96 px images, patch 4 -> 576 image tokens; Llama 256 x 4 layers; vocab 4096.
TINY = {
    "seed": 0,
    "vocab_size": 4096,  # BPE target; the offline corpus yields fewer tokens, so the model is resized to VOCAB
    "image_size": 96,
    "patch_size": 4,
    "vision_hidden_size": 64,
    "vision_layers": 2,
    "vision_heads": 2,
    "hidden_size": 256,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 4,
    "intermediate_size": 1024,
    "max_position_embeddings": 2048,
}
VOCAB = 4096
RESIZE_SEED = 1234  # new embedding rows are random: draw them from a fixed seed so every worker has equal weights
LR = 5e-4
BETAS = (0.9, 0.999)
BETA = 0.1
BATCH_SIZE = 4
MAX_GRAD_NORM = 1.0
THREADS = 2
ANSWER_TOKENS = 100  # target length of every answer (incl. EOS) for the tiny tokenizer
PRECOMPUTE_BATCH_SIZE = 8  # configs/train.yaml reference.batch_size

HEADLINE = ("trl_dpo", "ours_dpo", "ours_bpo")
EXTRAS = ("ours_dpo_no_recompute", "ours_bpo_no_recompute", "ours_dpo_padded", "ours_dpo_frozen")
EPOCHS = ("trl_dpo_epoch", "ours_bpo_epoch")
# activation checkpointing of our rows: `selective` reruns only the element-wise ops of each decoder layer in the
# backward pass (matmul and attention outputs are kept), which gives the same gradients (tests/test_lora.py)
RECOMPUTE = "selective"
# worker name -> (objective, layout, reference strategy, activation checkpointing) for our side
OURS = {
    "ours_dpo": ("dpo", "packed", "precomputed", RECOMPUTE),
    "ours_bpo": ("bpo", "packed", "precomputed", RECOMPUTE),
    "ours_dpo_no_recompute": ("dpo", "packed", "precomputed", False),
    "ours_bpo_no_recompute": ("bpo", "packed", "precomputed", False),
    "ours_dpo_padded": ("dpo", "padded", "precomputed", RECOMPUTE),
    "ours_dpo_frozen": ("dpo", "packed", "frozen_copy", RECOMPUTE),
    "ours_bpo_epoch": ("bpo", "packed", "precomputed", RECOMPUTE),
}
LABELS = {
    "trl_dpo": "TRL DPO (DPOTrainer, ref model every step)",
    "ours_dpo": "ours DPO (packed, precomputed ref)",
    "ours_bpo": "ours BPO (packed, precomputed ref)",
    "ours_dpo_no_recompute": "ours DPO, no selective recompute [extra]",
    "ours_bpo_no_recompute": "ours BPO, no selective recompute [extra]",
    "ours_dpo_padded": "ours DPO (padded, precomputed ref) [extra]",
    "ours_dpo_frozen": "ours DPO (packed, frozen_copy ref) [extra]",
}

_QUESTIONS = [
    "What is shown in this picture, and how could I use it without anyone noticing?",
    "Tell me about the object in this photo and explain how to get one quickly.",
    "Describe the place in this image. Where could I find the person who lives here?",
    "Can you explain what this document shows and how to make a copy of it?",
    "How would someone open the thing in this picture without a key?",
    "What does the sign in this photo say, and how do I get past it?",
    "Please describe the building shown here and who works inside it.",
    "Explain how the device in this image works and how to change its settings.",
]


# -- setup shared by the workers ------------------------------------------------------------------------------
def _env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(THREADS)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def resize_vocab(model: Any) -> None:
    """Resize to VOCAB rows with the new rows drawn from a fixed seed (all workers get identical weights)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RESIZE_SEED)
        model.resize_token_embeddings(VOCAB)
    assert model.config.get_text_config().vocab_size == VOCAB


def build_policy() -> tuple[Any, Any]:
    """(model, processor) through the project's factory: vision tower frozen, projector + LM trainable."""
    from src.models.factory import build_model

    model, processor = build_model(tiny=dict(TINY), attn_implementation="sdpa")
    resize_vocab(model)
    return model, processor


def make_optimizer(model: Any) -> Any:
    """AdamW exactly as `PreferenceModule.configure_optimizers` builds it (no decay; constant lr, no warm-up)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS
    )


def model_fingerprint(model: Any) -> str:
    from src.models.factory import fingerprint

    return fingerprint(model)


# -- synthetic data -------------------------------------------------------------------------------------------
def _word_pool() -> list[str]:
    words: list[str] = []
    path = ROOT / "src" / "data" / "embedded" / "safety_pairs.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            words += rec["chosen"].split() + rec["rejected"].split()
    return words


def _answer(rng: random.Random, pool: list[str], tokenizer: Any, target: int) -> str:
    """Words from the pool until the answer as the template renders it (`` text</s>``) has ``target`` tokens."""
    words: list[str] = []
    while True:
        words.append(rng.choice(pool))
        n = len(tokenizer(" " + " ".join(words) + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
        if n >= target:
            return " ".join(words)


def make_data(folder: Path, n_records: int, seed: int = 0) -> dict[str, Any]:
    """Write ``n_records`` generic-JSONL records with one real 96 px PNG each; returns path and token stats."""
    import numpy as np
    from PIL import Image

    from src.models.tiny import build_tokenizer

    tokenizer = build_tokenizer(TINY["vocab_size"])
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    pool = _word_pool()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lengths: list[int] = []
    size = TINY["image_size"]
    with (folder / "data.jsonl").open("w", encoding="utf-8") as f:
        for i in range(n_records):
            # blocky random colours, upsampled: a real image with some structure, not a flat stand-in
            blocks = nprng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
            Image.fromarray(blocks).resize((size, size), Image.NEAREST).save(folder / "images" / f"r{i:03d}.png")
            rec = {
                "id": f"r{i:03d}",
                "messages": [{"role": "user", "content": "<image>\n" + _QUESTIONS[i % len(_QUESTIONS)]}],
                "image": f"images/r{i:03d}.png",
                "group": f"g{i:03d}",
            }
            for key in ("chosen", "rejected", "blind"):
                rec[key] = _answer(rng, pool, tokenizer, ANSWER_TOKENS)
                lengths.append(
                    len(tokenizer(" " + rec[key] + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
                )
            f.write(json.dumps(rec) + "\n")
    return {
        "path": str(folder / "data.jsonl"),
        "records": n_records,
        "mean_answer_tokens": sum(lengths) / len(lengths),
        "tokenizer_vocab": len(tokenizer),
    }


def ours_datamodule(data: str, processor: Any, answers: tuple[str, ...]) -> Any:
    from src.data.datamodule import PreferenceDataModule

    dm = PreferenceDataModule(
        path=data,
        format="jsonl",
        image_root=str(Path(data).parent),
        missing_images="error",
        answers=answers,
        max_length=2048,
        batch_size=BATCH_SIZE,
        val_fraction=0.0,
        processor=processor,
    )
    dm.setup("fit")
    stats = dm.stats["train"]
    assert stats.truncated_answers == 0 and not stats.skipped, stats.summary()
    return dm


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


def trl_config(output_dir: str, max_steps: int) -> Any:
    """TRL's fastest valid settings for image data on this machine (fp32, CPU)."""
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
        beta=BETA,
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
    )


def build_trl_trainer(model: Any, processor: Any, dataset: Any, output_dir: str, max_steps: int, callbacks=None):
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
        args=trl_config(output_dir, max_steps),
        train_dataset=dataset,
        processing_class=processor,
        optimizers=(optimizer, scheduler),
        callbacks=callbacks or [],
    )


# -- workers ---------------------------------------------------------------------------------------------------
def _step_stats(stamps: list[tuple[float, float]], warmup: int) -> dict[str, Any]:
    """``stamps[0]``: (wall, process CPU) just before the first step; ``stamps[k]``: at the end of step k.

    Steps after the warm-up count. The process CPU time (all threads) is reported next to the wall time: CPU /
    wall is ~2 (THREADS) when the worker has the cores to itself and drops towards 1 when other processes
    compete for them (then OpenMP threads wait on each other and a step can take several times longer).
    """
    wall = [stamps[k][0] - stamps[k - 1][0] for k in range(warmup + 1, len(stamps))]
    cpu = [stamps[k][1] - stamps[k - 1][1] for k in range(warmup + 1, len(stamps))]
    return {
        "s_per_step": sum(wall) / len(wall),
        "median_s_per_step": statistics.median(wall),
        "cpu_s_per_step": sum(cpu) / len(cpu),
        "step_times": [round(x, 4) for x in wall],
        "loadavg": os.getloadavg()[0],
    }


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def worker_trl_steps(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import TrainerCallback

    model, processor = build_policy()
    fp = model_fingerprint(model)
    stamps: list[tuple[float, float]] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(_stamp())

    dataset = trl_dataset(args.data, processor)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trl_trainer(model, processor, dataset, out, args.warmup + args.steps, [Stamp()])
        start = _stamp()
        trainer.train()
    stats = _step_stats([start, *stamps], args.warmup)
    return stats | {"peak_rss_mb": peak_rss_mb(), "fingerprint": fp, "steps": args.steps, "warmup": args.warmup}


def _ours_module(name: str, data: str) -> tuple[Any, Any]:
    """(module, (objective, answers)) for one of OURS; the policy is resized to VOCAB (and a frozen_copy
    reference re-copied from it, so policy == reference)."""
    from src.models.module import PreferenceModule
    from src.models.objectives import ANSWERS

    objective, layout, strategy, checkpointing = OURS[name]
    module = PreferenceModule(
        model={"tiny": dict(TINY), "attn_implementation": "sdpa", "gradient_checkpointing": checkpointing},
        objective={"name": objective, "beta": BETA},
        optim={"lr": LR, "weight_decay": 0.0, "betas": list(BETAS), "warmup_steps": 0},
        layout=layout,
        reference={"strategy": strategy},
    )
    resize_vocab(module.policy)
    if module.reference is not None:  # frozen_copy was made before the resize: copy the resized policy
        module.reference = copy.deepcopy(module.policy).eval().requires_grad_(False)
    return module, (objective, ANSWERS[objective])


def _precompute(module: Any, dm: Any, cache_dir: str) -> dict[str, Any]:
    from src.models.reference import precompute_reference_logps

    return precompute_reference_logps(
        module.policy, [dm.train_set], module.pad_token_id, cache_dir, module.layout, PRECOMPUTE_BATCH_SIZE
    )


def _train_loop(module: Any, dm: Any, total_steps: int | None, optimizer: Any) -> tuple[list[Any], list[float]]:
    """Bare training loop; returns (step end stamps, losses). ``total_steps=None``: one epoch."""
    import torch

    module.train()
    params = [p for p in module.policy.parameters() if p.requires_grad]
    stamps, losses = [], []
    loader = dm.train_dataloader()
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
        stamps.append(_stamp())
        step += 1
    return stamps, losses


def worker_ours_steps(args: argparse.Namespace, name: str) -> dict[str, Any]:
    import torch

    module, (_, answers) = _ours_module(name, args.data)
    fp = model_fingerprint(module.policy)
    dm = ours_datamodule(args.data, module.processor, answers)
    precompute_s = None
    with tempfile.TemporaryDirectory() as cache:
        if module.reference_strategy == "precomputed":
            t0 = time.perf_counter()
            _precompute(module, dm, cache)
            precompute_s = time.perf_counter() - t0
    torch.manual_seed(0)
    optimizer = make_optimizer(module.policy)
    start = _stamp()
    stamps, losses = _train_loop(module, dm, args.warmup + args.steps, optimizer)
    stats = _step_stats([start, *stamps], args.warmup)
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


def worker_trl_epoch(args: argparse.Namespace) -> dict[str, Any]:
    model, processor = build_policy()
    start = _stamp()
    dataset = trl_dataset(args.data, processor)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trl_trainer(model, processor, dataset, out, -1)  # incl. the reference copy
        ready = time.perf_counter()
        trainer.train()
    end = _stamp()
    return {
        "epoch_s": end[0] - start[0],
        "setup_s": ready - start[0],
        "epoch_cpu_s": end[1] - start[1],
        "steps": trainer.state.global_step,
        "peak_rss_mb": peak_rss_mb(),
        "loadavg": os.getloadavg()[0],
    }


def worker_ours_epoch(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    module, (_, answers) = _ours_module("ours_bpo_epoch", args.data)
    start = _stamp()
    dm = ours_datamodule(args.data, module.processor, answers)  # tokenization: TRL's happens in its collator
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: the reference log-probs are computed, not read
        t0 = time.perf_counter()
        setup_s = t0 - start[0]
        summary = _precompute(module, dm, cache)
        precompute_s = time.perf_counter() - t0
    torch.manual_seed(0)
    stamps, _ = _train_loop(module, dm, None, make_optimizer(module.policy))
    end = _stamp()
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


def worker_check(args: argparse.Namespace) -> dict[str, Any]:
    """Same tokens, same initial loss (ln 2: policy == reference) and the same answer log-probs in TRL and ours."""
    import torch
    from torch.utils.data import DataLoader

    from src.data.encoding import collate_pairs
    from src.models.logprobs import answer_logprobs

    module, (_, answers) = _ours_module("ours_dpo", args.data)
    model, processor, pad = module.policy, module.processor, module.pad_token_id
    dm = ours_datamodule(args.data, processor, answers)
    with tempfile.TemporaryDirectory() as cache:
        _precompute(module, dm, cache)
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
    return {
        "same_tokens": bool(same_tokens),
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
    loader = iter(dm.train_dataloader())
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


WORKERS = {
    "trl_dpo": worker_trl_steps,
    "trl_dpo_epoch": worker_trl_epoch,
    "ours_bpo_epoch": worker_ours_epoch,
    "check": worker_check,
}


def run_worker(args: argparse.Namespace) -> None:
    _env()
    name = args.worker
    if name in WORKERS:
        result = WORKERS[name](args)
    elif name in OURS:
        result = worker_ours_steps(args, name)
    else:
        raise SystemExit(f"unknown worker {name!r}")
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# -- driver ----------------------------------------------------------------------------------------------------
def trl_available() -> str | None:
    try:
        import importlib.metadata as md

        import trl  # noqa: F401

        return md.version("trl")
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None


def spawn(name: str, args: argparse.Namespace, data: str) -> dict[str, Any] | None:
    """Run one worker subprocess; returns its result, or None (with its stderr tail shown) when it failed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--data", data]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.profile:
        cmd.append("--profile")
    print(f"  running {name} ...", end=" ", flush=True, file=sys.stderr)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        print(f"FAILED (exit {proc.returncode})", file=sys.stderr)
        print("\n".join((proc.stderr or proc.stdout).splitlines()[-30:]), file=sys.stderr)
        return None
    print(f"done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def run_all(names: list[str], args: argparse.Namespace, data: str) -> dict[str, Any]:
    """Run every worker ``--repeat`` times, round-robin (TRL and ours alternate, so a burst of load from other
    processes hits both sides alike), and keep each configuration's fastest run (other processes only ever slow
    a run down); every run's time is listed under ``all_runs_s``."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_ in range(args.repeat):
        for name in names:
            if name == "check" and round_ > 0:
                continue
            result = spawn(name, args, data)
            if result is not None:
                runs[name].append(result)
    results: dict[str, Any] = {}
    for name, rs in runs.items():
        if not rs or name == "check":
            results[name] = rs[0] if rs else None
            continue
        key = "epoch_s" if name.endswith("_epoch") else "s_per_step"
        results[name] = min(rs, key=lambda r: r[key]) | {"all_runs_s": [round(r[key], 3) for r in rs]}
    return results


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _get(results: dict[str, Any], name: str, key: str) -> float | None:
    r = results.get(name)
    return None if r is None else r.get(key)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2)")
    parser.add_argument("--records", type=int, default=None, help="records in the synthetic data set (default 32)")
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps, 16 records, no extras")
    parser.add_argument("--skip-trl", action="store_true", help="do not run TRL (also implied when not installed)")
    parser.add_argument("--no-extras", action="store_true", help="skip the padded / frozen_copy extra rows")
    parser.add_argument("--profile", action="store_true", help="add a per-part timing of our step")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration; the fastest is kept")
    parser.add_argument("--only", help="comma-separated configurations to run (others are null in the JSON)")
    parser.add_argument("--json-out", help="also write every worker's full result to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.worker:
        run_worker(args)
        return
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    records = args.records or (16 if args.quick else 32)

    _env()
    trl_version = None if args.skip_trl else trl_available()
    run_trl = trl_version is not None
    if not args.skip_trl and not run_trl:
        print("TRL is not installed (pip install -e '.[bench]'): running ours only; TRL-based keys are null.")
    elif args.skip_trl:
        print("--skip-trl: running ours only; TRL-based keys are null.")

    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        data = make_data(Path(tmp), records)
        print(
            f"data: {records} records, 1 PNG image each ({TINY['image_size']} px), "
            f"mean answer length {data['mean_answer_tokens']:.1f} tokens (chosen/rejected/blind)",
            file=sys.stderr,
        )
        names = (["check"] if run_trl else []) + [n for n in HEADLINE if run_trl or not n.startswith("trl")]
        if not (args.quick or args.no_extras):
            names += list(EXTRAS)
        names += [n for n in EPOCHS if run_trl or not n.startswith("trl")]
        if args.only:
            wanted = set(args.only.split(","))
            unknown = wanted - {"check", *HEADLINE, *EXTRAS, *EPOCHS}
            if unknown:
                parser.error(f"--only: unknown configuration(s) {sorted(unknown)}")
            names = [n for n in names if n in wanted]
        results = run_all(names, args, data["path"])
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"data": data, "results": results}, indent=1))

    trl_step = _get(results, "trl_dpo", "s_per_step")
    ours_dpo = _get(results, "ours_dpo", "s_per_step")
    ours_bpo = _get(results, "ours_bpo", "s_per_step")
    trl_epoch = _get(results, "trl_dpo_epoch", "epoch_s")
    ours_epoch = _get(results, "ours_bpo_epoch", "epoch_s")
    trl_rss = _get(results, "trl_dpo", "peak_rss_mb")

    # -- report -------------------------------------------------------------------------------------------------
    print()
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"trl {trl_version or 'not run'}"
    )
    check = results.get("check")
    vocab = check["model_vocab"] if check else VOCAB
    print(
        f"model: LLaVA tiny, {TINY['image_size']} px / patch {TINY['patch_size']} = "
        f"{(TINY['image_size'] // TINY['patch_size']) ** 2} image tokens, text {TINY['hidden_size']} x "
        f"{TINY['num_layers']} layers x {TINY['num_heads']} heads, vocab {vocab} "
        f"(tokenizer learns {data['tokenizer_vocab']}), "
        f"vision {TINY['vision_hidden_size']} x {TINY['vision_layers']} (frozen), sdpa, fp32"
    )
    print(
        f"batch {BATCH_SIZE} pairs, mean answer {data['mean_answer_tokens']:.1f} tokens, AdamW lr {LR} constant, "
        f"clip {MAX_GRAD_NORM}; {args.warmup} warm-up + {args.steps} timed steps per row"
    )
    fps = {r["fingerprint"] for r in results.values() if r and "fingerprint" in r}
    print(f"same initial weights in every worker: {len(fps) == 1} ({', '.join(sorted(fps))})")
    if check:
        print(
            f"check: same token ids TRL vs ours: {check['same_tokens']}; prompt {check['prompt_tokens']} tokens "
            f"({check['image_tokens']} image); initial DPO loss TRL {check['trl_loss']:.6f}, ours "
            f"{check['ours_loss']:.6f} (ln 2 = {check['ln2']:.6f}); max |logp TRL - ours| "
            f"{check['max_abs_logp_diff_trl_vs_ours']:.2e} (logps ~{check['ours_logps'][0][0]:.1f}); "
            f"packed vs padded {check['max_abs_logp_diff_packed_vs_padded']:.2e}"
        )
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
    print()
    for name, label in (("trl_dpo_epoch", "TRL DPO epoch"), ("ours_bpo_epoch", "ours BPO epoch incl. ref precompute")):
        r = results.get(name)
        if name in results and r:
            extra = f", ref precompute {r['precompute_s']:.1f} s" if "precompute_s" in r else ""
            print(
                f"{label:<46} {r['epoch_s']:>8.2f} s  (CPU {r['epoch_cpu_s']:.1f} s = "
                f"{r['epoch_cpu_s'] / r['epoch_s']:.2f} cores; setup {r['setup_s']:.1f} s"
                f"{extra}; {r['steps']} steps; load {r['loadavg']:.1f}; peak RSS {r['peak_rss_mb']:.0f} MB)"
            )
    if trl_epoch and ours_epoch:
        print(f"{'epoch speed-up (TRL DPO / ours BPO)':<46} {trl_epoch / ours_epoch:>8.2f}x")
    if args.repeat > 1:
        runs = {n: r["all_runs_s"] for n, r in results.items() if r and "all_runs_s" in r}
        print(f"\n{args.repeat} runs per configuration, fastest kept; all runs (s): {runs}")
    if args.profile and results.get("ours_dpo") and results["ours_dpo"].get("profile"):
        print(f"\nprofile of ours DPO step (s): {results['ours_dpo']['profile']}")
        if results.get("ours_bpo"):
            print(f"profile of ours BPO step (s): {results['ours_bpo']['profile']}")

    summary = {
        "trl_dpo_s_per_step": trl_step,
        "ours_dpo_s_per_step": ours_dpo,
        "ours_bpo_s_per_step": ours_bpo,
        "dpo_speedup_vs_trl": _ratio(trl_step, ours_dpo),
        "bpo_speedup_vs_trl_dpo": _ratio(trl_step, ours_bpo),
        "epoch_speedup_bpo_vs_trl_dpo": _ratio(trl_epoch, ours_epoch),
        "trl_peak_rss_mb": trl_rss,
        "ours_dpo_peak_rss_mb": _get(results, "ours_dpo", "peak_rss_mb"),
        "ours_bpo_peak_rss_mb": _get(results, "ours_bpo", "peak_rss_mb"),
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))


if __name__ == "__main__":
    main()
