"""Validation loss: held-out images never train, the split is stable, the fixed draws make the number repeatable."""

from __future__ import annotations

import json
import shutil

from conftest import make_config

from lora_train.engine.data import dataset
from lora_train.engine.data.split import split_validation
from lora_train.engine.network import lora
from lora_train.engine.output.export import read_lora
from lora_train.engine.train import trainer
from lora_train.engine.train.progress import TrainCallbacks
from lora_train.engine.train.trainer import train


def _names(items) -> set[str]:
    return {item.path.name for item in items}


def test_split_is_stable_for_a_seed_disjoint_and_keeps_reg_images(dataset_dir, tmp_path):
    reg = tmp_path / "reg"
    shutil.copytree(dataset_dir, reg)
    scanned = dataset.scan(make_config(dataset_dir, tmp_path, reg_data_dir=str(reg)))
    train_a, held_a = split_validation(scanned, 0.34, seed=7)
    train_b, held_b = split_validation(dataset.scan(make_config(dataset_dir, tmp_path, reg_data_dir=str(reg))),
                                       0.34, seed=7)
    assert _names(held_a.items) == _names(held_b.items) and len(held_a.items) == 2
    assert all(not item.is_reg for item in held_a.items)
    train_paths = {item.path for item in train_a.items if not item.is_reg}
    assert train_paths.isdisjoint(item.path for item in held_a.items)
    assert train_paths | {item.path for item in held_a.items} == {i.path for i in scanned.items if not i.is_reg}
    assert sum(item.is_reg for item in train_a.items) == 6  # regularization folders are never split
    others = {frozenset(_names(split_validation(scanned, 0.34, seed)[1].items)) for seed in range(8)}
    assert len(others) > 1  # the seed decides which images are held out


def test_held_out_images_never_reach_the_optimizer(tiny, dataset_dir, tmp_path, monkeypatch):
    trained: list[str] = []
    original = trainer.Trainer._loss

    def recording(self, indices, seed):
        trained.extend(self.dataset.items[i].path.name for i in indices)
        return original(self, indices, seed)

    monkeypatch.setattr(trainer.Trainer, "_loss", recording)
    seen: list[tuple[int, float, int]] = []

    class Recorder(TrainCallbacks):
        def on_validation(self, step, loss, best_step):
            seen.append((step, loss, best_step))

    cfg = make_config(dataset_dir, tmp_path, validation_split=0.34, validate_every_n_steps=3, max_train_steps=12,
                      batch_size=1)
    run = trainer.Trainer(cfg, tiny, Recorder())
    held = _names(run.validator.dataset.items)
    result = run.run()
    assert len(held) == 2 and len(set(trained)) == 4 and held.isdisjoint(trained)
    # every 3 steps, and at each epoch's end (4 images, batch 1: steps 4, 8, 12) as kohya does by default
    assert [s for s, _, _ in seen] == [3, 4, 6, 8, 9, 12] and result.validation == [(s, v) for s, v, _ in seen]
    best = min(result.validation, key=lambda p: p[1])
    assert seen[-1][2] == best[0]
    _, meta = read_lora(result.output)
    assert meta["ss_num_validation_images"] == "2" and meta["ss_validation_split"] == "0.34"
    assert meta["ss_validate_every_n_steps"] == "3" and meta["ss_num_train_images"] == "4"
    stored = json.loads(meta["lora_train_validation"])
    assert stored["best_step"] == best[0] and [p[0] for p in stored["points"]] == [3, 4, 6, 8, 9, 12]


def test_same_weights_give_the_same_validation_loss_and_training_is_unchanged_by_it(tiny, dataset_dir, tmp_path):
    common = dict(validation_split=0.34, max_train_steps=6, batch_size=1)
    validated = train(make_config(dataset_dir, tmp_path / "a", validate_every_n_steps=1, **common), tiny)
    plain = train(make_config(dataset_dir, tmp_path / "b", validate_every_n_epochs=1000, **common), tiny)
    assert len(validated.validation) == 6 and plain.validation == []
    assert read_lora(validated.output)[0].keys() == read_lora(plain.output)[0].keys()
    for key, tensor in read_lora(validated.output)[0].items():
        assert tensor.equal(read_lora(plain.output)[0][key]), key  # validation draws nothing from training's RNG

    cfg = make_config(dataset_dir, tmp_path / "c", **common)
    run = trainer.Trainer(cfg, tiny)
    tensors, _ = read_lora(validated.output)
    network = lora.inject(tiny.lora_targets(False), 4, 4, 0.0)
    try:
        lora.load_kohya(network, tensors, "trained")
        first, second = run.validator.run(6), run.validator.run(6)
    finally:
        lora.remove(network)
        run.validator.close()
    assert first == second
    assert abs(first - validated.validation[-1][1]) < 1e-5  # the saved weights (float) validate as in the run


def test_the_tab_and_the_api_show_the_curve_and_its_best_point(tmp_path):
    from lora_train.engine.config.settings import TrainConfig
    from lora_train.webui import ui_status
    from lora_train.webui.jobs import Job

    off = Job(id="a", cfg=TrainConfig(output_dir=str(tmp_path)))
    assert "Validation split" in ui_status.validation_text(off) and off.to_dict()["validation"]["enabled"] is False
    job = Job(id="b", cfg=TrainConfig(output_dir=str(tmp_path), validation_split=0.2), state="running")
    job.losses = [(1, 0.3), (2, 0.2)]
    job.validation = [(2, 0.5), (4, 0.4), (6, 0.45)]
    assert "best at step 4" in ui_status.validation_text(job) and "overfitting" in ui_status.validation_text(job)
    frame = ui_status.loss_frame(job)
    assert list(frame["series"]) == ["training"] * 2 + ["validation"] * 3
    state = job.to_dict()["validation"]
    assert state["best_step"] == 4 and state["points"] == [[2, 0.5], [4, 0.4], [6, 0.45]]
