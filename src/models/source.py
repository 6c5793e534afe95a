"""Where a model comes from, checked in seconds before anything loads: a local folder, or a hub id that is in the
local Hugging Face cache or (online) exists on the hub.

Loading a missing model through transformers fails late (after the data, or after every answer was generated) and
in many lines: a wrong local path reads as a malformed repo id, an uncached hub id with ``HF_HUB_OFFLINE=1`` as a
chain of connection errors, and without it only after the download retries (close to a minute with no network).
`path_fingerprint` digests what is at a local source, for the cache keys and identities of what a model there made.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from src.errors import SettingError

HUB_TIMEOUT_S = 5.0  # the one request to the hub for a hub id that is not in the local cache


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
    if not, with ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set that is the error, else one request (``HUB_TIMEOUT_S``) asks the hub
    whether it exists.
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
    sizes and modification times (weights are not read whole); None when nothing is there (a hub id, unset)."""
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
