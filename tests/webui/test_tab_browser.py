"""The tab in a real browser, as a user drives it: settings page, a run to the end, a run stopped, a bad folder.

Screenshots of each state go to out/ (``tab-idle``, ``tab-training``, ``tab-finished``, ``tab-stopped``,
``tab-error``, ``settings``) for a person to look at.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from webui_client import JOB_TIMEOUT_S, WebUI, kohya_modules

TAB = "#tab_lora_train"
STEP = re.compile(r"step (\d+)/(\d+)")
FEW_STEPS = 3
ENDED = ("Done", "Stopped", "Failed")


def field(page: Any, elem_id: str) -> Any:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def set_field(page: Any, elem_id: str, value: str) -> None:
    """Type into a textbox or number box and leave it, so gradio takes the value in."""
    box = field(page, elem_id)
    box.fill(value)
    box.press("Tab")


def open_tab(page: Any, name: str) -> None:
    page.locator("#tabs > .tab-nav > button", has_text=name).first.click()


def shot(page: Any, webui: WebUI, label: str, selector: str = TAB) -> None:
    page.locator(selector).first.screenshot(path=str(webui.out / f"{label}.png"))


def text(page: Any, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").first.inner_text()


def fill_run(page: Any, dataset: Path, name: str, steps: int, **extra: str) -> None:
    """Dataset, name and the few settings that keep a CPU run short (+ ``extra`` fields); the rest as offered."""
    set_field(page, "lora_train_cfg_train_data_dir", str(dataset))
    set_field(page, "lora_train_cfg_output_name", name)
    advanced = page.locator("#lora_train_advanced")
    if not field(page, "lora_train_cfg_max_train_steps").is_visible():
        advanced.get_by_text("Advanced (every config field)").click()
    values = {"resolution": "64", "max_train_steps": str(steps), "lora_rank": "4", "batch_size": "1", **extra}
    for elem_id, value in values.items():
        set_field(page, f"lora_train_cfg_{elem_id}", value)
    page.locator(f"{TAB} .tab-nav button", has_text="Training").first.click()


def follow(page: Any) -> list[str]:
    """Progress texts seen (polled twice a second) until the job has ended (done, stopped or failed)."""
    seen: list[str] = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        now = text(page, "lora_train_progress")
        if not seen or seen[-1] != now:
            seen.append(now)
        if now.startswith(ENDED):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"the job did not end; progress: {seen[-3:]}")


def steps_in(texts: list[str]) -> list[int]:
    return [int(m.group(1)) for t in texts if (m := STEP.search(t))]


def test_settings_are_under_the_training_category(page: Any, webui: WebUI) -> None:
    """The settings page heads each group of sections with its category; ours must sit under "Training"."""
    open_tab(page, "Settings")
    page.locator("#settings .settings-category").first.wait_for(state="attached")
    category = page.evaluate("""() => {
        const button = [...document.querySelectorAll('#settings > div > button')]
            .find(b => b.textContent.trim() === 'LoRA Train');
        if (!button) return null;
        for (let e = button.previousElementSibling; e; e = e.previousElementSibling)
            if (e.classList.contains('settings-category')) return e.textContent.trim();
        return '';
    }""")
    shot(page, webui, "settings", "#settings")
    assert category is not None, "no 'LoRA Train' section on the settings page"
    assert category == "Training", f"our settings are under {category!r}"


def test_train_in_the_tab_to_the_end(page: Any, webui: WebUI, dataset: Path, run_id: str) -> None:
    open_tab(page, "LoRA Train")
    set_field(page, "lora_train_cfg_train_data_dir", str(dataset))
    page.locator("#lora_train_load").click()
    page.get_by_text("4 image(s), all captioned.").wait_for()
    name = f"{run_id}-tab"
    fill_run(page, dataset, name, 4)
    shot(page, webui, "tab-idle")
    start = time.monotonic()
    page.locator("#lora_train_train").click()
    page.wait_for_function("() => /step [1-9]\\d*\\/4/.test(document.querySelector('#lora_train_progress')"
                           ".innerText)", timeout=JOB_TIMEOUT_S * 1000)
    shot(page, webui, "tab-training")
    seen = follow(page)
    webui.timings["tab job, 4 steps (Train to Done)"] = round(time.monotonic() - start, 1)
    page.wait_for_function("() => /<lora:/.test(document.querySelector('#lora_train_snippet textarea, "
                           "#lora_train_snippet input').value)")
    shot(page, webui, "tab-finished")
    assert field(page, "lora_train_snippet").input_value().startswith(f"<lora:{name}:0.7>")
    assert f"{name}.safetensors" in seen[-1] and "<lora:" in seen[-1]  # where it is and how to use it
    assert seen[-1].startswith("Done") and "step 4/4" in seen[-1], seen[-1]
    # the live view samples the job once a second and a step takes about that long here, so a busy machine may
    # show 1, 2, 4: what must hold is that progress moves step by step before the end and never goes back
    steps = steps_in(seen)
    assert steps == sorted(steps) and len(set(steps) - {4}) >= 2, f"the tab's progress did not move: {seen}"
    assert (webui.lora_dir / f"{name}.safetensors").is_file()
    assert (webui.lora_dir / f"{name}.json").is_file()


def test_stop_in_the_tab_keeps_a_usable_lora(page: Any, webui: WebUI, dataset: Path, run_id: str) -> None:
    open_tab(page, "LoRA Train")
    name = f"{run_id}-tabstop"
    # progress every step asked for explicitly: this checks Stop, the run to the end checks the default
    fill_run(page, dataset, name, 40, log_every_n_steps="1")
    page.locator("#lora_train_train").click()
    page.wait_for_function("() => /step [1-9]\\d*\\/40/.test(document.querySelector('#lora_train_progress')"
                           ".innerText)", timeout=JOB_TIMEOUT_S * 1000)
    at_stop = steps_in([text(page, "lora_train_progress")])[0]
    page.locator("#lora_train_stop").click()
    seen = follow(page)
    shot(page, webui, "tab-stopped")
    assert seen[-1].startswith("Stopped"), seen[-1]
    assert steps_in(seen)[-1] <= at_stop + FEW_STEPS, f"Stop pressed at step {at_stop}; progress: {seen}"
    path = webui.lora_dir / f"{name}.safetensors"
    assert path.is_file(), "a stopped run must keep the LoRA trained so far"
    assert name in webui.lora_names()
    webui.txt2img(f"a photo of a cat <lora:{name}:1>", "tab-stopped-lora")
    assert webui.loaded_modules(name) == kohya_modules(path)


def test_missing_folder_in_the_tab_is_refused_naming_the_field(page: Any, webui: WebUI, dataset: Path,
                                                               run_id: str) -> None:
    open_tab(page, "LoRA Train")
    fill_run(page, dataset.parent / f"{run_id}-no-such-folder", f"{run_id}-taberror", 2)
    page.locator("#lora_train_train").click()
    page.wait_for_function("() => /⚠️/.test(document.querySelector('#lora_train_status').innerText)",
                           timeout=JOB_TIMEOUT_S * 1000)
    shot(page, webui, "tab-error")
    status = text(page, "lora_train_status")
    assert "train_data_dir" in status, status
    assert "Training failed" not in status, f"refused only after a job started: {status}"
