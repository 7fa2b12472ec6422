"""The benchmarks in bench/ still run: each at its smallest size for a step or two. No timing is asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import cpu_step, end_to_end, gpu_step  # noqa: E402

THREADS = ["--threads", "1"]  # one thread: no OpenMP oversubscription stalls on a busy CI runner


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """The benches set torch's thread count; give the rest of the session back what it had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cpu_step_prints_a_ratio(capsys):
    # one step of the tiny model on a busy runner can land anywhere: a ratio below 0.9 then ends as a
    # "measurement error" (exit 3) instead of a result, which is the self-check working
    status = cpu_step.run(["--model", "tiny", "--steps", "1", "--warmup", "1", "--repeats", "1", "--images", "2",
                           *THREADS])
    out = capsys.readouterr().out
    assert "ratio ours/reference (wall) = " in out and "ratio ours/reference (cpu) = " in out
    assert status == 0 or (status == 3 and "MEASUREMENT ERROR, not a result" in out)


def test_the_step_clock_times_optimizer_steps_and_refuses_any_other_window():
    from bench.common import MeasurementError, StepClock
    from lora_train.engine.train.progress import StepInfo

    def drive(clock: StepClock, steps: list[int]) -> None:
        for _ in range(8):  # latent caching asks should_stop once per image: no stamp may come from it
            assert clock.should_stop() is False
        for step in steps:
            clock.should_stop()
            clock.on_step(StepInfo(step, 10, 0, None, 1e-4, 0.0, 0.0))

    clock = StepClock(warmup=2, steps=3, device=torch.device("cpu"))
    drive(clock, [1, 2, 3, 4, 5, 6])
    assert clock.window_steps == [3, 4, 5] and clock.timing.wall >= 0
    skipped = StepClock(warmup=2, steps=3, device=torch.device("cpu"))
    drive(skipped, [1, 2, 3, 5, 6])  # step 4 never reported, the window reaches step 5 late
    with pytest.raises(MeasurementError, match="not exactly 3"):
        _ = skipped.timing
    short = StepClock(warmup=2, steps=3, device=torch.device("cpu"))
    drive(short, [1, 2, 3])  # the run ended inside the window
    with pytest.raises(MeasurementError):
        _ = short.timing


def test_end_to_end_prints_the_overhead(capsys):
    fraction = end_to_end.main(["--model", "tiny", "--steps", "2", "--images", "2", "--profile", "--top", "3",
                                *THREADS])
    out = capsys.readouterr().out
    assert "overhead = " in out and "(ratio " in out and "cProfile" in out
    assert 0 < fraction < 1


def test_gpu_step_counts_flops_anywhere(capsys):
    gpu_step.main(["--flops-only", "--flops-model", "tiny-sdxl", "--flops-batch", "2"])
    assert "TFLOP per sample" in capsys.readouterr().out
    assert gpu_step.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_step.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_step.peak_tflops("Some Future Card") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_gpu_step_exits_cleanly_without_cuda(capsys):
    assert gpu_step.main(["--skip-sdxl"]) == []
    assert "CUDA is not available" in capsys.readouterr().out


@pytest.mark.slow
def test_multi_process_prints_samples_per_second_for_1_and_2_processes(capsys):
    from bench import multi_process

    results = multi_process.main(["--steps", "1", "--warmup", "1", "--images", "4"])
    out = capsys.readouterr().out
    assert [r["processes"] for r in results] == [1, 2] and all(r["samples"] > 0 for r in results)
    assert "| 2 | 4 |" in out
    if not torch.cuda.is_available():
        assert "no GPU" in out
