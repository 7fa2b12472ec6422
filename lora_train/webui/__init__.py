"""The app around the engine: job runner, REST API, the tab, uploads, path policy, presets, the A1111 adapter."""
