"""The trained layers: peft adapters on the host's modules and their kohya names."""
