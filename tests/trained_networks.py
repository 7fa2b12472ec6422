"""The network types at rank 4 (conv_dim 4 where they take 3x3 convolutions), and a network of one of them with
random values in every tensor, as if trained (zeros would prove nothing). Shared by the network-type tests and
the diffusers-loader check, which must run where the WebUI's ``ldm`` is missing."""

from __future__ import annotations

import torch

from lora_train.engine.config.network_spec import NetworkSpec
from lora_train.engine.network import lora

SPECS = {
    "LoRA": NetworkSpec(),
    "LoCon": NetworkSpec(conv_dim=4, conv_alpha=2),
    "LoHa": NetworkSpec("lycoris.kohya", "loha", conv_dim=4, conv_alpha=2),
    "LoKr": NetworkSpec("lycoris.kohya", "lokr", conv_dim=4),
    "LoKr factor 4": NetworkSpec("lycoris.kohya", "lokr", factor=4),
    "DoRA": NetworkSpec("lycoris.kohya", "lora", conv_dim=4, conv_alpha=2, dora=True),
}


def trained_network(bundle, spec: NetworkSpec, seed: int = 0) -> lora.LoraNetwork:
    """Inject ``spec`` into ``bundle`` (UNet and text encoders) and fill every adapter tensor with noise."""
    targets = bundle.lora_targets(True, conv=spec.conv_dim > 0)
    network = lora.inject(targets, 4, 2.0, 0.0, spec)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in network.layers:
            for name, param in network.named_tensors(key).items():
                noise = torch.randn(param.shape, generator=generator)
                size = 0.05 if name.startswith("lora_") else 0.3  # LoHa/LoKr multiply two factors
                param.copy_(param * (1 + 0.1 * noise) if name == "dora_scale" else size * noise)
    return network
