"""Model configs shipped with the package, so no checkpoint load ever asks the hub for a config.

Values are those of the public SD1.5, SD2.x and SDXL base releases (diffusers format). The ``tiny`` entries
are the same architectures scaled down: they back the built-in smoke-test model and the test suite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_train.engine.model import Family

_SD_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_CLIP_L = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}


@dataclass(frozen=True)
class Architecture:
    """Everything needed to build empty diffusers modules for one model family."""

    family: Family
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: list[dict[str, Any]]
    # OpenCLIP text encoders pad with "!" (id 0), OpenAI CLIP with the end token.
    pad_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>"])
    resolution: int = 512

    @property
    def layers_per_block(self) -> int:
        return int(self.unet["layers_per_block"])


SD1 = Architecture(
    family="sd1",
    unet={
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    },
    vae={**_SD_VAE, "scaling_factor": 0.18215},
    text_encoders=[_CLIP_L],
)

SD2 = Architecture(
    family="sd2",
    unet={
        **SD1.unet, "sample_size": 96, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
        "use_linear_projection": True,
    },
    vae={**_SD_VAE, "scaling_factor": 0.18215},
    text_encoders=[{
        "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
        "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 512,
    }],
    pad_tokens=["!"],
    resolution=768,
)

SDXL = Architecture(
    family="sdxl",
    unet={
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
    vae={**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025},
    text_encoders=[_CLIP_L, {
        "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
        "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280,
    }],
    pad_tokens=["<|endoftext|>", "!"],
    resolution=1024,
)

_TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "sample_size": 64,
    "block_out_channels": [16, 16, 32, 32], "norm_num_groups": 8, "scaling_factor": 0.18215,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_TINY_CLIP = {
    "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32,
}

TINY = Architecture(
    family="sd1",
    unet={
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 8,
        "block_out_channels": [32, 64], "cross_attention_dim": 32, "attention_head_dim": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    },
    vae=_TINY_VAE,
    text_encoders=[_TINY_CLIP],
    resolution=64,
)

TINY_SDXL = Architecture(
    family="sdxl",
    unet={
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 8,
        "block_out_channels": [32, 64], "transformer_layers_per_block": [1, 2], "attention_head_dim": [2, 4],
        "cross_attention_dim": 64, "use_linear_projection": True,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 32 + 6 * 8,
    },
    vae={**_TINY_VAE, "scaling_factor": 0.13025},
    text_encoders=[_TINY_CLIP, {**_TINY_CLIP, "hidden_act": "gelu"}],
    pad_tokens=["<|endoftext|>", "!"],
    resolution=64,
)

BUILTIN = {"tiny": TINY, "tiny-sdxl": TINY_SDXL}
BY_FAMILY: dict[Family, Architecture] = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}
