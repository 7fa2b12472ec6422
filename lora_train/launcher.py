"""``multi_gpu: true`` (lora-scripts' spelling): the CLI starts one training process per GPU itself.

It runs torch's own launcher (the ``elastic_launch`` behind ``torchrun``) with the same command line, so the
processes are exactly what ``torchrun --nproc_per_node N -m lora_train train ...`` would start; only its log
chatter and its traceback on a failure or Ctrl-C are kept off the terminal, where the processes have already
said what happened in one line.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid

from lora_train.engine.config.settings import ConfigError, TrainConfig


def gpu_list(cfg: TrainConfig) -> list[str]:
    """``gpu_ids`` as device ids (``[0, 1]`` or lora-scripts' ``"0,1"``), or every GPU when empty."""
    ids = [part.strip() for item in cfg.gpu_ids for part in str(item).split(",") if part.strip()]
    if ids:
        return ids
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def launch(cfg: TrainConfig, argv: list[str]) -> int:
    """Run ``lora_train argv`` on one process per GPU of ``cfg``; the exit code of the run."""
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    ids = gpu_list(cfg)
    if len(ids) < 2:
        raise ConfigError("multi_gpu", f"needs two or more GPUs and this machine shows {len(ids)}; set gpu_ids "
                                       "(e.g. [0, 1]) or multi_gpu: false")
    if torch.cuda.is_available():
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    else:
        print(f"multi_gpu: no CUDA GPU here; training on {len(ids)} CPU processes (one per gpu_ids entry)")
    # torchrun's default for CPU work: one thread per process unless the user set it
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(ids))))
    print(f"multi_gpu: {len(ids)} processes, as `torchrun --nproc_per_node {len(ids)} -m lora_train "
          f"{' '.join(argv)}` would start them")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=len(ids), run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    for name in list(logging.root.manager.loggerDict):  # each of torch's launcher loggers sets its own level
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "lora_train", *argv)
    except ChildFailedError as failed:
        code = failed.get_first_failure()[1].exitcode
        return code if code > 0 else 1  # the failing process said why
    except SignalException:
        return 130  # Ctrl-C: the processes stopped after their step and saved
    return 0
