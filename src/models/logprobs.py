"""The one place that computes log-probs of answers given a multimodal prompt.

Two layouts of the same computation, which give the same numbers:

- ``packed`` (default): every record as ``[prompt | answer 1 | ... | answer K]``. Block attention lets every
  answer attend, causally, to the prompt and to itself only, and each answer's position ids continue from the
  end of the prompt, so each answer is scored exactly as if it followed the prompt alone. The prompt (576 image
  tokens for llava-1.5) and the vision tower run once per record instead of K times. Under sdpa and flex
  attention the records of a batch lie back to back in ONE row, so no position is padding: flex keeps attention
  inside each record with a ``BlockMask`` (blocks between records are skipped, the GPU path), sdpa runs it record
  by record (`src.models.attention`). Under eager each record has its own row, padded to the longest.
- ``padded``: one row per (record, answer), ``[prompt | answer | pad]``, answer-major (row ``j * B + b``),
  the record's image inputs repeated per answer. Works with every attention backend.

Answers scored under the record's corrupted image (``answer_image`` (K,) = 1, from `collate_pairs`) get, in the
packed layout, a second prefix in the same row: ``[prompt | answers on the real image | prompt | answers on the
corrupted image | pad]``, the second block's positions restarting at 0 and its tokens seeing their own block only;
in the padded layout their rows carry the corrupted image. A record without an image scores them with its one
text-only prompt.

Qwen-VL-class models (Qwen2-VL, Qwen2.5-VL) place tokens by multimodal rotary positions (time, height, width), which
they compute from the image grid when given none. In the packed layout each prompt copy gets the positions the model
itself gives that prompt alone (its ``get_rope_index``, with the image the copy is scored under) and each answer's
continue from their largest plus one in all three, as they do after the prompt in a padded row; the position ids are
then (3, rows, width) and the numbers the padded layout's.

In both, the vocabulary projection and log-softmax are applied only at the positions that predict answer
tokens (in the packed layout the last prompt position predicts the first token of every answer), never
at prompt or image positions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from src.data.encoding import CORRUPTED_PREFIX, cat_image_inputs
from src.models import attention
from src.models.lora import unwrap

log = logging.getLogger(__name__)

IMAGE_INPUT_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask")
LAYOUTS = ("packed", "padded")
# attention backends that take an arbitrary 4D mask (flex as a BlockMask); FlashAttention-2 reads only 2D padding masks
MASKABLE = ("sdpa", "eager", "flex_attention")
# backends under which the packed layout puts all records of a batch into one row, without padding: flex skips the
# blocks between records, sdpa runs attention record by record (src/models/attention.py); eager pads records
PADDING_FREE = ("sdpa", "flex_attention")
_warned: set[str] = set()


@dataclass
class Rows:
    """Model inputs plus where each scored token is predicted.

    ``pred_row``/``pred_col`` (N,): the position whose output predicts token ``target`` (N,), which
    belongs to answer ``slot`` (N,) = ``b * K + k``. ``padding_tokens``: how many of the input positions are
    padding. ``spans``: (starts, lengths) of the records when they share one row with per-record masks.
    """

    inputs: dict[str, torch.Tensor]
    pred_row: torch.Tensor
    pred_col: torch.Tensor
    target: torch.Tensor
    slot: torch.Tensor
    num_slots: int
    padding_tokens: int = 0
    spans: tuple[tuple[int, ...], tuple[int, ...]] | None = None


def _image_inputs(batch: dict[str, Any], repeat: int = 1) -> dict[str, torch.Tensor]:
    return {k: torch.cat([batch[k]] * repeat, dim=0) for k in IMAGE_INPUT_KEYS if k in batch}


def _answer_image(batch: dict[str, Any]) -> list[int]:
    """Per answer column: 0 scored under the real image, 1 under the corrupted one (all 0 without corrupted inputs).

    Corrupted columns of a batch without any image (text-only records) are scored like the others."""
    k = len(batch["answer_lengths"])
    if "answer_image" not in batch or f"{CORRUPTED_PREFIX}pixel_values" not in batch:
        return [0] * k
    return [int(x) for x in batch["answer_image"].tolist()]


def _prefixed(batch: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """The image inputs of ``batch`` under their plain names; ``prefix``: the corrupted image's."""
    return {k: batch[prefix + k] for k in IMAGE_INPUT_KEYS if prefix + k in batch}


def _per_image(batch: dict[str, Any], prefix: str = "") -> list[dict[str, torch.Tensor]]:
    """`_prefixed` split into one dict per image: LLaVA's inputs have one entry per image along dim 0; Qwen-VL's
    ``pixel_values`` hold every image's patches back to back, ``image_grid_thw`` (N, 3) how many are whose."""
    inputs = _prefixed(batch, prefix)
    if "image_grid_thw" in inputs:
        grids = inputs["image_grid_thw"]
        patches = inputs["pixel_values"].split(grids.prod(-1).tolist())
        return [{"pixel_values": x, "image_grid_thw": grids[i : i + 1]} for i, x in enumerate(patches)]
    n = len(inputs["pixel_values"])
    return [{k: v[i : i + 1] for k, v in inputs.items()} for i in range(n)]


def _per_record(batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """`_per_image` joined per record with pictures (``image_counts``; one each without), in token order."""
    images = _per_image(batch)
    if "image_counts" not in batch:
        return images
    out, at = [], 0
    for n in batch["image_counts"].tolist():
        mine, at = images[at : at + n], at + n
        out.append({key: torch.cat([x[key] for x in mine]) for key in mine[0]})
    return out


def padded_rows(batch: dict[str, Any], pad_token_id: int) -> Rows:
    """K*B right-padded rows ``[prompt | answer]``, answer-major, image inputs repeated K times (each column's
    rows with the image it is scored under, `_answer_image`)."""
    prompts, p_len = batch["prompt_ids"], batch["prompt_lengths"].tolist()
    answers, a_len = batch["answer_ids"], batch["answer_lengths"].tolist()
    k, b = len(a_len), len(p_len)
    answer_image = _answer_image(batch)
    width = max(p_len[i] + a_len[j][i] for j in range(k) for i in range(b))
    device = prompts.device
    input_ids = torch.full((k * b, width), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((k * b, width), dtype=torch.long, device=device)
    pred_row, pred_col, target, slot = [], [], [], []
    for j in range(k):
        for i in range(b):
            r, p, a = j * b + i, p_len[i], a_len[j][i]
            input_ids[r, :p] = prompts[i, :p]
            input_ids[r, p : p + a] = answers[j, i, :a]
            attention_mask[r, : p + a] = 1
            pred_row += [r] * a
            pred_col += range(p - 1, p + a - 1)
            slot += [i * k + j] * a
            target.append(answers[j, i, :a])
    if any(answer_image):  # column by column, the real or the corrupted images of the records that have one
        columns = [_prefixed(batch, CORRUPTED_PREFIX if answer_image[j] else "") for j in range(k)]
        image_inputs = cat_image_inputs(columns)
    else:
        image_inputs = _image_inputs(batch, k)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask} | image_inputs
    return _rows(inputs, pred_row, pred_col, target, slot, b * k, device, int((attention_mask == 0).sum()))


def _record_blocks(batch: dict[str, Any]) -> list[list[list[int]]]:
    """Per record, the blocks of its packed tokens: each a list of the answer columns scored after one copy of the
    prompt (one block, or two when the record has an image and answers scored under the corrupted one)."""
    k, b = batch["answer_lengths"].shape
    answer_image = _answer_image(batch)
    has_image = batch["has_image"].tolist() if any(answer_image) else [False] * b
    real, corrupted = [j for j in range(k) if not answer_image[j]], [j for j in range(k) if answer_image[j]]
    return [[real, corrupted] if has_image[i] else [list(range(k))] for i in range(b)]


def packed_rows(
    batch: dict[str, Any],
    pad_token_id: int,
    mask_dtype: torch.dtype | None = None,
    block_mask: bool = False,
    one_row: bool = False,
    rope_index: Any = None,
) -> Rows:
    """Every record as ``[prompt | answer 1 | ... | answer K]`` with a block attention mask and restarted positions.

    Records with an image and answers scored under the corrupted one (`_answer_image`) get a second block, ``[...
    | prompt | corrupted answers]``, whose positions restart at 0 and whose tokens see only their own block; the
    image inputs are then ordered as their image tokens appear (per record: real, corrupted).

    ``one_row=False``: B rows, one per record, padded to the longest. ``one_row=True``: one row, the records back to
    back, no padding; attention must then stay inside each record: with ``block_mask`` by a flex ``BlockMask`` over
    the row, otherwise by per-record masks (B, 1, L, L) (record r's in the top-left corner, L its longest) that
    `src.models.attention` applies span by span (``Rows.spans``).

    ``mask_dtype=None`` gives boolean masks, True = attend; a float dtype gives an additive mask (0 or the dtype's
    minimum: eager attention adds the mask to the scores). ``block_mask=True`` gives a flex ``BlockMask`` of the
    same rule: transformers passes a 4D BlockMask to flex attention as is, whereas it *adds* a dense mask to flex's
    scores, which masks nothing.

    ``rope_index`` (Qwen-VL-class models, `multimodal_positions`): ``rope_index(prompt_ids, image_inputs or None)``
    gives a prompt's (3, P) multimodal positions, which the model would compute for the prompt alone; each answer's
    continue from the prompt's largest plus one in all three, as they do after the prompt in a row of its own. The
    position ids are then (3, rows, width).
    """
    prompts, p_len = batch["prompt_ids"], batch["prompt_lengths"].tolist()
    answers, a_len = batch["answer_ids"], batch["answer_lengths"].tolist()
    k, b = len(a_len), len(p_len)
    blocks = _record_blocks(batch)
    lengths = [p_len[i] * len(blocks[i]) + sum(a_len[j][i] for j in range(k)) for i in range(b)]
    starts = [sum(lengths[:i]) if one_row else 0 for i in range(b)]
    width = sum(lengths) if one_row else max(lengths)
    rows = 1 if one_row else b
    device = prompts.device
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long, device=device)
    position_ids = torch.zeros((3, rows, width) if rope_index else (rows, width), dtype=torch.long, device=device)
    images = _block_images(batch, blocks) if rope_index else None
    # n * (k + 1): the prompt of block n; n * (k + 1) + j + 1: answer j in it; -1: pad. Blocks are numbered over the
    # row (a record's blocks after the previous record's). One tensor, not two: torch's CPU flex kernel (2.13)
    # failed to compile a mask reading a second one
    segment = torch.full((rows, width), -1, dtype=torch.long, device=device)
    pred_row, pred_col, target, slot = [], [], [], []
    n_block = 0
    for i in range(b):
        row, p, start = 0 if one_row else i, p_len[i], starts[i]
        for n, columns in enumerate(blocks[i]):
            input_ids[row, start : start + p] = prompts[i, :p]
            if rope_index:
                prompt_positions = rope_index(prompts[i, :p], images[i][n])
                position_ids[:, row, start : start + p] = prompt_positions
                first = int(prompt_positions.max()) + 1
            else:
                position_ids[row, start : start + p] = torch.arange(p, device=device)
                first = p
            segment[row, start : start + p] = n_block * (k + 1)
            last = start + p - 1  # the last prompt position predicts every answer's first token
            start += p
            for j in columns:
                a = a_len[j][i]
                input_ids[row, start : start + a] = answers[j, i, :a]
                position_ids[..., row, start : start + a] = torch.arange(first, first + a, device=device)
                segment[row, start : start + a] = n_block * (k + 1) + j + 1
                pred_row += [row] * a
                pred_col += [last, *range(start, start + a - 1)][:a]
                slot += [i * k + j] * a
                target.append(answers[j, i, :a])
                start += a
            n_block += 1
    spans = None
    if block_mask:
        mask = _block_mask(segment, k + 1)
    else:
        if one_row:  # each record's own (L, L) corner, the rest never read
            spans = (tuple(starts), tuple(lengths))
            longest = max(lengths)
            local = torch.full((b, longest), -1, dtype=torch.long, device=device)
            for i in range(b):
                local[i, : lengths[i]] = segment[0, starts[i] : starts[i] + lengths[i]]
        else:
            local, longest = segment, width
        pos = torch.arange(longest, device=device)
        mask = _attends(local.unsqueeze(2), local.unsqueeze(1), pos.unsqueeze(1), pos, k + 1).unsqueeze(1)
        if mask_dtype is not None:
            mask = torch.zeros(mask.shape, dtype=mask_dtype, device=device).masked_fill(
                ~mask, torch.finfo(mask_dtype).min
            )
    if any(len(x) > 1 for x in blocks):  # LLaVA scatters image features into the image tokens in order
        real, corrupted = _per_image(batch), iter(_per_image(batch, CORRUPTED_PREFIX))
        image_inputs = cat_image_inputs([x for image in real for x in (image, next(corrupted))])
    else:
        image_inputs = _image_inputs(batch)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids} | image_inputs
    return _rows(inputs, pred_row, pred_col, target, slot, b * k, device, int((segment < 0).sum()), spans)


def _block_images(batch: dict[str, Any], blocks: list[list[list[int]]]) -> list[list[dict[str, torch.Tensor] | None]]:
    """Per record and block, the image inputs its prompt is scored under (None: a record without an image)."""
    real = iter(_per_record(batch)) if "pixel_values" in batch else iter(())
    corrupted = iter(_per_image(batch, CORRUPTED_PREFIX)) if len(max(blocks, key=len)) > 1 else iter(())
    has_image = batch["has_image"].tolist()
    out = []
    for i, record_blocks in enumerate(blocks):
        if not has_image[i]:
            out.append([None] * len(record_blocks))
            continue
        image = next(real)
        out.append([image, next(corrupted)] if len(record_blocks) > 1 else [image])
    return out


def _attends(seg_q: torch.Tensor, seg_kv: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, span: int) -> torch.Tensor:
    """The packed rule, elementwise over broadcast segment ids (``n * span``: the prompt of block n, ``n * span + j +
    1``: answer j in it, -1: pad) and positions: a token sees earlier tokens of its block's prompt and of its own
    answer; padding sees only itself (no empty row)."""
    same_block = (seg_q >= 0) & (seg_kv >= 0) & (seg_q // span == seg_kv // span)
    same = same_block & ((seg_kv % span == 0) | (seg_kv == seg_q))
    return (same & (kv <= q)) | (kv == q)


def _block_mask(segment: torch.Tensor, span: int) -> Any:
    """Flex attention ``BlockMask`` (B, 1, T, T) of :func:`_attends` over the segment ids ``segment`` (B, T)."""
    from torch.nn.attention.flex_attention import create_block_mask  # torch >= 2.5, as flex attention itself

    def mask_mod(b, h, q_idx, kv_idx):
        return _attends(segment[b, q_idx], segment[b, kv_idx], q_idx, kv_idx, span)

    b, width = segment.shape
    return create_block_mask(mask_mod, B=b, H=None, Q_LEN=width, KV_LEN=width, device=segment.device)


def _rows(inputs, pred_row, pred_col, target, slot, num_slots, device, padding_tokens, spans=None) -> Rows:
    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    targets = torch.cat(target) if target else t([])
    return Rows(inputs, t(pred_row), t(pred_col), targets.to(device), t(slot), num_slots, padding_tokens, spans)


def attn_implementation(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return str(getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", "eager"))


def uses_multimodal_rope(model: torch.nn.Module) -> bool:
    """Qwen2-VL-class models compute 3D (time, height, width) positions from the image grid themselves."""
    config = getattr(unwrap(model), "config", None)
    text = getattr(config, "text_config", None) or config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    return isinstance(rope, dict) and "mrope_section" in rope


def multimodal_positions(model: torch.nn.Module) -> Any:
    """For a Qwen-VL-class model, ``rope_index(prompt_ids (P,), image_inputs or None) -> (3, P)``: the multimodal
    rotary positions the model itself gives a prompt alone (its ``get_rope_index``: text 0, 1, 2, ... in all
    three, an image's tokens its time / row / column from the image grid, text after it going on from the largest
    plus one). None for other models, and for one whose positions no ``get_rope_index`` tells."""
    if not uses_multimodal_rope(model):
        return None
    hf = unwrap(model)
    base = getattr(hf, "model", None)
    if not callable(getattr(base, "get_rope_index", None)):
        return None
    image_token = hf.config.image_token_id

    def rope_index(ids: torch.Tensor, image: dict[str, torch.Tensor] | None) -> torch.Tensor:
        if image is None or not bool((ids == image_token).any()):
            return torch.arange(len(ids), device=ids.device).expand(3, -1)
        types = (ids == image_token).long()[None]
        grid = image["image_grid_thw"].to(ids.device)
        positions, _ = base.get_rope_index(ids[None], mm_token_type_ids=types, image_grid_thw=grid)
        return positions[:, 0]

    return rope_index


def add_token_types(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen2-VL-class models need ``mm_token_type_ids`` (1 image, 2 video) to place their 3D positions."""
    if uses_multimodal_rope(model) and "mm_token_type_ids" not in inputs:
        config = unwrap(model).config
        ids = inputs["input_ids"]
        types = (ids == config.image_token_id).long()
        video = getattr(config, "video_token_id", None)
        if video is not None:
            types = types + 2 * (ids == video).long()
        inputs = inputs | {"mm_token_type_ids": types}
    return inputs


def resolve_layout(model: torch.nn.Module, layout: str) -> str:
    """The layout actually used: packed needs a backend that reads 4D masks and plain 1D positions.

    Otherwise the padded layout is used, with a one-time warning saying why.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    impl = attn_implementation(model)
    reason = None
    if layout == "packed" and impl not in MASKABLE:
        reason = f"attention backend {impl!r} cannot take the packed block mask"
    elif layout == "packed" and uses_multimodal_rope(model) and multimodal_positions(model) is None:
        reason = "the model's multimodal rotary positions cannot be computed per record (no get_rope_index)"
    if reason:
        if reason not in _warned:
            _warned.add(reason)
            log.warning("%s; using the padded layout", reason)
        return "padded"
    return layout


def _hidden_and_head(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """Last hidden states (R, T, H) and the LM head, without materialising vocabulary logits."""
    model = unwrap(model)  # PEFT: LoRA layers stay injected in the wrapped model's modules
    base, head = getattr(model, "model", None), model.get_output_embeddings()
    if base is None or head is None:
        return None, None
    out = base(**inputs, use_cache=False)
    return out.last_hidden_state, head


def build_rows(model: torch.nn.Module, batch: dict[str, Any], pad_token_id: int, layout: str = "packed") -> Rows:
    """The rows `answer_logprobs` runs ``model`` on: under the packed layout one padding-free row with flex
    (a ``BlockMask``) or sdpa (per-record attention, `src.models.attention`), one row per record under eager."""
    layout = resolve_layout(model, layout)
    if layout == "padded":
        return padded_rows(batch, pad_token_id)
    impl = attn_implementation(model)
    # an additive float mask, built once, is shared by every layer; with a boolean mask sdpa makes a float copy
    # per layer and keeps each alive for the backward pass (measured: ~5% of peak memory)
    dtype = next(model.parameters()).dtype
    additive = _activation_dtype(model, dtype) if impl in ("eager", "sdpa") else None
    flex = impl == "flex_attention"
    one_row = impl in PADDING_FREE
    rope = multimodal_positions(model)
    return packed_rows(batch, pad_token_id, mask_dtype=additive, block_mask=flex, one_row=one_row, rope_index=rope)


def padding_share(model: torch.nn.Module, batch: dict[str, Any], pad_token_id: int, layout: str = "packed") -> float:
    """The share of padding among the input positions ``model`` runs on for ``batch`` (`build_rows`)."""
    rows = build_rows(model, batch, pad_token_id, layout)
    return rows.padding_tokens / rows.inputs["input_ids"].numel()


def answer_logprobs(
    model: torch.nn.Module, batch: dict[str, Any], pad_token_id: int, layout: str = "packed"
) -> torch.Tensor:
    """Summed log-probs of each answer under ``model``: returns (B, K) float32, columns in answer order."""
    rows = build_rows(model, batch, pad_token_id, layout)
    inputs = add_token_types(model, dict(rows.inputs))
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    if rows.spans is not None:  # sdpa runs the one row's attention record by record
        config = unwrap(model).config
        inputs[attention.KWARG] = attention.RecordSpans(*rows.spans, getattr(config, "text_config", None) or config)
    hidden, head = _hidden_and_head(model, inputs)
    if hidden is not None:
        logits = head(hidden[rows.pred_row, rows.pred_col])  # (N, V): answer-predicting positions only
    else:  # a model without a separable head: full logits, then select
        logits = model(**inputs, use_cache=False).logits[rows.pred_row, rows.pred_col]
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, rows.target.unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(rows.num_slots, dtype=torch.float32, device=token_logps.device)
    out = out.index_add(0, rows.slot, token_logps)
    k, b = batch["answer_lengths"].shape
    return out.view(b, k)


def _activation_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
    """Under autocast (bf16-mixed) the attention scores are in the autocast dtype, not the weights' dtype."""
    if torch.is_autocast_enabled(next(model.parameters()).device.type):
        return torch.get_autocast_dtype(next(model.parameters()).device.type)
    return dtype
