"""Captioner weights from the Hugging Face hub on first use: a console progress bar, no partial file left.

huggingface_hub writes into ``*.incomplete`` files and renames them when done; a failed download (offline,
stopped, no disk) leaves those behind, so they are removed here and the caller gets one sentence, not a traceback.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lora_train.caption.errors import WeightsMissingError


def hub_file(repo: str, filename: str, folder: Path | None, allow_download: bool, what: str) -> Path:
    """``filename`` of hub ``repo``: from ``folder`` (downloaded there when missing) or, without a folder, the hub
    cache. Raises WeightsMissingError naming the file and where it comes from when it cannot be had."""
    if folder is not None and (folder / filename).is_file():
        return folder / filename
    from huggingface_hub import hf_hub_download

    url = f"https://huggingface.co/{repo}/blob/main/{filename}"
    created = folder is not None and not folder.exists()
    try:
        local = {"local_dir": str(folder)} if folder is not None else {}
        return Path(hf_hub_download(repo, filename, local_files_only=not allow_download, **local))
    except Exception as exc:  # noqa: BLE001 - offline, HTTP, disk: all become one message
        _remove_partials(repo, folder, created)
        where = f"put it at {folder / filename}" if folder is not None else "download it"
        if not allow_download:
            raise WeightsMissingError(f"{what} not found and downloads are off: {where} from {url}.",
                                      downloads_off=True) from None
        reason = _reason(exc)
        raise WeightsMissingError(f"{what} could not be downloaded ({reason}); {where} from {url} while "
                                  "online.") from None


def _reason(exc: Exception) -> str:
    """Why a download failed, in a few words (the hub's own messages run to several sentences)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and type(exc).__name__ in ("OfflineModeIsEnabled", "LocalEntryNotFoundError"):
        return "offline: HF_HUB_OFFLINE is set"
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text.split(". ")[0].rstrip(".")


def _remove_partials(repo: str, folder: Path | None, created: bool) -> None:
    """Delete what a failed download left: the folder when it made it, else the hub's ``*.incomplete`` and
    ``*.lock`` files in ``folder`` or in the hub cache for ``repo``."""
    from huggingface_hub import constants

    if folder is not None and created:
        shutil.rmtree(folder, ignore_errors=True)
        return
    cache = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    root = folder / ".cache" if folder is not None else cache
    for partial in [*root.rglob("*.incomplete"), *root.rglob("*.lock")] if root.is_dir() else []:
        partial.unlink(missing_ok=True)
