"""Config: kohya names accepted, bad input stopped before any work with the key named."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lora_train.engine.config import fields, yaml_io
from lora_train.engine.config import settings as config
from lora_train.engine.config.settings import ConfigError, TrainConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_it_and_suggests_the_nearest(tmp_path):
    path = write(tmp_path, "learnig_rate: 1e-4\n")
    with pytest.raises(ConfigError) as err:
        yaml_io.load(path)
    assert err.value.key == "learnig_rate"
    assert "learning_rate" in str(err.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("lora_rank: eight\n", "lora_rank"),
        ("lora_rank: 0\n", "lora_rank"),
        ("optimizer: adam9000\n", "optimizer"),
        ("lr_scheduler: cosine_forever\n", "lr_scheduler"),
        ("mixed_precision: fp8\n", "mixed_precision"),
        ("resolution: 500x500\n", "resolution"),
        ("caption_dropout_rate: 1.5\n", "caption_dropout_rate"),
        ("output_name: ../escape\n", "output_name"),
        ("sample_every_n_steps: 10\n", "sample_prompts"),
        ("epochs: 2.5\n", "epochs"),
    ],
)
def test_bad_value_names_key_and_value(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        yaml_io.load(write(tmp_path, text))
    assert err.value.key == key
    assert key in str(err.value)


def test_kohya_aliases_and_yaml_quirks(tmp_path):
    path = write(
        tmp_path,
        "network_dim: 16\nnetwork_alpha: 8\ntrain_batch_size: 3\noptimizer_type: AdamW8bit\n"
        "mixed_precision: no\nlearning_rate: 1e-4\nnetwork_train_unet_only: false\n",
    )
    cfg = yaml_io.load(path)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.batch_size) == (16, 8.0, 3)
    assert cfg.optimizer == "adamw8bit"
    assert cfg.mixed_precision == "no"
    assert cfg.learning_rate == pytest.approx(1e-4)  # YAML reads 1e-4 as a string; we convert
    assert cfg.train_text_encoder is True


def test_set_overrides_keep_types_and_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    path = write(tmp_path, "train_data_dir: imgs\nepochs: 3\n")
    cfg = yaml_io.load(path, ["learning_rate=5e-5", "epochs=12", "shuffle_caption=true"])
    assert cfg.epochs == 12 and cfg.shuffle_caption is True
    assert cfg.learning_rate == pytest.approx(5e-5)
    assert Path(cfg.train_data_dir) == (tmp_path / "imgs").resolve()
    with pytest.raises(ConfigError, match="key=value"):
        yaml_io.load(path, ["epochs"])


def test_dump_and_load_round_trip(tmp_path):
    cfg = TrainConfig(train_data_dir="/data", output_dir="/out", lora_rank=32, sample_prompts=["a cat"],
                      optimizer_args={"betas": [0.9, 0.99]})
    path = write(tmp_path, yaml_io.dump(cfg))
    assert yaml_io.load(path) == cfg


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        yaml_io.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        yaml_io.load(write(tmp_path, "- a\n- b\n"))


def test_set_paths_resolve_against_the_current_folder(tmp_path, monkeypatch):
    """README: `--set resume=output/<name>-state` after a run started from the project folder."""
    (tmp_path / "configs").mkdir()
    path = (tmp_path / "configs" / "c.yaml")
    path.write_text("train_data_dir: imgs\nsample_prompts: prompts.txt\n")
    monkeypatch.chdir(tmp_path)
    cfg = yaml_io.load(path, ["resume=output/lora-state", "network_weights=~/style.safetensors"])
    assert Path(cfg.resume) == (tmp_path / "output" / "lora-state").resolve()
    assert Path(cfg.network_weights) == Path("~/style.safetensors").expanduser()
    # paths in the file stay relative to the file, the prompts file included
    assert Path(cfg.train_data_dir) == (tmp_path / "configs" / "imgs").resolve()
    assert cfg.sample_prompts == [str((tmp_path / "configs" / "prompts.txt").resolve())]


def test_kohya_path_aliases_resolve_against_the_file_too(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    cfg = yaml_io.load(write(tmp_path, "pretrained_model_name_or_path: model.safetensors\n"))
    assert cfg.base_model == str((tmp_path / "model.safetensors").resolve())


@pytest.mark.parametrize("given", ["txt", ".txt", "caption", ".caption"])
def test_caption_extension_with_or_without_its_dot(given):
    assert TrainConfig(caption_extension=given).caption_extension == "." + given.lstrip(".")


def test_bad_caption_extension_names_the_key():
    with pytest.raises(ConfigError, match="caption_extension"):
        TrainConfig(caption_extension="a/b")


LORA_SCRIPTS_STYLE = """\
train_data_dir: ./data/style_train
metadata_path: ./data/style_train/metadata.csv
base_model: ./models/Stable-diffusion/v1-5-pruned.safetensors
lora_rank: 8
{alpha_key}: 16
batch_size: 4
epochs: 10
learning_rate: 2e-4
optimizer: adamw8bit
scheduler: cosine
output_dir: ./output/my_style_lora
save_steps: 100
"""


def test_published_lora_scripts_spellings_mean_our_keys(tmp_path):
    path = tmp_path / "style.yaml"
    for alpha_key in ("lora_alpha", "alpha"):
        path.write_text(LORA_SCRIPTS_STYLE.format(alpha_key=alpha_key), encoding="utf-8")
        cfg = yaml_io.load(path)
        assert (cfg.lora_alpha, cfg.lr_scheduler, cfg.save_every_n_steps) == (16.0, "cosine", 100), alpha_key


def test_published_lora_scripts_config_runs_as_written(tmp_path, dataset_dir, tiny):
    """lora-scripts' published style config, verbatim but for its three paths (test data, the tiny model)."""
    pytest.importorskip("bitsandbytes")
    from lora_train.engine.train.trainer import train

    project = tmp_path / "project"
    data = project / "data" / "style_train"
    data.parent.mkdir(parents=True)
    dataset_dir.rename(data)
    rows = [f"{p.name},{p.with_suffix('.txt').read_text().strip()}" for p in sorted(data.glob("*.png"))]
    (data / "metadata.csv").write_text("filename,prompt\n" + "\n".join(rows) + "\n", encoding="utf-8")
    text = LORA_SCRIPTS_STYLE.format(alpha_key="alpha").replace(
        "./models/Stable-diffusion/v1-5-pruned.safetensors", "tiny")
    path = project / "style.yaml"
    path.write_text(text, encoding="utf-8")
    cfg = yaml_io.load(path)
    assert (cfg.lora_alpha, cfg.lr_scheduler, cfg.save_every_n_steps, cfg.optimizer) == (16.0, "cosine", 100,
                                                                                         "adamw8bit")
    assert cfg.metadata_path == str(data / "metadata.csv")
    result = train(cfg, tiny)
    output = project / "output" / "my_style_lora"
    assert result.output == output / "lora.safetensors" and result.steps == result.total_steps
    assert result.facts.num_epochs == 10 and result.total_steps == 10 * result.facts.batches_per_epoch
    if importlib.util.find_spec("tensorboard") is not None:  # lora-scripts users find their logs here
        assert any((output / "logs").rglob("events.out.tfevents.*"))


def test_readme_config_table_is_generated_from_the_field_metadata_and_current(tmp_path: Path) -> None:
    from lora_train.engine.config import doc as config_doc

    readme = config_doc.README.read_text(encoding="utf-8")
    assert config_doc.main(["--check"]) == 0, f"README's config table is stale; run {config_doc.REGENERATE}"
    table = readme.split(config_doc.BEGIN, 1)[1].split(config_doc.END, 1)[0]
    documented = [info.name for info in config.field_infos()]
    assert documented == list(TrainConfig.__dataclass_fields__)  # every key, none missing
    keys = [*documented, *fields.ALIASES, *fields.INVERTED_ALIASES]
    assert [key for key in keys if f"`{key}`" not in table] == []
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace("| `lora_rank` | 8 |", "| `lora_rank` | 4 |"), encoding="utf-8")
    assert config_doc.main(["--check", "--readme", str(stale)]) == 1
    assert config_doc.main(["--readme", str(stale)]) == 0 and stale.read_text(encoding="utf-8") == readme


def test_a_field_without_help_is_refused() -> None:
    import dataclasses

    from lora_train.engine.config.fields import describe, setting

    @dataclasses.dataclass
    class Partial:
        documented: int = setting(1, group="Data", label="Documented", help="Has help.")
        bare: int = 2

    with pytest.raises(ValueError, match="'bare' has no help"):
        describe(Partial)
