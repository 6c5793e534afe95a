"""The data module's settings in groups, each group one value.

`ReaderSettings`: which records, read from where, split how. `EncodingSettings`: how long an encoded example may
be. `LoaderSettings`: how batches are served. `DataNeeds`: what the objective needs of every example (its answer
columns, the corrupted image of ``chosen_corrupted``); the objective says it (`src.models.objectives.data_needs`),
the data config does not. The ``data`` config node keeps its flat keys (``data.path``, ``data.max_length``,
``data.batch_size``, ...): `data_settings` sorts them into the groups and refuses a key no group holds, naming
the key that holds a moved setting now.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.data.encoding import ANSWER_KEYS, CORRUPTED, PAIR_KEYS
from src.data.images import check_corruption
from src.errors import SettingError
from src.settings import MOVED

ON_ERROR = ("raise", "skip")


@dataclass(frozen=True)
class ReaderSettings:
    """Where the records come from and how they are split.

    ``path`` (and ``val_path``): a data file, a folder saved by ``datasets``, or a hub id (``format=hf``; ``split``,
    ``val_split``, ``revision``, and ``image_dir`` where its embedded images are written), or a local copy of a public
    set (``format=spa_vl`` / ``rlaif_v``: ``split``, ``val_split``, ``image_dir`` likewise). ``image_root``: where
    relative image paths are looked up; ``missing_images``: error | render (a stand-in of ``stand_in_size``
    pixels, null: the processor's input size). ``ids_file`` / ``max_records``: records left out on purpose.
    ``val_fraction`` of the source conversations is held out (by ``split_seed``) unless ``val_path`` is given.
    ``on_error``: raise at the first bad record | skip (describe, skip and count it).
    """

    path: str
    format: str = "auto"
    split: str | None = None
    val_split: str | None = None
    image_dir: str | None = None
    revision: str | None = None
    image_root: str | None = None
    missing_images: str = "error"
    stand_in_size: int | None = None
    val_fraction: float = 0.1
    val_path: str | None = None
    split_seed: int = 0
    max_records: int | None = None
    ids_file: str | None = None
    on_error: str = "raise"

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {self.on_error!r}")


@dataclass(frozen=True)
class EncodingSettings:
    """``max_length``: prompt (image tokens included) + longest answer; ``min_answer_tokens``: the fewest answer
    tokens a prompt must leave room for, else the record is skipped."""

    max_length: int = 512
    min_answer_tokens: int = 4


@dataclass(frozen=True)
class LoaderSettings:
    """``batch_size`` (``eval_batch_size``, null: the same, for validation), ``num_workers``, and
    ``shuffle_seed``: the training order is a function of (shuffle_seed, epoch) only."""

    batch_size: int = 8
    eval_batch_size: int | None = None
    num_workers: int = 0
    shuffle_seed: int = 0


@dataclass(frozen=True)
class DataNeeds:
    """What every example must carry for the objective: ``answers``, the answer columns in the order they are
    scored (`ANSWER_KEYS`: ``[chosen, rejected]`` for DPO, ``[chosen, rejected, blind]`` for BPO); and
    ``corruption``, how the image of ``chosen_corrupted`` (mDPO's conditional term) is corrupted
    (`check_corruption`), checked whenever it is given, needed only when that column is."""

    answers: tuple[str, ...] = PAIR_KEYS
    corruption: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        answers = (self.answers,) if isinstance(self.answers, str) else tuple(self.answers)
        object.__setattr__(self, "answers", answers)
        unknown = set(answers) - set(ANSWER_KEYS)
        if unknown:
            raise ValueError(f"the answers may be {ANSWER_KEYS}; got unknown {sorted(unknown)}")
        if self.corruption is not None:
            check_corruption(self.corruption)
        if CORRUPTED in answers and self.corruption is None:
            raise SettingError(f"the answers hold {CORRUPTED}: set objective.corruption (e.g. {{kind: crop}})")


GROUPS = (ReaderSettings, EncodingSettings, LoaderSettings)
# keys of a data config that no group holds and that are no error: the class older data configs named
IGNORED = ("_target_",)


def data_settings(data: Mapping[str, Any] | DictConfig) -> tuple[ReaderSettings, EncodingSettings, LoaderSettings]:
    """The flat ``data`` config node sorted into its groups; a key of no group is a `SettingError` naming it (and,
    for a key that moved, the key that holds its setting now)."""
    if isinstance(data, DictConfig):
        data = OmegaConf.to_container(data, resolve=True)
    data = {key: value for key, value in data.items() if key not in IGNORED}
    known = {f.name for group in GROUPS for f in fields(group)}
    for key in data:
        if key in known:
            continue
        moved = MOVED.get(f"data.{key}")
        if moved is not None:
            why = f" {moved.why}" if moved.why else ""
            raise SettingError(f"data.{key} is no setting any more: set {moved.to} instead{why}")
        raise SettingError(f"data.{key} is not a data setting; the data settings are {sorted(known)}")
    if not data.get("path"):
        raise SettingError("data.path is not set: the data file, folder or hub id to read")
    return tuple(group(**{f.name: data[f.name] for f in fields(group) if f.name in data}) for group in GROUPS)


def flat(*groups: Any) -> dict[str, Any]:
    """The groups' settings as one flat mapping (the data module's hyper-parameters, as the config names them)."""
    out: dict[str, Any] = {}
    for group in groups:
        out |= asdict(group)
    return out
