"""The WebUI's log holds no error from this extension: not at load, not from the jobs the other checks ran.

Named to sort last, so pytest reads the log after every other module here has trained and failed on purpose.
Errors from other parts of the WebUI are reported (a warning each, and out/webui-log-errors.txt), not failed.
"""

from __future__ import annotations

import re
import warnings

from log_scan import error_blocks, mentions
from webui_client import OUR_NAMES, WebUI

# a line of ours that says something went wrong, even without a traceback
_BAD_WORDS = re.compile(r"error|exception|failed|traceback", re.IGNORECASE)


def test_no_error_or_traceback_from_the_extension(webui: WebUI) -> None:
    text = webui.log.read_text(encoding="utf-8", errors="replace")
    blocks = error_blocks(text)
    ours = [block for block in blocks if mentions(block, OUR_NAMES)]
    others = [block for block in blocks if not mentions(block, OUR_NAMES)]
    (webui.out / "webui-log-errors.txt").write_text(
        "".join(f"===== {'OURS' if block in ours else 'other'}\n{block}\n" for block in blocks), encoding="utf-8")
    for block in others:
        warnings.warn(f"error in webui.log, not from this extension:\n{block}", stacklevel=1)
    lines = [line for line in text.splitlines() if mentions(line, OUR_NAMES) and _BAD_WORDS.search(line)]
    assert not ours, f"{len(ours)} error(s) of ours in {webui.log}:\n\n" + "\n\n".join(ours)
    assert not lines, f"error lines naming this extension in {webui.log}:\n" + "\n".join(lines)
