"""The one place that computes log-probs of answers given a multimodal prompt.

Padded layout: every (record, answer) pair becomes its own row ``[prompt | answer | pad]``, rows in
answer-major order (row ``j * B + b`` is answer ``j`` of record ``b``), and the record's image inputs
are repeated once per answer. The vocabulary log-softmax is taken only at positions that predict an
answer token.
"""

from __future__ import annotations

from typing import Any

import torch

IMAGE_INPUT_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask")


def padded_rows(batch: dict[str, Any], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Lay a collated batch out as K*B right-padded rows.

    Returns ``input_ids``/``attention_mask``/``answer_mask`` (K*B, T); ``answer_mask[r, t]`` is True
    where token t of row r is an answer token, and the image inputs repeated K times.
    """
    prompts, p_len = batch["prompt_ids"], batch["prompt_lengths"]
    answers, a_len = batch["answer_ids"], batch["answer_lengths"]
    k, b = a_len.shape
    width = int((p_len.unsqueeze(0) + a_len).max())
    input_ids = torch.full((k * b, width), pad_token_id, dtype=torch.long, device=prompts.device)
    attention_mask = torch.zeros((k * b, width), dtype=torch.long, device=prompts.device)
    answer_mask = torch.zeros((k * b, width), dtype=torch.bool, device=prompts.device)
    for j in range(k):
        for i in range(b):
            r, p, a = j * b + i, int(p_len[i]), int(a_len[j, i])
            input_ids[r, :p] = prompts[i, :p]
            input_ids[r, p : p + a] = answers[j, i, :a]
            attention_mask[r, : p + a] = 1
            answer_mask[r, p : p + a] = True
    rows = {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask}
    for key in IMAGE_INPUT_KEYS:
        if key in batch:
            rows[key] = torch.cat([batch[key]] * k, dim=0)
    return rows


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over answer tokens of each row: logits (R, T, V) -> (R,) in float32.

    Position t's logits predict token t+1, so the scored positions are the answer mask shifted left.
    """
    predicts = answer_mask[:, 1:]
    rows = torch.nonzero(predicts, as_tuple=True)[0]
    selected = logits[:, :-1][predicts].float()  # (N, V): only positions that predict answer tokens
    targets = input_ids[:, 1:][predicts]
    token_logps = torch.log_softmax(selected, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=logits.device)
    return out.index_add(0, rows, token_logps)


def answer_logprobs(model: torch.nn.Module, batch: dict[str, Any], pad_token_id: int) -> torch.Tensor:
    """Summed log-probs of each answer under ``model``: returns (B, K), columns in answer order."""
    rows = padded_rows(batch, pad_token_id)
    inputs = {k: v for k, v in rows.items() if k != "answer_mask"}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    logits = model(**inputs, use_cache=False).logits
    logps = sequence_logprobs(logits, rows["input_ids"], rows["answer_mask"])
    k, b = batch["answer_lengths"].shape
    return logps.view(k, b).T
