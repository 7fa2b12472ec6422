"""Grid cells drawn by the WebUI itself: ``process_images`` with ``<lora:file:w>`` in the prompt, as txt2img does.

Nothing here imports A1111: the glue hands in ``modules.processing``, ``modules.shared`` and the built-in Lora
extension's ``networks``. A run's saved steps live in the run folder, outside models/Lora (where every file would
show as a card), so the Lora extension cannot find them by name: for the grid they are entered into its list of
available networks under their file names (``networks.network.NetworkOnDisk``, what its own folder scan makes)
and taken out again afterwards. The WebUI's own loader then applies them exactly as ``<lora:…>`` will.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from lora_train.engine.output.grid import GridRow, GridSpec
from lora_train.webui.webui_txt2img import txt2img


@contextmanager
def registered(networks: Any, rows: list[GridRow]) -> Iterator[dict[str, str]]:
    """Make every row's file loadable as ``<lora:NAME:w>``; yields {file path: NAME}; restores the lists after."""
    available = networks.available_networks
    aliases = networks.available_network_aliases
    added: list[str] = []
    names: dict[str, str] = {}
    for row in rows:
        path = Path(row.path)
        entry = available.get(path.stem)
        if entry is not None and Path(entry.filename).resolve() == path.resolve():
            names[row.path] = path.stem  # already in models/Lora (kohya's name-000004 files, the final file)
            continue
        name = f"{path.stem}.lora-train-grid"
        available[name] = aliases[name] = networks.network.NetworkOnDisk(name, str(path))
        added.append(name)
        names[row.path] = name
    try:
        yield names
    finally:
        for name in added:
            available.pop(name, None)
            aliases.pop(name, None)
            getattr(networks, "networks_in_memory", {}).pop(name, None)


def webui_renderer(processing: Any, shared: Any, spec: GridSpec,
                   names: dict[str, str]) -> Callable[[GridRow | None, float, str], tuple[Image.Image, str]]:
    """A ``grid.Renderer``: one txt2img image per cell at the spec's seed, size, steps and CFG, with its infotext.

    Called with the queue lock held (``process_images`` takes none itself).
    """
    def render(row: GridRow | None, strength: float, prompt: str) -> tuple[Image.Image, str]:
        text = prompt if row is None else f"{prompt} <lora:{names[row.path]}:{strength:g}>"
        processed = txt2img(
            processing, shared, "the grid", prompt=text, negative_prompt=spec.negative, steps=spec.steps,
            cfg_scale=spec.cfg_scale, width=spec.width, height=spec.height, seed=spec.seed, sampler_name=spec.sampler,
        )
        infotext = processed.infotexts[0] if getattr(processed, "infotexts", None) else processed.info
        return processed.images[0], infotext

    return render
