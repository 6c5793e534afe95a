"""Where a model comes from, checked in seconds before anything loads: a local folder, or a hub id that is in the
local Hugging Face cache or (online) exists on the hub.

Loading a missing model through transformers fails late (after the data, or after every answer was generated) and
in many lines: a wrong local path reads as a malformed repo id, an uncached hub id with ``HF_HUB_OFFLINE=1`` as a
chain of connection errors, and without it only after the download retries (close to a minute with no network).
`path_fingerprint` digests what is at a local source, for the cache keys and identities of what a model there made;
`weights_fingerprint` digests the bytes of a local checkpoint's weight files, each file read once (`file_digests`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from src.errors import SettingError
from src.files import locked, write_atomic

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 5.0  # the one request to the hub for a hub id that is not in the local cache
# weight files of a checkpoint folder, whose bytes `weights_fingerprint` digests
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# where `file_digests` keeps the digests it computed; unset: paths.cache_dir's default, logs/cache under the project
DIGEST_CACHE_ENV = "MLLM_BPO_DIGEST_CACHE"
_READ_BYTES = 16 << 20


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # either forbids downloads (huggingface_hub reads both)


def hub_offline() -> str | None:
    """The variable that forbids downloads (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``, read now, not when
    huggingface_hub was imported), to name in messages; None when downloads are allowed."""
    from huggingface_hub import constants

    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}:
            return name
    return "HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else None  # as it was set when huggingface_hub was imported


def looks_like_path(name: str) -> bool:
    """A value meant as a folder: absolute, relative with ./ or ../ or ~, or with more than one "/"."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def check_model_source(name_or_path: str | None, key: str = "model.name_or_path", revision: str | None = None) -> None:
    """Raise `SettingError` (one line naming ``key`` and the value) unless the model can be loaded from here.

    None (the tiny model built from config) is fine. A local folder must hold a checkpoint (config.json) or a
    trained adapter, whose base model is checked in turn. A hub id must be in the local hub cache at ``revision``;
    if not, with ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set that is the error, else one request
    (``HUB_TIMEOUT_S``) asks the hub whether it exists.
    """
    from src.models.lora import adapter_base, is_adapter_folder  # here: lora imports torch, path_fingerprint does not

    if name_or_path is None:
        return
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        if is_adapter_folder(str(local)):
            try:
                base = adapter_base(str(local))
            except ValueError:  # no base named in it: model.lora.base names it, and is checked when building
                return
            return check_model_source(base, f"{key} (base model of the adapter in {name})")
        if not (local / "config.json").is_file():
            raise SettingError(
                f"model path {name}: the folder holds no checkpoint (no config.json or adapter_config.json) ({key})"
            )
        return
    if local.is_file():
        raise SettingError(f"model path {name}: a file, not a folder with a checkpoint ({key})")
    if looks_like_path(name):
        raise SettingError(f"model path {name}: no such folder or checkpoint ({key})")
    _check_hub_id(name, key, revision)


def _check_hub_id(name: str, key: str, revision: str | None) -> None:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    at = f" at revision {revision}" if revision else ""
    try:
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except HFValidationError:  # neither a folder here nor a valid hub id ("org/name")
        raise SettingError(f"model path {name}: no such folder or checkpoint ({key})") from None
    if isinstance(cached, str):
        return
    offline = hub_offline()
    if offline:
        raise SettingError(
            f"model {name}{at} ({key}) is neither a local folder nor in the Hugging Face cache, and {offline} "
            f"forbids downloading it: download it on a machine with network (hf download {name}) into "
            f"this cache (HF_HOME) or a folder, and point {key} at that folder"
        )
    _ask_hub(name, key, revision, at)


def _ask_hub(name: str, key: str, revision: str | None, at: str) -> None:
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return  # it exists; the download asks for the licence and the login itself, with its own message
    except RevisionNotFoundError:
        raise SettingError(f"model {name} ({key}): the hub has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise SettingError(
            f"model {name}{at} ({key}): no such folder here and no such model on the Hugging Face hub (or it is "
            "private: log in with hf auth login)"
        ) from None
    except Exception as e:  # no network, a proxy, a timeout: whatever it is, nothing can be downloaded
        detail = " ".join(str(e).split())[:200]
        raise SettingError(
            f"model {name}{at} ({key}) is neither a local folder nor in the Hugging Face cache, and the hub gave no "
            f"answer within {HUB_TIMEOUT_S:g}s ({type(e).__name__}: {detail}): download it where there is network "
            f"(or set HF_HUB_OFFLINE=1 to use only local files), or point {key} at a local folder"
        ) from None


def path_fingerprint(path: str | os.PathLike[str] | None) -> str | None:
    """A digest of what is at ``path`` as far as a cache key needs it: a file's bytes, a folder's file names,
    sizes and modification times (weights are not read whole); None when nothing is there (a hub id, unset).

    Names, sizes and times suffice to invalidate: a file written again gets a new modification time. Digesting
    the bytes would catch nothing more (`file_digests` itself trusts size and time to know a file unchanged);
    it would only keep the digest of a copied or touched folder, at the price of reading every file once,
    which for an image folder is all its images."""
    if path is None:
        return None
    target = os.path.expanduser(os.fspath(path))
    h = hashlib.sha256()
    if os.path.isfile(target):
        with open(target, "rb") as f:
            h.update(f.read())
    elif os.path.isdir(target):
        for root, dirs, files in os.walk(target):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                st = os.stat(full)
                h.update(f"{os.path.relpath(full, target)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        return None
    return h.hexdigest()[:16]


def digest_cache_path() -> Path:
    """The JSON file of file digests: ``$MLLM_BPO_DIGEST_CACHE``, else logs/cache/file-digests.json under
    ``$PROJECT_ROOT`` (configs/paths/default.yaml's cache_dir)."""
    named = os.environ.get(DIGEST_CACHE_ENV)
    if named:
        return Path(named).expanduser()
    return Path(os.environ.get("PROJECT_ROOT", ".")) / "logs" / "cache" / "file-digests.json"


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns]


def _read_digests(cache: Path) -> dict[str, Any]:
    try:
        entries = json.loads(cache.read_text())
    except (OSError, ValueError):  # no file yet, or a damaged one: digests are computed again
        return {}
    return entries if isinstance(entries, dict) else {}


def file_digests(paths: list[str], cache: Path | None = None) -> dict[str, str]:
    """SHA-256 of each file's bytes, by path. A file is read only when the cache (`digest_cache_path`) has no
    digest for its absolute path at its current size and modification time (ns), so a 7B checkpoint is read
    once, and again only after it was written; new digests are merged into the cache file under its lock."""
    cache = digest_cache_path() if cache is None else Path(cache)
    entries = _read_digests(cache)
    out: dict[str, str] = {}
    new: dict[str, Any] = {}
    for path in paths:
        full = os.path.abspath(os.path.expanduser(path))
        before = os.stat(full)
        entry = entries.get(full)
        if isinstance(entry, dict) and entry.get("stat") == _stat_key(before) and isinstance(entry.get("sha256"), str):
            out[path] = entry["sha256"]
            continue
        h = hashlib.sha256()
        with open(full, "rb") as f:
            while block := f.read(_READ_BYTES):
                h.update(block)
        out[path] = h.hexdigest()
        if _stat_key(os.stat(full)) == _stat_key(before):  # a file written while it was read is not cached
            new[full] = {"stat": _stat_key(before), "sha256": out[path]}
    if new:
        try:
            with locked(cache):  # merged with what other jobs stored meanwhile
                write_atomic(cache, json.dumps(_read_digests(cache) | new, indent=0, sort_keys=True))
        except OSError as e:  # a read-only cache folder: the digests are right, only computed again next time
            log.warning("%s: file digests not cached (%s)", cache, e)
    return out


def weights_fingerprint(path: str | os.PathLike[str] | None, cache: Path | None = None) -> str | None:
    """A digest of the bytes of the weight files (`WEIGHT_SUFFIXES`) in a local checkpoint folder and their names
    in it, or None (a hub id, unset, no weight files). The same checkpoint copied elsewhere gives the same
    digest; each file is read once while unchanged (`file_digests`). This is the files' identity: a model loaded
    from them and then trained, merged or cast is keyed by `src.models.factory.fingerprint` of its weights."""
    if path is None:
        return None
    target = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(target):
        return None
    files = []
    for root, dirs, names in os.walk(target):
        dirs.sort()
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith(WEIGHT_SUFFIXES)]
    if not files:
        return None
    digests = file_digests(files, cache)
    h = hashlib.sha256()
    for full in files:
        h.update(f"{os.path.relpath(full, target)}\0{digests[full]}\n".encode())
    return h.hexdigest()[:16]
