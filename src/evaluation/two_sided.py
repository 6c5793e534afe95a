"""Benchmarks that score both sides: harmful items (refusing is right: the safety rate) beside harmless ones (helping
is right: the over-refusal rate), so that a model refusing everything cannot look safest.

- `MSSBench` (Multimodal Situational Safety, Zhou et al. 2024, arXiv 2410.06172): each request is asked with a
  picture of a situation where helping is fine and with one where it is not.
- `MOSSBench` (multimodal over-sensitivity, Li et al. 2024, arXiv 2406.17806): harmless requests with pictures that
  look alarming, and (its contrast set) truly harmful requests about the same pictures.

Like the readers of ``src.evaluation.benchmarks`` they are built by Hydra from ``configs/benchmark/*.yaml``, are a
`Benchmark` (``src.evaluation.protocol``), fail on bad input with the file and the record named and never skip a
record. Each item's ``meta["expected"]`` says which side it is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from src.data.images import ImageResolver
from src.data.readers import load_json
from src.data.records import DataError
from src.evaluation.benchmarks import check_images, keep_first
from src.evaluation.items import HELP, REFUSE, EvalItem, is_harmless, single_turn
from src.evaluation.protocol import Benchmark
from src.files import file_problem

MSSBENCH_TASKS = ("chat", "embodied")
# MOSSBench's metadata "over": the three kinds of stimulus that trigger over-sensitivity
MOSSBENCH_TYPES = {"type 1": "Exaggerated Risk", "type 2": "Negated Harm", "type 3": "Counterintuitive Interpretation"}
# MOSSBench's two sets: folder under the root -> (item setting, expected behaviour)
MOSSBENCH_SETS = {"data": ("benign", HELP), "data_contrast": ("contrast", REFUSE)}
MOSSBENCH_INFO = PurePosixPath("images_information") / "information.json"


def read_json(path: Path, what: str, setting: str) -> Any:
    """A JSON file's content; a missing, unreadable or invalid file is a `DataError` naming it and ``setting``."""
    problem = file_problem(path)  # looked at, not opened: a FIFO would block the read for ever
    if problem is not None:
        raise DataError(f"{path}: the {what} is {problem}; point {setting} at the benchmark's folder")
    return load_json(path)


def _text(record: dict[str, Any], key: str, where: str) -> str:
    """A required non-empty string field, stripped."""
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _texts(record: dict[str, Any], key: str, where: str) -> list[str]:
    """A required non-empty list of non-empty strings, stripped."""
    values = record.get(key)
    if not isinstance(values, list) or not values:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of strings, got {values!r}")
    bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
    if bad:
        raise DataError(f"{where}: {key}[{bad[0]}] must be a non-empty string, got {values[bad[0]]!r}")
    return [v.strip() for v in values]


def _optional(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _sides(items: list[EvalItem]) -> dict[str, int]:
    harmless = sum(map(is_harmless, items))
    return {"harmful": len(items) - harmless, "harmless": harmless}


class MSSBench(Benchmark):
    """MSSBench: every request twice, with a picture where helping is safe and one where it is not.

    Layout under ``root``: ``combined.json`` = ``{"chat": [...], "embodied": [...]}`` with the pictures under
    ``chat/`` and ``embodied/``. A chat record has ``safe_image_path``, ``unsafe_image_path`` (file names under
    ``chat/``), ``queries`` (questions asked with both pictures) and ``intent``, ``unsafe_image`` (a description of
    the unsafe picture), ``Type``; an embodied record has ``safe``, ``unsafe`` (under ``embodied/``),
    ``safe_instructions`` / ``unsafe_instructions`` (paired lists; a record with only ``safe_instruction`` /
    ``unsafe_instruction`` gives one pair), ``task``, ``category``. With the safe picture the right answer helps
    (``expected`` help: a refusal is an over-refusal), with the unsafe one it refuses or warns (``expected``
    refuse). Records have no ids: items are named by task, record index, query index and side
    (``chat/3/1/unsafe``). ``chat_prefix`` / ``embodied_prefix`` go before every question (the benchmark's own
    instruction prompts are not shipped here); ``max_per_task`` keeps the first N records of each task.
    """

    name = "mssbench"
    kind = "safety_rate"

    def __init__(
        self,
        root: str,
        file: str = "combined.json",
        tasks: Sequence[str] = MSSBENCH_TASKS,
        missing_images: str = "error",
        stand_in_size: int = 336,
        max_per_task: int | None = None,
        chat_prefix: str = "",
        embodied_prefix: str = "",
    ):
        self.root = Path(root)
        self.tasks = list(tasks)
        unknown = [t for t in self.tasks if t not in MSSBENCH_TASKS]
        if unknown or not self.tasks or len(set(self.tasks)) < len(self.tasks):
            raise ValueError(
                f"benchmark {self.name}: unknown task(s) {unknown} in {self.tasks}; set benchmark.tasks to a "
                f"non-empty list of distinct names from {list(MSSBENCH_TASKS)}"
            )
        self.path = self.root / file
        data = read_json(self.path, "MSSBench file", "benchmark.root (and benchmark.file)")
        if not isinstance(data, dict):
            raise DataError(f'{self.path}: expected a JSON object {{"chat": [...], "embodied": [...]}}')
        self.prefixes = {"chat": chat_prefix, "embodied": embodied_prefix}
        self._items: list[EvalItem] = []
        for task in self.tasks:
            records = data.get(task)
            if not isinstance(records, list) or not records:
                raise DataError(
                    f"{self.path}: no {task} records (expected a non-empty list under {task!r}); "
                    f"set benchmark.tasks to the tasks the file has, of {list(MSSBENCH_TASKS)}"
                )
            records = keep_first(records, max_per_task, f"{self.path} ({task})")
            for index, record in enumerate(records):
                where = f"{self.path}: {task} record {index}"
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected an object of fields, got {type(record).__name__}")
                self._items += self._chat(record, index, where) if task == "chat" else self._embodied(record, index)
        self.resolver = ImageResolver(self.root, missing_images, stand_in_size, prefix="benchmark", root_key="root")
        self.missing_images = check_images(self.name, self.resolver, self._items)

    def _pair(
        self, ids: str, texts: tuple[str, str], images: tuple[str, str], described: tuple[str, str], meta: dict
    ) -> list[EvalItem]:
        """The item with the safe picture (helping is right), then the one with the unsafe picture."""
        task = meta["task"]
        out = []
        sides = zip(("safe", "unsafe"), texts, images, described, (HELP, REFUSE), strict=True)
        for side, text, image, what, expected in sides:
            out.append(
                single_turn(
                    f"{ids}/{side}",
                    self.prefixes[task] + text,
                    f"{task}/{image}",
                    category=f"{task}/{meta.get('type') or 'all'}",
                    setting=f"{side}_image",
                    # a stand-in picture draws what the situation is; stand-ins are counted by picture
                    meta=meta | {"expected": expected, "key_phrase": what, "record_id": f"{task}/{image}"},
                )
            )
        return out

    def _chat(self, record: dict[str, Any], index: int, where: str) -> list[EvalItem]:
        images = (_text(record, "safe_image_path", where), _text(record, "unsafe_image_path", where))
        queries = _texts(record, "queries", where)
        intent, unsafe = _optional(record, "intent"), _optional(record, "unsafe_image")
        meta = {"task": "chat", "record": index, "type": _optional(record, "Type"), "intent": intent}
        items = []
        for q, query in enumerate(queries):
            described = (intent or query, unsafe or query)
            items += self._pair(f"chat/{index}/{q}", (query, query), images, described, meta | {"query_index": q})
        return items

    def _embodied(self, record: dict[str, Any], index: int) -> list[EvalItem]:
        where = f"{self.path}: embodied record {index}"
        images = (_text(record, "safe", where), _text(record, "unsafe", where))
        pairs = []
        for side in ("safe", "unsafe"):
            plural, single = f"{side}_instructions", f"{side}_instruction"
            if plural in record or single not in record:
                pairs.append(_texts(record, plural, where))
            else:
                pairs.append([_text(record, single, where)])
        if len(pairs[0]) != len(pairs[1]):
            raise DataError(
                f"{where}: {len(pairs[0])} safe and {len(pairs[1])} unsafe instructions; they are asked in pairs"
            )
        meta = {"task": "embodied", "record": index, "type": _optional(record, "category")}
        meta["embodied_task"] = _optional(record, "task")
        observed = (_optional(record, "observation_safe"), _optional(record, "observation_unsafe"))
        items = []
        for q, (safe, unsafe) in enumerate(zip(*pairs, strict=True)):
            described = (observed[0] or safe, observed[1] or unsafe)
            items += self._pair(f"embodied/{index}/{q}", (safe, unsafe), images, described, meta | {"query_index": q})
        return items

    def items(self) -> list[EvalItem]:
        return list(self._items)

    def reference_answers(self) -> dict[str, dict[str, str]]:
        return {}

    def describe(self) -> dict[str, Any]:
        """report.json's benchmark settings: the tasks read and how many items each side has."""
        return {"tasks": self.tasks, "items": _sides(self._items)}


class MOSSBench(Benchmark):
    """MOSSBench: harmless requests with alarming-looking pictures (helping is right), and with ``contrast`` its
    contrast set: harmful requests about the same pictures (refusing is right).

    Layout under ``root`` (the benchmark repository's): ``data/images_information/information.json`` =
    ``{pid: {"pid", "question", "image", "short description", "description", "metadata": {"over": "type 1" |
    "type 2" | "type 3", "human", "child", "syn", "ocr", "harm"}}}``, image paths relative to ``data/``
    (``images/1.png``); the contrast set likewise under ``data_contrast/`` (its metadata has ``over`` only). The
    over-sensitivity types are Exaggerated Risk (type 1), Negated Harm (type 2) and Counterintuitive Interpretation
    (type 3), each item's category. Items are ``benign/<pid>`` and ``contrast/<pid>``, in pid order (numbers
    numerically); ``max_items`` keeps the first N of each set.
    """

    name = "mossbench"
    kind = "safety_rate"

    def __init__(
        self,
        root: str,
        contrast: bool = True,
        missing_images: str = "error",
        stand_in_size: int = 336,
        max_items: int | None = None,
    ):
        self.root = Path(root)
        self.contrast = bool(contrast)
        self._items: list[EvalItem] = []
        for folder, (setting, expected) in MOSSBENCH_SETS.items():
            if folder == "data_contrast" and not self.contrast:
                continue
            path = self.root / folder / MOSSBENCH_INFO
            key = "benchmark.root"
            if setting == "contrast":
                key += " (or set benchmark.contrast=false: no contrast set)"
            data = read_json(path, f"MOSSBench {setting} file", key)
            if not isinstance(data, dict) or not data:
                raise DataError(f"{path}: expected a non-empty JSON object {{pid: {{question, image, metadata}}}}")
            rows = sorted(data.items(), key=lambda kv: (0, int(kv[0]), "") if kv[0].isdigit() else (1, 0, kv[0]))
            for pid, row in keep_first(rows, max_items, str(path)):
                self._items.append(self._item(path, folder, setting, expected, pid, row))
        self.resolver = ImageResolver(self.root, missing_images, stand_in_size, prefix="benchmark", root_key="root")
        self.missing_images = check_images(self.name, self.resolver, self._items)

    def _item(self, path: Path, folder: str, setting: str, expected: str, pid: str, row: Any) -> EvalItem:
        where = f"{path}: pid {pid}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object of fields, got {type(row).__name__}")
        if "pid" in row and str(row["pid"]) != pid:
            raise DataError(f'{where}: its "pid" field says {row["pid"]!r}; the key and the field must agree')
        question, image = _text(row, "question", where), _text(row, "image", where)
        metadata = row.get("metadata")
        over = metadata.get("over") if isinstance(metadata, dict) else None
        if over not in MOSSBENCH_TYPES:
            raise DataError(f"{where}: metadata.over must be one of {list(MOSSBENCH_TYPES)}, got {over!r}")
        described = _optional(row, "short description") or question
        meta = {k: v for k, v in metadata.items() if k != "over"}
        meta |= {"pid": pid, "over": over, "expected": expected, "key_phrase": described}
        meta["record_id"] = f"{folder}/{pid}"  # stand-ins are counted by picture
        return single_turn(
            f"{setting}/{pid}",
            question,
            str(PurePosixPath(folder) / image),
            category=MOSSBENCH_TYPES[over],
            setting=setting,
            meta=meta,
        )

    def items(self) -> list[EvalItem]:
        return list(self._items)

    def reference_answers(self) -> dict[str, dict[str, str]]:
        return {}

    def describe(self) -> dict[str, Any]:
        """report.json's benchmark settings: whether the contrast set was read and how many items each side has."""
        return {"contrast": self.contrast, "items": _sides(self._items)}
