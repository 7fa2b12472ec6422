"""The dataset check in the real tab: findings appear on Load, an error stops Train in the same words, the fix
moves the file aside (nothing deleted), and with only warnings left Train starts.

Screenshots: ``doctor-findings`` (the tab after Load; ``doctor-panel`` its Dataset check alone), ``doctor-blocked``
(Train refused), ``doctor-fixed``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_tab_browser import TAB, field, fill_run, follow, open_tab, set_field, shot, text
from webui_client import JOB_TIMEOUT_S, WebUI


@pytest.fixture
def faulty(webui: WebUI, run_id: str) -> Iterator[Path]:
    """Five captioned pictures, a byte-for-byte copy of one, and a 2x2 speck nothing can be learned from."""
    folder = webui.root / "lora_train_datasets" / f"{run_id}-doctor"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(5):
        grid = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(grid).resize((64, 64), Image.BICUBIC).save(folder / f"pic{i}.png")
        (folder / f"pic{i}.txt").write_text(f"acceptok, picture {i}", encoding="utf-8")
    shutil.copyfile(folder / "pic0.png", folder / "pic0-copy.png")
    (folder / "pic0-copy.txt").write_text("acceptok, the copy", encoding="utf-8")
    Image.new("RGB", (2, 2), "red").save(folder / "speck.png")
    (folder / "speck.txt").write_text("acceptok, a speck", encoding="utf-8")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def open_check(page: Any) -> None:
    page.locator(f"{TAB} .tab-nav button", has_text="Dataset check").first.click()


def test_findings_on_load_block_train_and_the_fix_moves_the_file(page: Any, webui: WebUI, faulty: Path,
                                                                run_id: str) -> None:
    open_tab(page, "LoRA Train")
    fill_run(page, faulty, f"{run_id}-doctor", 1)  # resolution 64, one step: the few settings of a CPU run
    set_field(page, "lora_train_cfg_train_data_dir", str(faulty))
    page.locator("#lora_train_load").click()
    page.wait_for_function("() => /Train is blocked/.test(document.querySelector('#lora_train_doctor_summary')"
                           ".innerText)", timeout=JOB_TIMEOUT_S * 1000)
    open_check(page)
    page.locator("#lora_train_doctor_gallery img").first.wait_for()
    table = text(page, "lora_train_doctor_table")
    assert "image-too-small" in table and "speck.png" in table, table
    assert "duplicate-exact" in table and "pic0-copy.png" in table, table
    shot(page, webui, "doctor-findings")
    shot(page, webui, "doctor-panel", "#lora_train_doctor_tab")
    blocker = text(page, "lora_train_doctor_summary").split("Train is blocked: ", 1)[1].split(" (see Dataset")[0]

    page.locator("#lora_train_train").click()
    page.wait_for_function("() => /Not started/.test(document.querySelector('#lora_train_status').innerText)",
                           timeout=JOB_TIMEOUT_S * 1000)
    status = text(page, "lora_train_status")
    assert blocker in status, (blocker, status)  # the same sentence
    # no job of this run started (the progress may still show an earlier job of this WebUI session)
    assert f"{run_id}-doctor" not in text(page, "lora_train_progress")
    shot(page, webui, "doctor-blocked")

    open_check(page)
    page.locator("#lora_train_doctor_exclude").click()
    page.wait_for_function("() => /Moved/.test(document.querySelector('#lora_train_status').innerText)",
                           timeout=JOB_TIMEOUT_S * 1000)
    excluded = faulty / "_excluded"
    assert sorted(p.name for p in excluded.iterdir()) == ["pic0-copy.png", "pic0-copy.txt", "speck.png", "speck.txt"]
    assert not (faulty / "speck.png").exists() and (faulty / "pic0.png").is_file()
    page.wait_for_function("() => !/Train is blocked/.test(document.querySelector('#lora_train_doctor_summary')"
                           ".innerText)")
    page.get_by_text("5 image(s), all captioned.").wait_for(state="attached")  # the Captions tab followed
    assert "Moved 2 image(s)" in text(page, "lora_train_status")  # and the fix's message stayed
    shot(page, webui, "doctor-fixed")

    page.locator("#lora_train_train").click()  # warnings (few images) do not stop it
    page.wait_for_function("() => /Started/.test(document.querySelector('#lora_train_status').innerText)",
                           timeout=JOB_TIMEOUT_S * 1000)
    # the live view shows the earlier job's "Done" until its next tick (once a second): follow this job, not that
    page.wait_for_function(f"() => document.querySelector('#lora_train_progress').innerText"
                           f".includes('{run_id}-doctor')", timeout=JOB_TIMEOUT_S * 1000)
    seen = follow(page)
    assert seen[-1].startswith("Done"), seen[-1]
    assert field(page, "lora_train_snippet").input_value().startswith(f"<lora:{run_id}-doctor")
