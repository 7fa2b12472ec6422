"""What torchrun starts in the multi-process tests: ``lora_train``'s own CLI, plus test-only probes set by env.

- ``LT_TEST_WRITES=PREFIX``: every file this process opens for writing or renames into place is listed in
  ``PREFIX.<rank>`` (an audit hook, so nothing in lora_train is patched for it).
- ``LT_TEST_STOP_AT=K``: rank 1 sends itself SIGINT (Ctrl-C) after optimizer step K.
- ``LT_TEST_FAIL_AT=K``: rank 1 fails with an OSError after optimizer step K.
"""

from __future__ import annotations

import os
import signal
import sys
import time

RANK = int(os.environ.get("RANK", "0"))


def _log_writes(prefix: str) -> None:
    fd = os.open(f"{prefix}.{RANK}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def hook(event: str, args: tuple) -> None:
        path = None
        if event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1], args[2]
            writes = any(c in (mode or "") for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            path = args[0] if writes else None
        elif event in ("os.rename", "os.mkdir"):
            path = args[1] if event == "os.rename" else args[0]
        if path is not None:
            os.write(fd, f"{os.fsdecode(path)}\n".encode())

    sys.addaudithook(hook)


def _probe_steps(stop_at: int, fail_at: int) -> None:
    from lora_train.engine.train import trainer

    real = trainer.optimizer_step
    done = []

    def step(*args, **kwargs):
        real(*args, **kwargs)
        done.append(1)
        if RANK == 1 and len(done) == stop_at:
            os.kill(os.getpid(), signal.SIGINT)
        if RANK == 1 and len(done) == fail_at:
            print(f"injected failure at {time.time():.3f}", flush=True)
            raise OSError("injected failure: disk went away")

    trainer.optimizer_step = step


if __name__ == "__main__":
    if os.environ.get("LT_TEST_WRITES"):
        _log_writes(os.environ["LT_TEST_WRITES"])
    _probe_steps(int(os.environ.get("LT_TEST_STOP_AT", "0")), int(os.environ.get("LT_TEST_FAIL_AT", "0")))
    from lora_train.cli import main

    sys.exit(main(sys.argv[1:]))
