"""diffusers APIs the tests use that differ between the versions CI runs them on (0.26.3, 0.31, 0.42).

0.26.3 is what a mid-2024 CLI install had (it imports only next to huggingface_hub < 0.26), 0.31 is what imports
next to the WebUI v1.10.1 venv's hub 0.36.2 and transformers 4.30.2, 0.42 is current.
"""

from __future__ import annotations

from typing import Any

import diffusers
import pytest
from diffusers.utils import USE_PEFT_BACKEND
from packaging.version import Version

try:
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config, create_vae_diffusers_config
except ImportError:  # diffusers >= 0.27: the *_from_ldm forms, which read the checkpoint only without image_size
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    def create_unet_diffusers_config(original_config: dict, image_size: int) -> dict[str, Any]:
        return create_unet_diffusers_config_from_ldm(original_config, {}, image_size=image_size)

    def create_vae_diffusers_config(original_config: dict, image_size: int, scaling_factor: float) -> dict[str, Any]:
        return create_vae_diffusers_config_from_ldm(original_config, {}, image_size=image_size,
                                                    scaling_factor=scaling_factor)


# diffusers < 0.27 loads kohya files through its own legacy LoRA layers; later ones only through peft, which
# diffusers uses only next to transformers >= 4.34 (the WebUI v1.10.1 venv's 4.30.2 gives it no such backend)
LOADS_KOHYA = USE_PEFT_BACKEND or Version(diffusers.__version__) < Version("0.27")


def require_kohya_loader() -> None:
    """Skip the rest of a test (what came before it has run) where diffusers cannot load a kohya LoRA file."""
    if not LOADS_KOHYA:
        pytest.skip(f"diffusers {diffusers.__version__} loads LoRA files only with its peft backend (transformers "
                    ">= 4.34); CI runs this check in .venv-older (diffusers 0.26.3) and .venv-current (0.42)")
