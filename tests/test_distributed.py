"""More than one process: 2 CPU processes over gloo (torchrun) train the LoRA one process trains with twice the
batch, only rank 0 writes, a stopped run resumes exactly, a failure on one process ends both with one message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_DATA, make_config

from lora_train.engine.output.export import read_lora
from lora_train.engine.train.trainer import train

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "ddp_worker.py"
STEPS = 6


def write_config(folder: Path, **extra) -> Path:
    """A YAML for the tiny model: 6 steps of 2 images per process (the sample data's buckets hold 4 and 2
    images, so every epoch also has a batch that rank 1 has no share of)."""
    values = dict(base_model="tiny", train_data_dir=str(SAMPLE_DATA), resolution=64, min_bucket_reso=64,
                  max_bucket_reso=128, bucket_reso_steps=32, output_dir=str(folder / "out"), output_name="test",
                  lora_rank=4, lora_alpha=4, learning_rate=1e-3, batch_size=2, max_train_steps=STEPS,
                  log_every_n_steps=1, save_precision="float", logging_dir="", device="cpu")
    values.update(extra)
    path = folder / "run.yaml"
    path.write_text(json.dumps(values), encoding="utf-8")  # JSON is YAML
    return path


def torchrun(config: Path, *sets: str, env: dict[str, str] | None = None,
             timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(WORKER),
               "train", "--config", str(config), *(f"--set={s}" for s in sets)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})})


def max_difference(a_path: Path, b_path: Path) -> float:
    a, _ = read_lora(a_path)
    b, _ = read_lora(b_path)
    assert a.keys() == b.keys()
    return max((a[key].float() - b[key].float()).abs().max().item() for key in a)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One uninterrupted 2-process run that writes every kind of file (step files and state every 2 steps, a
    sample image, TensorBoard), with every file each process wrote listed."""
    folder = tmp_path_factory.mktemp("ddp")
    started = time.time()
    config = write_config(folder, save_every_n_steps=2, sample_prompts=["a red square"], sample_every_n_steps=STEPS,
                          sample_steps=2, logging_dir=str(folder / "out" / "logs"))
    result = torchrun(config, env={"LT_TEST_WRITES": str(folder / "writes")})
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"2-process run: {time.time() - started:.1f} s")
    return folder, result


def test_two_processes_train_the_lora_one_process_trains_with_twice_the_batch(two_processes, tiny, tmp_path):
    folder, result = two_processes
    assert f"done: {STEPS}/{STEPS} steps" in result.stdout
    one = train(make_config(SAMPLE_DATA, tmp_path, batch_size=4, max_train_steps=STEPS, logging_dir=""), tiny)
    difference = max_difference(folder / "out" / "test.safetensors", one.output)
    print(f"max |2 processes x batch 2 - 1 process x batch 4| = {difference:.3g}")
    assert difference < 1e-4  # float reduction order (Adam divides tiny gradients by tiny moments); lr is 1e-3
    state = json.loads((folder / "out" / "test-state" / "state.json").read_text())
    assert state["processes"] == 2
    assert state["loss_history"] == pytest.approx(one.loss_history, rel=1e-5)  # the global batch's loss, per step


def test_only_rank_0_writes_files(two_processes):
    folder, _ = two_processes
    def written(rank: int) -> set[str]:
        lines = (folder / f"writes.{rank}").read_text().splitlines()
        return {line for line in lines if line.startswith(str(folder / "out"))}
    names = {Path(p).name for p in written(0)}
    assert {"test.safetensors", "state.json", "test-step00000002.safetensors", f"test_{STEPS:06d}_00.png"} <= names
    assert any(p.startswith(str(folder / "out" / "logs")) for p in written(0))  # TensorBoard
    assert written(1) == set()
    assert sorted(p.name for p in (folder / "out").iterdir()) == [
        "logs", "sample", "test-state", "test-step00000002.safetensors", "test-step00000004.safetensors",
        "test.safetensors"]


def test_a_failure_on_one_process_ends_both_within_seconds_with_one_message(tmp_path):
    result = torchrun(write_config(tmp_path, save_every_n_steps=1), env={"LT_TEST_FAIL_AT": "2"})
    ended = time.time()
    assert result.returncode != 0
    failed_at = float(result.stdout.split("injected failure at ")[1].split()[0])
    print(f"both processes ended {ended - failed_at:.1f} s after the failure on rank 1")
    assert ended - failed_at < 10  # the failing process leaves at once; torchrun ends the other and itself
    ours = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert ours == ["error (process 1 of 2): injected failure: disk went away"]
    assert "lora_train/" not in result.stderr  # no traceback of ours (torchrun adds its own summary)
    state = json.loads((tmp_path / "out" / "test-state" / "state.json").read_text())
    assert state["step"] in (1, 2)  # the last good state is kept


@pytest.mark.slow
def test_a_stopped_two_process_run_resumes_to_the_uninterrupted_lora(two_processes, tmp_path):
    """Ctrl-C reaching one process stops both after the same step with the state saved; resuming on two
    processes ends with the uninterrupted run's weights (here with images decoded per step instead of cached
    latents: each process decodes only its rows, ahead in a thread)."""
    folder, _ = two_processes
    config = write_config(tmp_path, cache_latents=False)
    stopped = torchrun(config, env={"LT_TEST_STOP_AT": "3"})
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped: 3/{STEPS} steps" in stopped.stdout
    state = tmp_path / "out" / "test-state"
    resumed = torchrun(config, f"resume={state}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"done: {STEPS}/{STEPS} steps" in resumed.stdout
    difference = max_difference(folder / "out" / "test.safetensors", tmp_path / "out" / "test.safetensors")
    print(f"max |resumed - uninterrupted| = {difference:.3g}")
    assert difference == 0


@pytest.mark.slow
def test_a_state_resumes_only_on_as_many_processes_as_it_had(two_processes, tmp_path):
    folder, _ = two_processes
    command = [sys.executable, "-m", "lora_train", "train", "--config", str(write_config(tmp_path)),
               f"--set=resume={folder / 'out' / 'test-state'}", f"--set=max_train_steps={STEPS + 1}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert "was trained on 2 process(es) and this run has 1" in result.stderr
    assert "torchrun --nproc_per_node 2" in result.stderr


@pytest.mark.slow
def test_accelerate_launch_and_multi_gpu_true_train_on_two_processes(tmp_path):
    pytest.importorskip("accelerate")
    config = write_config(tmp_path, max_train_steps=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    # on a machine with fewer than 2 GPUs accelerate needs --multi_gpu to start more than one process
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "-m", "lora_train", "train", "--config", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "test-state" / "state.json").read_text())["processes"] == 2
    command = [sys.executable, "-m", "lora_train", "train", "--config", str(config), "--set=multi_gpu=true",
               "--set=gpu_ids=[0, 1]", "--set=output_name=launched"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    assert "multi_gpu: 2 processes" in result.stdout
    assert json.loads((tmp_path / "out" / "launched-state" / "state.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_multi_gpu_true_says_a_failure_in_one_line(tmp_path):
    command = [sys.executable, "-m", "lora_train", "train", "--config", str(write_config(tmp_path)),
               "--set=multi_gpu=true", "--set=gpu_ids=[0, 1]", "--set=train_data_dir=/nonexistent"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_share_trains_its_rows_of_the_global_batch_with_their_noise_and_timesteps():
    """The unit behind the equality above: a process's rows and loss weight, and its rows' loss equal to those
    rows' part of the loss one process computes for the whole batch (same noise, same timesteps)."""
    from types import SimpleNamespace

    from lora_train.engine.model import Conditioning
    from lora_train.engine.train.distributed import Team
    from lora_train.engine.train.loss import diffusion_loss

    assert Team(1, 2).share([7, 8, 9, 10], 2).indices == [9, 10]
    short = Team(1, 2).share([7, 8], 2)
    assert short.weight == 0.0 and len(short.indices) == 1  # joins the all-reduce, adds nothing
    assert Team(0, 2).share([7, 8], 2).weight == 2.0  # DDP halves it back: the mean over the 2 images

    bundle = SimpleNamespace(dtype=torch.float32, parameterization="eps",
                             predict=lambda noisy, t, cond: noisy * 0 + t.view(-1, 1, 1, 1) / 1000)
    cfg = make_config(SAMPLE_DATA, Path("unused"), noise_offset=0.1)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    alphas = torch.linspace(0.99, 0.01, 1000)
    cond = Conditioning(torch.zeros(4, 1, 8))
    whole = [diffusion_loss(cfg, bundle, latents[i : i + 1], cond, alphas, torch.Generator().manual_seed(3),
                            rows_of=(slice(i, i + 1), 4)) for i in range(4)]
    rows = diffusion_loss(cfg, bundle, latents[2:4], cond, alphas, torch.Generator().manual_seed(3),
                          rows_of=(slice(2, 4), 4))
    full = diffusion_loss(cfg, bundle, latents, cond, alphas, torch.Generator().manual_seed(3))
    assert torch.allclose(full, torch.stack(whole).mean(), atol=0, rtol=1e-6)
    assert torch.allclose(rows, torch.stack(whole[2:]).mean(), atol=0, rtol=1e-6)
