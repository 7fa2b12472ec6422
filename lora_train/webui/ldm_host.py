"""What the hosts whose model is ldm's LatentDiffusion share (A1111, reForge, Forge Classic): ``LdmBundle`` reads
the model object itself, and that object holds every weight training touches."""

from __future__ import annotations

from typing import Any

from torch import nn

from lora_train.engine.model import Family, ModelBundle, Parameterization
from lora_train.hosts.ldm import LdmBundle
from lora_train.hosts.ldm_embedders import detect_family


class LdmHost:
    """Bundle, family and weights of an ldm/sgm model object (A1111's shape, also kept by reForge and Classic)."""

    def bundle(self, sd_model: Any, clip_skip: int, parameterization: Parameterization | None,
               sdxl_clip_l_skip: bool = False, zero_terminal_snr: bool = False) -> ModelBundle:
        """The ModelBundle over the loaded model (ValueError when it cannot be trained)."""
        return LdmBundle(sd_model, clip_skip=clip_skip, parameterization=parameterization,
                         sdxl_clip_l_skip=sdxl_clip_l_skip, zero_terminal_snr=zero_terminal_snr)

    def family(self, sd_model: Any) -> Family:
        """SD1, SD2 or SDXL (ValueError for anything else)."""
        return detect_family(sd_model)

    def storage_problem(self, sd_model: Any) -> str | None:
        """None: the WebUI's own storage checks (--lowvram, FP8 weight) apply to these models as they are."""
        return None

    def weights(self, sd_model: Any) -> nn.Module:
        """The module holding every weight training reads: what the host snapshot proves unchanged."""
        return sd_model
