"""Bad requests are refused at submit with the field that is wrong, and start nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from webui_client import WebUI, train_body


def test_missing_dataset_folder_is_422_at_submit(webui: WebUI, dataset: Path, run_id: str) -> None:
    """Not a 200 whose job fails later: the folder is checked before anything starts."""
    missing = dataset.parent / f"{run_id}-no-such-folder"
    reply = webui.submit(train_body(missing, f"{run_id}-missing", 1))
    webui.settle(reply)
    assert reply.status == 422, f"HTTP {reply.status} {reply.body}"
    assert reply.detail()["field"] == "train_data_dir", reply.body


def test_unknown_config_key_is_422_naming_it(webui: WebUI, dataset: Path, run_id: str) -> None:
    reply = webui.submit(train_body(dataset, f"{run_id}-typo", 1, lerning_rate=1e-4))
    webui.settle(reply)
    assert reply.status == 422, f"HTTP {reply.status} {reply.body}"
    assert reply.detail()["field"] == "lerning_rate", reply.body
    assert "lerning_rate" in reply.detail()["message"], reply.body


def test_output_name_with_a_path_is_422_naming_it_as_the_cli_does(webui: WebUI, dataset: Path) -> None:
    reply = webui.submit(train_body(dataset, "../escape", 1))
    webui.settle(reply)
    assert reply.status == 422, f"HTTP {reply.status} {reply.body}"
    assert reply.detail() == {"field": "output_name", "message": "config key 'output_name': '../escape' must be a "
                              "plain file name without path separators"}, reply.body


@pytest.mark.parametrize(("key", "outside"), [("train_data_dir", "/etc"), ("reg_data_dir", "/usr/share")])
def test_path_outside_the_allowed_folders_is_403_naming_the_key(
    webui: WebUI, dataset: Path, run_id: str, key: str, outside: str
) -> None:
    reply = webui.submit({**train_body(dataset, f"{run_id}-outside", 1), key: outside})
    webui.settle(reply)
    assert reply.status == 403, f"HTTP {reply.status} {reply.body}"
    assert reply.detail()["field"] == key, reply.body
