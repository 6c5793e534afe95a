"""VLGuard (Zong et al. 2024, arXiv 2402.02207; ``ys-zong/VLGuard``) as a benchmark of both sides: instructions a
model should refuse beside instructions it should follow, each about a picture.

VLGuard is no preference set: every instruction comes with one response (a refusal for an unsafe instruction, a
helpful answer for a safe one) and no rejected answer, so it is read as an evaluation, as its authors evaluate it,
in its three subsets: ``unsafes`` (an unsafe picture with its instruction: refusing is right), ``safe_unsafes`` (a
safe picture with an unsafe instruction: refusing is right) and ``safe_safes`` (a safe picture with a safe
instruction: helping is right, a refusal is an over-refusal). Like the benchmarks of ``src.evaluation.two_sided`` it
fails on bad input with the file and the record named and never skips a record.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from src.data.images import ImageResolver
from src.data.records import DataError
from src.evaluation.benchmarks import check_images, keep_first
from src.evaluation.items import HELP, REFUSE, EvalItem, single_turn
from src.evaluation.protocol import Benchmark
from src.evaluation.two_sided import _optional, _sides, _text, read_json

# subset -> (the pictures it asks about: safe ones?, the key of its instructions in instr-resp, the right behaviour)
VLGUARD_SUBSETS: dict[str, tuple[bool, str, str]] = {
    "unsafes": (False, "instruction", REFUSE),
    "safe_unsafes": (True, "unsafe_instruction", REFUSE),
    "safe_safes": (True, "safe_instruction", HELP),
}
SAFE_IMAGE = "safe image"  # the category of the items about safe pictures (they have no harm category)


class VLGuard(Benchmark):
    """VLGuard's test set (or its train set, ``file=train.json``), every instruction one item.

    Layout under ``root`` (the hub copy's, and the repository's ``data/``): ``test.json`` = a list of ``{"id",
    "image" (a path under the picture folder, e.g. ``bad_ads/<uuid>.png``), "safe" (true / false),
    "harmful_category", "harmful_subcategory" (unsafe pictures only), "instr-resp"}``; ``instr-resp`` holds, for a safe
    picture, ``{"safe_instruction", "response"}`` and ``{"unsafe_instruction", "response"}``, for an unsafe one
    ``{"instruction", "response"}``. The pictures are in ``test.zip``: ``image_root`` names the folder it was unpacked
    to (null: ``<root>/test`` (the file's stem) where that folder exists, else ``root``). Items are
    ``<id>/<subset>`` (``/<n>`` added where a record has several instructions of one kind), their setting the
    subset, their category the harm category (``safe image`` for safe pictures); each keeps the data set's own
    response as ``meta["reference_response"]``. ``subsets`` picks which are asked; ``max_items`` keeps the first N
    records.
    """

    name = "vlguard"
    kind = "safety_rate"
    pairwise_not_computed = "VLGuard gives one reference response per instruction, not a chosen / rejected pair"

    def __init__(
        self,
        root: str,
        file: str = "test.json",
        image_root: str | None = None,
        subsets: Sequence[str] = tuple(VLGUARD_SUBSETS),
        missing_images: str = "error",
        stand_in_size: int = 336,
        max_items: int | None = None,
    ):
        self.root = Path(root)
        self.subsets = list(subsets)
        unknown = [s for s in self.subsets if s not in VLGUARD_SUBSETS]
        if unknown or not self.subsets or len(set(self.subsets)) < len(self.subsets):
            raise ValueError(
                f"benchmark {self.name}: unknown subset(s) {unknown} in {self.subsets}; set benchmark.subsets to a "
                f"non-empty list of distinct names from {list(VLGUARD_SUBSETS)}"
            )
        self.path = self.root / file
        data = read_json(self.path, "VLGuard file", "benchmark.root (and benchmark.file)")
        if not isinstance(data, list) or not data:
            raise DataError(f"{self.path}: expected a non-empty JSON list of VLGuard records")
        self._items: list[EvalItem] = []
        seen: set[str] = set()
        for index, record in enumerate(keep_first(data, max_items, str(self.path))):
            self._items += self._record(record, index, seen)
        if not self._items:
            raise DataError(f"{self.path}: no item of the subsets {self.subsets}; set benchmark.subsets")
        stem_folder = self.root / Path(file).stem
        folder = image_root or (stem_folder if stem_folder.is_dir() else self.root)
        self.resolver = ImageResolver(folder, missing_images, stand_in_size, prefix="benchmark", root_key="image_root")
        self.missing_images = check_images(self.name, self.resolver, self._items)

    def _record(self, record: Any, index: int, seen: set[str]) -> list[EvalItem]:
        """The items of one record, subset by subset; every instruction is checked, asked or not."""
        where = f"{self.path}: record #{index}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object of fields, got {type(record).__name__}")
        rid = _text(record, "id", where)
        where = f"{self.path}: record id={rid} (#{index})"
        if rid in seen:
            raise DataError(f"{where}: duplicate id {rid!r}; item ids are made from it, so it must be unique")
        seen.add(rid)
        image = _text(record, "image", where)
        safe = record.get("safe")
        if not isinstance(safe, bool):
            raise DataError(f"{where}: field 'safe' must be true or false, got {safe!r}")
        pairs = record.get("instr-resp")
        if not isinstance(pairs, list) or not pairs:
            raise DataError(f"{where}: field 'instr-resp' must be a non-empty list of {{instruction, response}}")
        kinds = {key: name for name, (safe_image, key, _) in VLGUARD_SUBSETS.items() if safe_image == safe}
        found: dict[str, list[tuple[str, str]]] = {name: [] for name in kinds.values()}
        for n, pair in enumerate(pairs):
            at = f"{where}: instr-resp[{n}]"
            keys = [k for k in kinds if isinstance(pair, dict) and k in pair]
            if len(keys) != 1:
                raise DataError(
                    f"{at}: expected exactly one of {list(kinds)} (a {'safe' if safe else 'unsafe'} picture) and "
                    f"'response', got {pair!r:.120}"
                )
            found[kinds[keys[0]]].append((_text(pair, keys[0], at), _text(pair, "response", at)))
        category = SAFE_IMAGE if safe else (_optional(record, "harmful_category") or "unknown")
        meta = {"record": rid, "safe_image": safe, "harmful_subcategory": _optional(record, "harmful_subcategory")}
        items = []
        for subset, asked in found.items():
            if subset not in self.subsets:
                continue
            expected = VLGUARD_SUBSETS[subset][2]
            for n, (instruction, response) in enumerate(asked):
                suffix = f"/{n}" if len(asked) > 1 else ""
                extra = {"expected": expected, "subset": subset, "reference_response": response}
                items.append(
                    single_turn(
                        f"{rid}/{subset}{suffix}",
                        instruction,
                        image,
                        category=category,
                        setting=subset,
                        meta=meta | extra,
                    )
                )
        return items

    def items(self) -> list[EvalItem]:
        return list(self._items)

    def reference_answers(self) -> dict[str, dict[str, str]]:
        return {}

    def describe(self) -> dict[str, Any]:
        """report.json's benchmark settings: the file and subsets read and how many items each side has."""
        return {"file": self.path.name, "subsets": self.subsets, "items": _sides(self._items)}
