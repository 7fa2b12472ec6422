"""The Captions tab's captioner choice in the real WebUI, offline: every captioner is offered, and one whose
weights cannot be had says so in a sentence (no traceback) and writes nothing.

Each captioner's message goes to out/captioner-<name>.txt and a screenshot to out/captioner-<name>.png.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from test_tab_browser import TAB, open_tab, set_field, shot
from webui_client import JOB_TIMEOUT_S, WebUI

CHOICES = ("BLIP (WebUI)", "DeepBooru (WebUI)", "WD14 tagger", "CoCa")
OURS = CHOICES[2:]
# Forge Classic removed the WebUI's interrogators (modules.deepbooru, shared.interrogator): only ours there.
HOSTS_WITHOUT_INTERROGATORS = {"forge-classic"}
# the status Markdown: gradio 3 puts its "prose" class on the element itself, gradio 4 (Forge 2) on a child
STATUS = "#lora_train_status.prose, #lora_train_status .prose"


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def choose(page: Any, elem_id: str, option: str) -> None:
    """Pick ``option`` in a gradio dropdown as a user does with the keyboard: type its name, press Enter."""
    box = page.locator(f"#{elem_id} input").first
    if box.input_value() == option:  # already chosen (gradio lists no entry for a filter equal to the value)
        return
    box.focus()
    box.fill("")
    box.type(option, delay=20)  # key by key, as a user types: each key opens and filters the list
    page.locator(f"#{elem_id} ul.options li", has_text=option).first.wait_for()
    box.press("Enter")
    page.wait_for_function(f"() => document.querySelector('#{elem_id} input').value === {option!r}")


def offered(page: Any, elem_id: str) -> list[str]:
    page.locator(f"#{elem_id} input").first.click()
    items = page.locator(f"#{elem_id} ul.options li").all_inner_texts()
    page.locator(f"#{elem_id} input").first.press("Escape")
    return [item.replace("✓", "").strip() for item in items]  # the chosen entry carries a check mark


def test_every_captioner_is_offered_and_offline_ones_say_what_they_need(page: Any, webui: WebUI,
                                                                       dataset: Path) -> None:
    open_tab(page, "LoRA Train")
    set_field(page, "lora_train_cfg_train_data_dir", str(dataset))
    page.locator(f"{TAB} .tab-nav button", has_text="Captions").first.click()
    expected = list(OURS if webui.host in HOSTS_WITHOUT_INTERROGATORS else CHOICES)
    assert offered(page, "lora_train_captioner") == expected
    before = folder_digest(dataset)
    status = page.locator(STATUS).first  # the Markdown itself, not gradio's block around it
    preview_box = page.locator("#lora_train_caption_preview_text textarea").first
    for name in expected:
        choose(page, "lora_train_captioner", name)
        shown = (status.inner_text(), preview_box.input_value())
        page.locator("#lora_train_caption_preview").click()
        page.wait_for_function(  # a new text, and gradio's "queue/0.0s" overlay gone
            f"([status, preview]) => (document.querySelector({STATUS!r}).innerText !== status || "
            "document.querySelector('#lora_train_caption_preview_text textarea').value !== preview) && "
            "[...document.querySelectorAll('#lora_train_status .wrap')].every(w => w.classList.contains('hide'))",
            arg=list(shown), timeout=JOB_TIMEOUT_S * 1000)
        message = status.inner_text().strip()
        preview = preview_box.input_value()
        slug = re.sub(r"\W+", "-", name.lower()).strip("-")
        (webui.out / f"captioner-{slug}.txt").write_text(f"status: {message}\npreview: {preview}\n",
                                                         encoding="utf-8")
        shot(page, webui, f"captioner-{slug}")
        assert "Traceback" not in message and "Traceback" not in preview
        assert message or preview, f"{name}: neither a preview nor a message"
        if message:  # offline without weights: one clear message naming what the captioner needs
            assert message.startswith("⚠️") and len(message) < 1200, message
            assert all(name.split(" ")[0] in message for name in expected), message
        assert folder_digest(dataset) == before, f"{name} wrote into the dataset folder"
