"""Nothing lost: crash-safe resume state, one name for all of a run's files, writable outputs, rescued exports."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import SAMPLE_DATA, make_config

from lora_train.engine.config.settings import ConfigError
from lora_train.engine.output import export
from lora_train.engine.output.export import read_lora
from lora_train.engine.output.run_paths import RunPaths, reserve_run
from lora_train.engine.train import run_state
from lora_train.engine.train.progress import OutputWriteError, TrainCallbacks
from lora_train.engine.train.trainer import train


def assert_same_weights(a_path, b_path) -> None:
    a, _ = read_lora(a_path)
    b, _ = read_lora(b_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class Crash(Exception):
    """Stands for a kill at this point of the run."""


class CrashAtStep(TrainCallbacks):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, info):
        if info.step == self.step:
            raise Crash(f"killed at step {info.step}")


@pytest.fixture(scope="module")
def straight(_tiny_models, tmp_path_factory):
    """An uninterrupted 3-step run: what every resumed run below must end with, bit for bit (on CPU)."""
    work = tmp_path_factory.mktemp("straight")
    return train(make_config(SAMPLE_DATA, work, max_train_steps=3), copy.deepcopy(_tiny_models["tiny"])).output


# the writers of one state save, in order; the last one crashes after the new state.json is in place
SAVE_POINTS = [("atomic_write", 0), ("atomic_write", 1), ("atomic_write", 2), ("atomic_write", 3),
               ("atomic_write_text", 0), ("_remove_stale", 0)]


@pytest.mark.parametrize(("writer", "nth"), SAVE_POINTS)
def test_a_crash_during_a_state_save_keeps_the_last_good_state(tiny, dataset_dir, tmp_path, monkeypatch, straight,
                                                               writer, nth):
    work = tmp_path / "run"
    real = getattr(run_state, writer)
    calls = []

    def crashing(*args, **kwargs):
        if len(saves) == 2:  # the checkpoint at step 2; the one at step 1 completes
            calls.append(writer)
            if len(calls) == nth + 1:
                raise Crash(f"killed in {writer} #{nth}")
        return real(*args, **kwargs)

    saves = []
    real_save = run_state.save
    monkeypatch.setattr(run_state, "save", lambda folder, step, *a: saves.append(step) or real_save(folder, step, *a))
    monkeypatch.setattr(run_state, writer, crashing)
    with pytest.raises(Crash):
        train(make_config(dataset_dir, work, max_train_steps=3, save_every_n_steps=1), tiny)
    monkeypatch.undo()

    state = run_state.read(work / "test-state")
    assert state.step == (2 if writer == "_remove_stale" else 1)
    resumed = train(make_config(dataset_dir, work, max_train_steps=3, resume=str(work / "test-state")), tiny)
    assert resumed.steps == 3 and resumed.output == work / "test.safetensors"
    assert_same_weights(straight, resumed.output)
    assert sorted(p.name for p in (work / "test-state").iterdir()) == [
        "adapter-00000003.safetensors-state", "optimizer-00000003.pt", "scaler-00000003.pt",
        "scheduler-00000003.pt", "state.json"]


def test_resume_from_a_periodic_checkpoint_after_a_crash(tiny, dataset_dir, tmp_path, straight):
    work = tmp_path / "run"
    with pytest.raises(Crash):
        train(make_config(dataset_dir, work, max_train_steps=3, save_every_n_steps=2), tiny, CrashAtStep(3))
    assert not (work / "test.safetensors").exists()
    steps = []

    class Record(TrainCallbacks):
        def on_start(self, total_steps, start_step):
            steps.append(start_step)

    resumed = train(make_config(dataset_dir, work, max_train_steps=3, save_every_n_steps=2,
                                resume=str(work / "test-state")), tiny, Record())
    assert steps == [2]
    assert_same_weights(straight, resumed.output)


def test_a_rerun_after_a_crash_never_touches_the_crashed_runs_files(tiny, dataset_dir, tmp_path):
    work = tmp_path / "run"
    with pytest.raises(Crash):
        train(make_config(dataset_dir, work, max_train_steps=2, save_every_n_steps=1), tiny, CrashAtStep(2))
    crashed = {p: p.read_bytes() for p in work.rglob("*") if p.is_file() and ".latent_cache" not in p.parts}
    assert work / "test-step00000001.safetensors" in crashed
    rerun = train(make_config(dataset_dir, work, max_train_steps=2, save_every_n_steps=1), tiny)
    assert rerun.output == work / "test-2.safetensors" and rerun.state == work / "test-2-state"
    assert (work / "test-2-step00000001.safetensors").is_file()
    assert {p: p.read_bytes() for p in crashed} == crashed


def test_every_artifact_reserves_the_name(tmp_path):
    final, work = tmp_path / "loras", tmp_path / "runs"
    assert reserve_run(final, work, "x").name == "x"
    (work / ".latent_cache").mkdir(parents=True)  # shared by all runs: reserves nothing
    (work / "sample").mkdir()
    (work / "sample" / "x_2_000004_00.png").touch()  # a sample of the run "x_2", not of "x"
    assert reserve_run(final, work, "x").name == "x"
    for artifact in (final / "x.safetensors", work / "x-state", work / "x-step00000010.safetensors",
                     work / "sample" / "x_000010_00.png"):
        artifact.parent.mkdir(parents=True, exist_ok=True)
        artifact.mkdir() if artifact.suffix == "" else artifact.touch()
        paths = reserve_run(final, work, "x")
        assert paths == RunPaths.of(final, work, "x-2"), artifact
        assert reserve_run(final, work, "x", overwrite=True).name == "x"
        artifact.rmdir() if artifact.is_dir() else artifact.unlink()


def test_final_file_goes_to_its_own_folder_and_the_rest_to_the_work_folder(tiny, dataset_dir, tmp_path):
    final, work = tmp_path / "models" / "Lora", tmp_path / "runs"
    cfg = make_config(dataset_dir, work, max_train_steps=2, save_every_n_steps=1, sample_every_n_steps=2,
                      sample_prompts=["a red circle"], sample_steps=1)
    result = train(cfg, tiny, final_dir=final)
    assert result.output == final / "test.safetensors"
    assert [p.name for p in final.iterdir()] == ["test.safetensors"]  # nothing else becomes a Lora card
    assert (work / "test-step00000001.safetensors").is_file() and result.state == work / "test-state"
    assert result.samples == [work / "sample" / "test_000002_00.png"]
    (final / "test.safetensors").unlink()
    again = train(cfg, tiny, final_dir=final)  # the work folder's files alone reserve "test"
    assert again.output == final / "test-2.safetensors"


def test_resuming_a_finished_run_trains_longer_under_a_new_name(tiny, dataset_dir, tmp_path, straight):
    work = tmp_path / "run"
    first = train(make_config(dataset_dir, work, max_train_steps=2), tiny)
    original = first.output.read_bytes()
    assert run_state.read(first.state).finished
    starts = []

    class Record(TrainCallbacks):
        def on_start(self, total_steps, start_step):
            starts.append(start_step)

    longer = train(make_config(dataset_dir, work, max_train_steps=3, resume=str(first.state)), tiny, Record())
    assert starts == [2] and longer.steps == 3
    assert longer.output == work / "test-2.safetensors"
    assert first.output.read_bytes() == original
    assert_same_weights(straight, longer.output)
    replaced = train(make_config(dataset_dir, work, max_train_steps=3, resume=str(first.state), overwrite=True),
                     tiny)
    assert replaced.output == first.output
    assert_same_weights(straight, first.output)


def test_an_unwritable_output_folder_fails_before_any_training(tiny, dataset_dir, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the LoRA folder should be")
    started = []

    class Record(TrainCallbacks):
        def on_start(self, total_steps, start_step):
            started.append(start_step)

    with pytest.raises(ConfigError, match="not-a-folder") as error:
        train(make_config(dataset_dir, tmp_path / "work"), tiny, Record(), final_dir=blocker / "Lora")
    assert error.value.key == "output_dir" and started == []
    with pytest.raises(ConfigError, match="logging_dir"):
        train(make_config(dataset_dir, tmp_path / "work", logging_dir=str(blocker / "logs")), tiny, Record())
    assert started == []


def test_a_failed_final_write_saves_the_lora_elsewhere_and_says_where(tiny, dataset_dir, tmp_path, monkeypatch):
    final, work = tmp_path / "Lora", tmp_path / "work"
    real = export.write_lora

    def disk_full_in_final(path, tensors, metadata):
        if path.parent == final:
            raise OSError(28, "No space left on device")
        return real(path, tensors, metadata)

    monkeypatch.setattr(export, "write_lora", disk_full_in_final)
    with pytest.raises(OutputWriteError, match="No space left") as error:
        train(make_config(dataset_dir, work, max_train_steps=1), tiny, final_dir=final)
    rescued = work / "test.safetensors"
    assert str(rescued) in str(error.value)
    tensors, meta = read_lora(rescued)
    assert meta["ss_steps"] == "1" and all(torch.isfinite(t).all() for t in tensors.values())
    assert json.loads((work / "test-state" / "state.json").read_text())["step"] == 1


def test_a_state_folder_of_the_earlier_layout_still_resumes_and_is_tidied_by_the_next_save(tmp_path):
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    folder = tmp_path / "old-state"
    run_state.save(folder, 3, "old", False, [0.5], {"x.alpha": torch.tensor(1.0)}, optimizer, scheduler, scaler)
    for new in list(folder.iterdir()):  # the earlier layout: fixed names, no "files" in state.json
        if new.name != "state.json":
            new.rename(folder / new.name.replace("-00000003", ""))
    info = json.loads((folder / "state.json").read_text())
    del info["files"]
    (folder / "state.json").write_text(json.dumps(info))

    state = run_state.read(folder)
    assert state.step == 3 and run_state.load(state, optimizer, scheduler, scaler, torch.device("cpu"))
    run_state.save(folder, 4, "old", False, [0.5], {"x.alpha": torch.tensor(1.0)}, optimizer, scheduler, scaler)
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter-00000004.safetensors-state", "optimizer-00000004.pt", "scaler-00000004.pt",
        "scheduler-00000004.pt", "state.json"]
