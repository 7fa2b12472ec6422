"""sd-webui-lora-train: LoRA training engine shared by the WebUI tab and the CLI."""

__version__ = "0.1.0"
