"""A local Hugging Face language model, loaded on first use, for batched greedy generation.

One implementation for the Llama Guard judge (``src.evaluation.judge_llm``) and the model rephraser of the data
builder (``src.databuilder.rephrase``). What each one asks the model and how it reads the reply stays in its own
file; this file only loads the model and continues texts.
"""

from __future__ import annotations

from typing import Any

from src.models.device import choose_device
from src.models.source import check_model_source


class LocalLM:
    """A causal LM from a local folder or a hub id (``path``), loaded by `load`.

    ``device`` and ``dtype`` follow `choose_device` ("auto": cuda + bfloat16 when available, else cpu + float32).
    With ``images``, a checkpoint that has an image processor loads as an image-text model with its processor
    (``processor`` is then set); any other loads as a causal LM with its tokenizer. The tokenizer pads on the
    left, so each prompt of a batch continues from its own last token, and pads with EOS when it has no pad token.
    ``key`` is the setting that names ``path``, for error messages.
    """

    def __init__(
        self,
        path: str,
        key: str,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        images: bool = False,
    ) -> None:
        self.path = str(path)
        self.key = key
        self.device = device
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.images = images
        self.model: Any = None
        self.tokenizer: Any = None
        self.processor: Any = None  # set only for an image-text checkpoint loaded with ``images``

    def __repr__(self) -> str:
        return f"LocalLM(path={self.path!r}, device={self.device!r}, dtype={self.dtype!r})"

    def load(self) -> None:
        """Load tokenizer (or processor) and model. Raises `SettingError` when ``path`` is neither a checkpoint
        folder nor a usable hub id (`check_model_source`), ``OSError`` when transformers cannot load it."""
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        check_model_source(self.path, self.key)
        device, dtype = choose_device(self.device, self.dtype)
        remote = self.trust_remote_code
        processor = AutoProcessor.from_pretrained(self.path, trust_remote_code=remote) if self.images else None
        if getattr(processor, "image_processor", None) is not None:
            self.processor, self.tokenizer = processor, processor.tokenizer
            model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=dtype, trust_remote_code=remote)
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=remote)
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, trust_remote_code=remote)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(device).eval()

    def generate(self, texts: list[str], batch_size: int, max_new_tokens: int, add_special_tokens: bool) -> list[str]:
        """Greedy continuations of ``texts``, ``batch_size`` at a time, one per text in order. A text built by a
        chat template already holds its BOS token: pass ``add_special_tokens=False`` so none is added twice."""
        if self.model is None:
            self.load()
        replies: list[str] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            batch = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
            batch.pop("token_type_ids", None)  # some tokenizers return them; a causal LM's generate takes none
            replies.extend(self.continue_inputs(batch, max_new_tokens))
        return replies

    def generate_ids(self, prompts: list[list[int]], batch_size: int, max_new_tokens: int) -> list[str]:
        """Greedy continuations of prompts already tokenized (token ids, special tokens included), ``batch_size`` at
        a time, left-padded as `generate` pads texts; one per prompt, in order."""
        import torch
        from transformers import BatchEncoding

        if self.model is None:
            self.load()
        replies: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            pad = self.tokenizer.pad_token_id
            ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in chunk], dtype=torch.long)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], dtype=torch.long)
            replies.extend(
                self.continue_inputs(BatchEncoding({"input_ids": ids, "attention_mask": mask}), max_new_tokens)
            )
        return replies

    def continue_inputs(self, inputs: Any, max_new_tokens: int) -> list[str]:
        """Greedy continuations of model inputs already made (``input_ids`` (B, T), left-padded, with their
        ``attention_mask`` and, for an image-text model, pixel values), decoded without special tokens."""
        import torch

        if self.model is None:
            self.load()
        inputs = inputs.to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
            )
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
