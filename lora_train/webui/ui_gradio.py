"""What differs between gradio 3.41 (the WebUI's pin) and current gradio, in one place for the tab's modules.

Keyword arguments are filtered by each signature (``make``), ``_js``/``js`` is chosen by version, uploads are
read as paths whatever wrapper the version hands over.
"""

from __future__ import annotations

import inspect
from typing import Any

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])
QUEUE_WORKERS = 64


_CATCH_ALL = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def accepted(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``fn`` names in this gradio version (a catch-all ``**kwargs`` beside named parameters
    does not count). A host's patch that names nothing, ``(self, *args, **kwargs)``, hands everything on to the
    constructor it wraps (reForge wraps ``gr.Image.__init__`` so), so it gets everything: filtered on, it would
    drop every argument, ``elem_id``, ``label`` and ``type`` included."""
    parameters = inspect.signature(fn).parameters.values()
    named = {p.name for p in parameters if p.kind not in _CATCH_ALL} - {"self"}
    if not named and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in named}


def make(cls: type, **kwargs: Any) -> Any:
    """Build a component with only the keyword arguments this gradio version's constructor accepts."""
    return cls(**accepted(cls.__init__, kwargs))


def enable_queue(demo: gr.Blocks, workers: int = QUEUE_WORKERS) -> gr.Blocks:
    """The standalone server's queue with room for ``workers`` events at once, as the WebUI's ``queue(64)``:
    gradio 3 runs one queued event at a time unless told, so one page's live view would hold every button."""
    if GRADIO_MAJOR >= 4:
        return demo.queue(default_concurrency_limit=workers)
    return demo.queue(concurrency_count=workers)


def js(code: str) -> dict[str, str]:
    """A client-side handler as this gradio version names the argument."""
    return {"js": code} if GRADIO_MAJOR >= 4 else {"_js": code}


def file_path(item: Any) -> str:
    """An uploaded file as a path: gradio 3 gives a tempfile wrapper, gradio 4+ a str or a FileData."""
    return str(getattr(item, "name", None) or getattr(item, "path", None) or item)
