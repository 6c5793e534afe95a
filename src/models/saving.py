"""What a finished training run keeps: the policy as a plain Hugging Face checkpoint with its processor (gathered from
the shards under FSDP / ZeRO-3; under PEFT the adapter beside a merged model), and how its prompts were built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from src.data.prompt_format import PromptFormat
from src.models.distributed import policy_state_dict
from src.models.lora import is_peft, save_adapter_and_merged


def save_trained(trainer: Any, module: Any, out_dir: Path, prompt_format: PromptFormat) -> Path | None:
    """Save the trained policy to ``out_dir/model`` (and a PEFT adapter to ``out_dir/adapter``), with
    ``prompt_format`` in `PROMPT_FORMAT_FILE` so an evaluation can check it builds prompts the same way.

    Call it on every process: gathering a sharded policy is a collective. Returns the model folder on the process
    that wrote it (global rank 0), None on the others.
    """
    sharded = not is_peft(module.policy) and trainer.world_size > 1
    state = policy_state_dict(trainer) if sharded else None  # collective under FSDP / ZeRO-3
    if not trainer.is_global_zero:
        return None
    model_dir = out_dir / "model"
    if is_peft(module.policy):  # the adapter, and the merged model as a plain HF checkpoint
        save_adapter_and_merged(module.policy, module.processor, out_dir / "adapter", model_dir)
    else:
        module.policy.save_pretrained(model_dir, state_dict=state)
        module.processor.save_pretrained(model_dir)
    prompt_format.write(model_dir)
    return model_dir
