"""Build a multimodal preference data set from text-only preference data (modality interpretation).

python src/build_dataset.py input=hh.jsonl output_dir=data/built                       # offline
python src/build_dataset.py input=hh.jsonl output_dir=data/built ner=transformers image=wikipedia \
    image.enabled=true rephrase=model rephrase.base_url=http://localhost:8000/v1 rephrase.model=...

Writes ``<output_dir>/data.json`` (MMSafe-PO: train with ``data=mmsafe_po data.path=<output_dir>/data.json``),
``images/`` and ``report.json``. Stage results are kept under ``<output_dir>/work/``: a re-run continues.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python src/<entry>.py), not imported as src.<entry>: see _bootstrap.py
    import _bootstrap  # noqa: F401

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from src.data.records import DataError
from src.databuilder.base import BuildError
from src.databuilder.pipeline import DatasetBuilder
from src.databuilder.readers import read_text_pairs
from src.errors import run_hydra, task_started

log = logging.getLogger("build_dataset")


def build(cfg: DictConfig) -> dict[str, Any]:
    if cfg.on_error not in ("raise", "skip"):
        raise BuildError(f"on_error must be 'raise' or 'skip', got {cfg.on_error!r}")
    problems: list[str] | None = [] if cfg.on_error == "skip" else None
    pairs = read_text_pairs(cfg.input, cfg.input_format, problems)
    bad = len(problems or [])
    log.info(
        "read %d records from %s: %d conversations, %d bad (skipped)", len(pairs) + bad, cfg.input, len(pairs), bad
    )
    beyond = max(0, len(pairs) - cfg.max_records) if cfg.max_records else 0
    if beyond:
        log.info("building from the first %d conversations (max_records)", cfg.max_records)
        pairs = pairs[: cfg.max_records]
    settings = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("ner", "image", "rephrase")}
    builder = DatasetBuilder(
        recognizer=hydra.utils.instantiate(cfg.ner),
        matcher=hydra.utils.instantiate(cfg.image),
        rephraser=hydra.utils.instantiate(cfg.rephrase),
        output_dir=cfg.output_dir,
        stage_settings=settings,
        entity_types=list(cfg.entity_types),
        max_entities=cfg.max_entities,
        min_entity_chars=cfg.min_entity_chars,
        phrases=OmegaConf.to_container(cfg.phrases, resolve=True) if cfg.phrases else None,
        record_type=cfg.record_type,
        ner_batch_size=cfg.ner_batch_size,
        rephrase_batch_size=cfg.rephrase_batch_size,
        progress=cfg.progress,
    )
    inputs = {"input": str(cfg.input), "max_records": cfg.max_records, "settings": settings}
    return builder.run(pairs, problems, inputs, beyond)


def summary(report: dict[str, Any], output_dir: str) -> str:
    p, e, r = report["pairs"], report["entities"], report["records"]
    drops = f" {json.dumps(e['image_drop_reasons'])}" if e["image_drop_reasons"] else ""
    lines = [
        f"input records read: {p['read']}  (bad {p['bad_record']}, no entity {p['no_entity']}, "
        f"no image {p['no_image']}, used {p['used']}"
        + (f", beyond max_records {p['beyond_max_records']})" if p["beyond_max_records"] else ")"),
        f"entities found: {e['found']} {json.dumps(e['found_by_type'])}; images matched {e['images_matched']} "
        f"of {e['distinct_looked_up']} looked up{drops}",
        f"records written: {r['written']} {json.dumps(r['by_entity_type'])} -> {Path(output_dir) / 'data.json'}",
    ]
    lines.append(f"questions made by: {json.dumps(r['rephrased_by'])}")
    if r["rephrase_fallbacks"]:
        lines.append(
            f"rephrase fell back to the rule-based turn for {sum(r['rephrase_fallbacks'].values())} records: "
            f"{json.dumps(r['rephrase_fallbacks'])} (asked again on the next run)"
        )
    if report["problems"]:
        listed = "all" if not report["problems_not_shown"] else f"the first {len(report['problems'])}"
        lines.append(
            f"bad input records: {p['bad_record']} ({listed} in {Path(output_dir) / 'report.json'}), the first: "
            f"{report['problems'][0]}"
        )
    if report["components"]["ner"] == "fallback":
        lines.append("entities came from the offline fallback recognizer (weaker): ner=transformers is the paper's")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../configs", config_name="build_dataset")
def main(cfg: DictConfig) -> None:
    task_started()
    try:
        report = build(cfg)
    except (BuildError, DataError) as e:  # a problem the user can fix: say what and where, no stack trace
        log.error("build_dataset: %s", e)
        sys.exit(2)
    except MissingMandatoryValue as e:
        log.error("build_dataset: %s is required, e.g. %s=<path>", e.full_key, e.full_key)
        sys.exit(2)
    print(summary(report, cfg.output_dir))


if __name__ == "__main__":
    run_hydra(main)
