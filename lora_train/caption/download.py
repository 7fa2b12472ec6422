"""Captioner weights from the Hugging Face hub on first use: a console progress bar, no partial file left.

huggingface_hub writes into ``*.incomplete`` files and renames them when done; a failed download (offline,
stopped, no disk) leaves those behind, so they are removed here and the caller gets one sentence, not a traceback.
"""

from __future__ import annotations

from pathlib import Path

from lora_train.caption.errors import WeightsMissingError


def hub_file(repo: str, filename: str, folder: Path | None, allow_download: bool, what: str) -> Path:
    """``filename`` of hub ``repo``: from ``folder`` (downloaded there when missing) or, without a folder, the hub
    cache. Raises WeightsMissingError naming the file and where it comes from when it cannot be had."""
    if folder is not None and (folder / filename).is_file():
        return folder / filename
    from huggingface_hub import hf_hub_download

    url = f"https://huggingface.co/{repo}/blob/main/{filename}"
    try:
        local = {"local_dir": str(folder)} if folder is not None else {}
        return Path(hf_hub_download(repo, filename, local_files_only=not allow_download, **local))
    except Exception as exc:  # noqa: BLE001 - offline, HTTP, disk: all become one message
        _remove_partials(repo, folder)
        where = f"put it at {folder / filename}" if folder is not None else "download it"
        if not allow_download:
            raise WeightsMissingError(f"{what} not found and downloads are off: {where} from {url}.",
                                      downloads_off=True) from None
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsMissingError(f"{what} could not be downloaded ({reason}); {where} from {url} while "
                                  "online.") from None


def _remove_partials(repo: str, folder: Path | None) -> None:
    """Delete the ``*.incomplete`` files a failed download left in ``folder`` or in the hub cache for ``repo``."""
    from huggingface_hub import constants

    roots = [folder] if folder is not None else [Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"]
    for root in roots:
        if root.is_dir():
            for partial in root.rglob("*.incomplete"):
                partial.unlink(missing_ok=True)
