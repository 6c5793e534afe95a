"""The range of every numeric setting, checked on the composed config before any data or model loads.

A setting out of range does not fail loudly later: ``objective.beta=-1`` trains toward the rejected answers and
reports perfect accuracy, ``trainer.max_steps=-5`` fails only after the data and the reference log-probs were
loaded. Each rule names a key and what its value must be; a key the config does not hold (another objective's
setting, say) is not checked. The first value out of range raises a `SettingError` (one line, exit 2). A key that
moved (`MOVED`) is refused wherever it is still given (a ``+key=...`` override, a config file of one's own), naming
the key that holds it now.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from src.errors import SettingError

_ABSENT = object()


@dataclass(frozen=True)
class Range:
    """What a setting's value must be: a number (or an integer) between bounds, open or closed; ``null_ok``: or
    null; ``why``: what a value outside means, said after the range."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    null_ok: bool = False
    why: str = ""

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        bounds = []
        if self.lo is not None:
            bounds.append(f"{'>' if self.lo_open else '>='} {_fmt(self.lo)}")
        if self.hi is not None:
            bounds.append(f"{'<' if self.hi_open else '<='} {_fmt(self.hi)}")
        text = f"{kind} {' and '.join(bounds)}".strip()
        return f"{text} or null" if self.null_ok else text

    def admits(self, value: Any) -> bool:
        if value is None:
            return self.null_ok
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)


@dataclass(frozen=True)
class Moved:
    """A key that is no setting any more: ``to``, the key that holds the setting now; ``why``, said after it."""

    to: str
    why: str = ""


# old key -> where its setting is now
MOVED = {
    "model.system_prompt": Moved("prompt_format.system_prompt", "(the prompt format has a config node of its own)"),
    "image_aspect_ratio": Moved("prompt_format.image_aspect_ratio"),
    "data.image_aspect_ratio": Moved("prompt_format.image_aspect_ratio"),
    "data.answers": Moved("objective.answers", "(the objective says what it scores; src/validate.py: answers)"),
    "data.corruption": Moved("objective.corruption", "(the objective says what its conditional term compares)"),
}


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE = Range(lo=0, lo_open=True)
NON_NEGATIVE = Range(lo=0)
COUNT = Range(lo=1, integer=True)  # a size or a number of things, at least one
OPTIONAL_COUNT = Range(lo=1, integer=True, null_ok=True)
SEED = Range(lo=0, hi=2**32 - 1, integer=True)

# what an answer-generation block (blind answers, generate.py, eval.py) holds
GENERATION = {
    "max_new_tokens": COUNT,
    "batch_size": COUNT,
    "temperature": Range(lo=0, lo_open=True, why="(do_sample=false ignores it)"),
    "top_p": Range(lo=0, hi=1, lo_open=True),
    "max_length": COUNT,
}

# keys of train.yaml (and of the configs that reuse its groups); "*" stands for every key of a mapping
TRAIN = {
    "seed": SEED,
    "objective.beta": Range(
        lo=0, lo_open=True, why="(beta <= 0 trains toward the rejected answers, or not at all, and looks perfect)"
    ),
    "objective.blind_weight": NON_NEGATIVE,
    "objective.label_smoothing": Range(
        lo=0, hi=0.5, hi_open=True, why="(the share of pairs taken as flipped: at 0.5 no preference is left)"
    ),
    "objective.nll_weight": NON_NEGATIVE,
    "objective.gamma": NON_NEGATIVE,
    "objective.terms.*": NON_NEGATIVE,
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.betas.*": Range(lo=0, hi=1, hi_open=True),
    "optim.warmup_steps": Range(lo=0, integer=True),
    "data.max_length": COUNT,
    "data.min_answer_tokens": COUNT,
    "data.val_fraction": Range(lo=0, hi=1, hi_open=True, why="(0: no validation split)"),
    "data.split_seed": SEED,
    "data.shuffle_seed": SEED,
    "data.stand_in_size": OPTIONAL_COUNT,
    "data.max_records": OPTIONAL_COUNT,
    "data.batch_size": COUNT,
    "data.eval_batch_size": OPTIONAL_COUNT,
    "data.num_workers": Range(lo=0, integer=True),
    "trainer.max_steps": Range(lo=-1, integer=True, why="(-1: no limit)"),
    "trainer.max_epochs": Range(lo=-1, integer=True, null_ok=True, why="(-1: no limit)"),
    "trainer.min_epochs": Range(lo=0, integer=True, null_ok=True),
    "trainer.accumulate_grad_batches": COUNT,
    "trainer.gradient_clip_val": Range(lo=0, null_ok=True, why="(null or 0: no clipping)"),
    "trainer.log_every_n_steps": COUNT,
    "trainer.check_val_every_n_epoch": OPTIONAL_COUNT,
    "trainer.num_sanity_val_steps": Range(lo=-1, integer=True),
    "reference.batch_size": COUNT,
    "model.lora.r": COUNT,
    "model.lora.alpha": POSITIVE,
    "model.lora.dropout": Range(lo=0, hi=1, hi_open=True),
    **{f"blind.generation.{key}": rule for key, rule in GENERATION.items()},
    "plan.device_memory_gb": Range(lo=0, lo_open=True, null_ok=True, why="(null: the CUDA device's)"),
    **MOVED,
}

# keys of eval.yaml and generate.yaml
EVALUATE = {
    "seed": SEED,
    **{f"generation.{key}": rule for key, rule in GENERATION.items()},
    "scoring.max_length": COUNT,
    "scoring.batch_size": COUNT,
    "report.examples": Range(lo=0, integer=True),
    **{k: v for k, v in TRAIN.items() if k.startswith("data.")},
    **MOVED,
}


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _values(cfg: Any, key: str) -> Iterable[tuple[str, Any]]:
    """(full key, value) of ``key`` in ``cfg``, every item of a mapping or list where it ends in ``.*``."""
    base, star = (key[:-2], True) if key.endswith(".*") else (key, False)
    value = OmegaConf.select(cfg, base, default=_ABSENT) if isinstance(cfg, DictConfig) else _select(cfg, base)
    if value is _ABSENT:
        return []
    value = _plain(value)
    if not star:
        return [(base, value)]
    if isinstance(value, Mapping):
        return [(f"{base}.{k}", v) for k, v in value.items() if not isinstance(v, Mapping)]
    if isinstance(value, (list, tuple)):
        return [(f"{base}[{i}]", v) for i, v in enumerate(value)]
    return [(base, value)] if value is not None else []


def _select(cfg: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(cfg, Mapping) or part not in cfg:
            return _ABSENT
        cfg = cfg[part]
    return cfg


def check_ranges(cfg: Any, rules: Mapping[str, Range | Moved]) -> None:
    """Raise a `SettingError` naming the first setting of ``cfg`` (a config or a nested mapping) out of its range,
    or the first key it holds that moved (a `Moved` rule)."""
    for key, rule in rules.items():
        for name, value in _values(cfg, key):
            if isinstance(rule, Moved):
                why = f" {rule.why}" if rule.why else ""
                raise SettingError(f"{name} is no setting any more: set {rule.to} instead{why}")
            if not rule.admits(value):
                why = f" {rule.why}" if rule.why else ""
                numeric = isinstance(value, int if rule.integer else (int, float)) and not isinstance(value, bool)
                what = "is out of range" if numeric else f"is not {'an integer' if rule.integer else 'a number'}"
                raise SettingError(f"{name}={value!r} {what}: it must be {rule.describe()}{why}")
