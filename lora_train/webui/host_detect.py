"""Which WebUI holds the loaded model, told from the model object itself, and the adapter that trains it.

Decided per job from ``shared.sd_model`` (never from folder names or versions): A1111's model is ldm's
LatentDiffusion; reForge and Forge Classic keep that object with Forge's ``forge_objects`` and an ``ldm_patched``
UNet; lllyasviel's Forge 2 and Neo replace it by their own ``backend.diffusion_engine`` object.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

from torch import nn

from lora_train.engine.model import Family, ModelBundle, Parameterization
from lora_train.hosts.forge_backend import is_backend_engine
from lora_train.webui.builtin_lora import reset_builtin_lora
from lora_train.webui.forge import ForgeModel, is_ldm_patched
from lora_train.webui.forge_backend import ForgeBackendModel
from lora_train.webui.jobs import HostError
from lora_train.webui.ldm_host import LdmHost

SUPPORTED_HOSTS = "AUTOMATIC1111 1.10, reForge, Forge Classic and Forge 2 / Neo"
UNSUPPORTED_FORGE = (
    "This WebUI's model ({cls}) has Forge's forge_objects but neither an ldm_patched UNet (reForge, Forge Classic) "
    f"nor Forge 2's backend engine; training inside the WebUI works in {SUPPORTED_HOSTS}. Here, train outside the "
    "WebUI with `python -m lora_train train --config your.yaml --set base_model=<checkpoint file>`; the LoRA it "
    "writes loads in Forge as usual."
)


class LoadedModel(Protocol):
    """What a job needs to know about the WebUI that loaded the model."""

    name: str

    def undo_prompt_lora(self, sd_model: nn.Module, networks: Any | None, log: Callable[[str], None]) -> None:
        """Give training the checkpoint's own weights: undo what the built-in Lora extension merged."""

    def run_scope(self, sd_model: nn.Module, log: Callable[[str], None]) -> AbstractContextManager[None]:
        """What must hold for the run only (entered after the host snapshot, left before it is verified)."""

    def bundle(self, sd_model: Any, clip_skip: int, parameterization: Parameterization | None,
               sdxl_clip_l_skip: bool = False, zero_terminal_snr: bool = False) -> ModelBundle:
        """The ModelBundle over the loaded model (ValueError or HostError when it cannot be trained)."""

    def family(self, sd_model: Any) -> Family:
        """The loaded model's family (ValueError when it is none we train)."""

    def weights(self, sd_model: Any) -> nn.Module:
        """The module holding every weight training reads: what the host snapshot proves unchanged."""

    def storage_problem(self, sd_model: Any) -> str | None:
        """This host's own sentence for weights stored where or how training cannot use them, or None."""


class A1111Model(LdmHost):
    """AUTOMATIC1111: its Lora extension merges in place with backups, and its blocks train as they are."""

    name = "AUTOMATIC1111"

    def undo_prompt_lora(self, sd_model: nn.Module, networks: Any | None, log: Callable[[str], None]) -> None:
        loaded = getattr(networks, "loaded_networks", None) if networks is not None else None
        restored = reset_builtin_lora(sd_model, loaded if isinstance(loaded, list) else None)
        if restored:
            log(f"undid the built-in Lora merge on {restored} modules")

    def run_scope(self, sd_model: nn.Module, log: Callable[[str], None]) -> AbstractContextManager[None]:
        return nullcontext()


def detect_host(sd_model: Any, model_management: Callable[[], Any | None] = lambda: None) -> LoadedModel:
    """The adapter for the WebUI that loaded ``sd_model``; HostError naming the hosts that work for an unknown one."""
    if not hasattr(sd_model, "forge_objects"):
        return A1111Model()
    if is_ldm_patched(sd_model):
        return ForgeModel(model_management)
    if is_backend_engine(sd_model):
        return ForgeBackendModel(model_management)
    raise HostError(UNSUPPORTED_FORGE.format(cls=f"{type(sd_model).__module__}.{type(sd_model).__qualname__}"))
