"""The WebUI's own captioners, BLIP ("Interrogate CLIP") and DeepBooru, behind our captioner interface.

The glue hands in ``shared.interrogator`` and ``modules.deepbooru.model``; this package never imports the WebUI.
Both fetch and load their own weights into the WebUI's models folder and send them back to the CPU afterwards,
as the WebUI's Extras > Caption does (unless its "keep models in memory" setting says otherwise). The caller
holds the WebUI's queue lock around them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from lora_train.caption.errors import CaptionerError
from lora_train.caption.options import CaptionOptions
from lora_train.engine.data import caption_text

ERROR_MARK = "<error>"  # what InterrogateModels.interrogate appends after logging its own traceback


class WebUIBlip:
    """``interrogator.interrogate(image)``: a BLIP caption plus CLIP-ranked artist/medium/movement terms."""

    def __init__(self, interrogator: Any) -> None:
        self.interrogator = interrogator

    def describe(self, images: Sequence[Image.Image], options: CaptionOptions | None = None) -> list[str]:
        trigger = options.trigger if options else None
        lines = []
        for image in images:
            text = self.interrogator.interrogate(image.convert("RGB"))
            if ERROR_MARK in text:
                raise CaptionerError("The WebUI's BLIP interrogator failed (offline without its weights, or its BLIP "
                                     "repository missing); the WebUI's console shows why")
            lines.append(caption_text.with_trigger(text.strip(), trigger))
        return lines

    def unload(self) -> None:
        """Send BLIP and CLIP back to the CPU (interrogate already does after every image)."""
        self.interrogator.unload()


class WebUIDeepBooru:
    """``model.tag_multi(image)`` between ``start()`` and ``stop()``, with the WebUI's DeepBooru settings
    (threshold, spaces, escaping, filtered tags); scores are never written into the caption."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def describe(self, images: Sequence[Image.Image], options: CaptionOptions | None = None) -> list[str]:
        trigger = options.trigger if options else None
        try:
            self.model.start()
        except Exception as exc:  # noqa: BLE001 - offline its download fails and load() indexes an empty list
            raise CaptionerError("The WebUI's DeepBooru could not load its model (offline without "
                                 "models/torch_deepdanbooru/model-resnet_custom_v3.pt); the WebUI's console shows "
                                 f"why ({type(exc).__name__}: {exc})") from exc
        try:
            tags = [self.model.tag_multi(image.convert("RGB"), force_disable_ranks=True) for image in images]
        finally:
            self.model.stop()
        return [caption_text.with_trigger(line, trigger) for line in tags]

    def unload(self) -> None:
        """Nothing to do: stop() sent the model back to the CPU after every batch."""
