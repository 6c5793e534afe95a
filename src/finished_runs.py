"""A run folder is reused only when it holds a finished run of exactly these settings and input files.

`finished` says whether a folder can be reused; `record_inputs` is written after a run finishes, with the sha256 of
every file its settings name (`file_digests`), so an input edited since (a judge prompt, a phrase list, a data file)
makes the run be redone rather than reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.errors import SettingError

log = logging.getLogger("reproduce")

INPUTS = "inputs.json"  # beside a finished run's config.yaml: the sha256 of every file its settings name


def finished(out_dir: Path, marker: str, cfg: DictConfig, error: type[SettingError] = SettingError) -> bool:
    """Whether ``out_dir`` holds a finished run of exactly ``cfg`` (its ``marker`` file and config.yaml there):
    reuse it. A finished run of other settings raises ``error``, never silently reused or overwritten. A run of the
    same settings whose input files changed since it ran is redone, with a warning."""
    if not (out_dir / marker).is_file() or not (out_dir / "config.yaml").is_file():
        return False
    saved = OmegaConf.to_container(OmegaConf.load(out_dir / "config.yaml"), resolve=True)
    if saved != OmegaConf.to_container(cfg, resolve=True):
        raise error(
            f"{out_dir} holds a finished run with other settings; start the comparison in a new folder "
            "(the default: a new hydra.run.dir per call)"
        )
    if not (out_dir / INPUTS).is_file():
        log.warning("%s: finished without a record of its input files' contents; redoing it", out_dir)
        return False
    before, now = json.loads((out_dir / INPUTS).read_text()), file_digests(cfg)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        log.warning("%s: the contents of %s changed since it ran; redoing it", out_dir, ", ".join(changed))
        return False
    return True


def file_digests(cfg: DictConfig) -> dict[str, str]:
    """``{setting: sha256}`` of every existing file a setting of ``cfg`` names (judge.prompt_file, a phrase list,
    data.path, ids files), so a reused run had the same file contents, not only the same paths. Folders (models,
    image roots, caches) are not hashed: generations are cached by their image inputs and models by fingerprint."""
    out: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")
        elif isinstance(node, str) and "\n" not in node and len(node) < 4096 and Path(node).is_file():
            st = Path(node).stat()
            out[key] = _sha256(str(Path(node).resolve()), st.st_size, st.st_mtime_ns)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """The file's sha256, read once per (path, size, mtime) in this process: every stage names the same data file.
    Content, not size and mtime alone: an edit that keeps the size within the mtime resolution must not be reused."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def record_inputs(out_dir: Path, digests: dict[str, str]) -> None:
    """Written after the run finished: an interrupted re-run leaves the old record, which then does not match."""
    (out_dir / INPUTS).write_text(json.dumps(digests, indent=2, sort_keys=True))
