"""Model names to local folders: a folder as given, or a Hugging Face hub id (`org/name`)
through the local Hugging Face cache (`HF_HUB_OFFLINE=1` never leaves it).

Every service and the learner resolve their models here once, at start, so a wrong path or
id stops the start with one line naming it, and pushes and versions read the same files
vLLM and transformers load.
"""

from __future__ import annotations

import os


class ModelNotFound(FileNotFoundError):
    """A model name that is neither a local folder nor a hub id the cache (or the hub) has."""


def resolve_model(name: str) -> str:
    """The local folder of `name`: the folder itself, or the cached snapshot of a hub id."""
    if os.path.isdir(name):
        return name
    looks_like_path = name.startswith(("/", ".", "~")) or os.sep * 2 in name or name.count("/") > 1
    if looks_like_path or os.path.exists(name):
        raise ModelNotFound(f"model {name!r}: no such folder")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelNotFound(f"model {name!r}: neither a folder nor a Hugging Face model id (org/name)") from None
    try:
        return snapshot_download(name, local_files_only=True)
    except Exception as cached_error:  # not in the cache
        if constants.HF_HUB_OFFLINE:
            raise ModelNotFound(f"model {name!r}: not a folder, and not in the Hugging Face cache "
                                f"{constants.HF_HUB_CACHE} (HF_HUB_OFFLINE is set)") from cached_error
    try:
        return snapshot_download(name)
    except Exception as err:
        raise ModelNotFound(f"model {name!r}: not a folder, not in the Hugging Face cache "
                            f"{constants.HF_HUB_CACHE}, and the hub did not give it ({type(err).__name__})") from None

