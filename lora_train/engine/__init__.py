"""The training engine: config → dataset → lora → trainer → export. Knows no host and no UI."""
