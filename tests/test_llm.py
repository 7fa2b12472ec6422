"""The text-generation task (lora_train.llm) on the built-in tiny causal LM: data formats and label masks,
config spellings, a peft-loadable adapter with the training logits, merge, exact resume, generate."""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_train import llm
from lora_train.console import ConsoleCallbacks
from lora_train.engine.config.settings import ConfigError
from lora_train.engine.train.progress import TrainCallbacks
from lora_train.llm import data
from lora_train.llm import model as models
from lora_train.llm.config import ALIASES, LlmConfig, from_dict
from lora_train.llm.config import load as load_config
from lora_train.llm.generate import generate, load_for_generation
from lora_train.llm.train import LlmTrainer, train

ROOT = Path(__file__).resolve().parent.parent
PERSONA = ROOT / "lora_train" / "llm" / "sample_data" / "persona.jsonl"
EOS = 256  # the tiny tokenizer: token id = byte value, EOS = 256
CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def _tiny_llm():
    return models.load("tiny-llm", CPU)


@pytest.fixture
def tiny_llm(_tiny_llm):
    """A private copy of the tiny causal LM and its byte-level tokenizer (training injects LoRA into it)."""
    return copy.deepcopy(_tiny_llm[0]), _tiny_llm[1]


def make_config(tmp_path: Path, **overrides) -> LlmConfig:
    values = dict(train_data_dir=str(PERSONA), output_dir=str(tmp_path), output_name="test", lora_rank=4,
                  lora_alpha=8, batch_size=4, max_train_steps=4, learning_rate=5e-3, max_seq_length=96,
                  log_every_n_steps=1, device="cpu")
    values.update(overrides)
    return LlmConfig(**values)


def logits(model, tokenizer, text: str = "Who are you?\nNya~ I am") -> torch.Tensor:
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**encoded).logits


class Recorder(TrainCallbacks):
    """Keeps the log lines; stops once ``stop_at`` steps are done."""

    def __init__(self, stop_at: int | None = None):
        self.lines: list[str] = []
        self.stop_at, self.step = stop_at, 0

    def on_step(self, info):
        self.step = info.step

    def on_log(self, message):
        self.lines.append(message)

    def should_stop(self):
        return self.stop_at is not None and self.step >= self.stop_at


# ------------------------------------------------------------------------------------------------ data
def _ids(text: str) -> list[int]:
    return list(text.encode())


HI_YO = (_ids("Hi\n"), _ids("Yo") + [EOS])  # prompt side (no loss), response side (loss)


@pytest.mark.parametrize("line, expected", [
    ({"prompt": "Hi", "response": "Yo"}, HI_YO),
    ({"instruction": "Hi", "input": "", "output": "Yo"}, HI_YO),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, HI_YO),
    ({"instruction": "Add", "input": "1+1", "output": "2"}, (_ids("Add\n\n1+1\n"), _ids("2") + [EOS])),
    ({"text": "Hi Yo"}, ([], _ids("Hi Yo") + [EOS])),
    ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "A"},
                   {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"},
                   {"role": "assistant", "content": "D"}]},
     (_ids("S\nA\n"), _ids("B") + [EOS], _ids("C\n"), _ids("D") + [EOS])),
], ids=["prompt-response", "alpaca", "chat", "alpaca-input", "text", "multi-turn"])
def test_each_record_format_gives_the_hand_checked_tokens_and_mask(tmp_path, tiny_llm, line, expected):
    file = tmp_path / "d.jsonl"
    file.write_text(json.dumps(line) + "\n")
    (sample,), dropped = data.load_samples(file, tiny_llm[1], 64)
    ids = [t for part in expected for t in part]
    trained = [i % 2 == 1 for i, part in enumerate(expected) for _ in part]
    if isinstance(line, dict) and "text" in line:
        trained = [True] * len(ids)
    assert sample.input_ids == ids and dropped == 0
    assert sample.labels == [t if keep else data.IGNORE for t, keep in zip(ids, trained, strict=True)]


def test_txt_files_are_one_sample_per_line_or_per_block_and_json_holds_a_list(tmp_path, tiny_llm):
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a_lines.txt").write_text("one\ntwo\n")
    (folder / "b_blocks.txt").write_text("first\nblock\n\n\nsecond\n")
    (folder / "c_alpaca.json").write_text(json.dumps([{"instruction": "x", "input": "", "output": "y"}]))
    samples, _ = data.load_samples(folder, tiny_llm[1], 64)
    texts = ("one", "two", "first\nblock", "second")
    assert [s.input_ids for s in samples] == [_ids(t) + [EOS] for t in texts] + [_ids("x\ny") + [EOS]]
    assert all(s.labels == s.input_ids for s in samples[:4])
    assert samples[3].source.endswith("b_blocks.txt:5") and samples[4].source.endswith("c_alpaca.json record 1")


def test_chat_template_renders_turns_and_masks_only_the_assistant(tiny_llm):
    tokenizer = copy.deepcopy(tiny_llm[1])
    if not hasattr(tokenizer, "apply_chat_template"):
        pytest.skip("this transformers has no chat templates")
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.role == 'assistant' %}"
                               "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>"
                               "{% endif %}")
    segments = data.record_segments({"prompt": "Hi", "response": "Yo"}, "x:1", tokenizer)
    sample = data.tokenize(segments, tokenizer, "x:1")
    assert sample.input_ids == _ids("<user>Hi<assistant>Yo") + [EOS]
    assert sample.labels == [data.IGNORE] * len(_ids("<user>Hi<assistant>")) + _ids("Yo") + [EOS]
    assert data.prompt_text("Hi", tokenizer) == "<user>Hi<assistant>"
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(data.DataError, match="f.jsonl:4: .*roles must alternate"):
        data.record_segments({"prompt": "Hi", "response": "Yo"}, "f.jsonl:4", tokenizer)


@pytest.mark.parametrize("lines, line, words", [
    (['{"prompt": "a", "response": "b"}', "", '{"prompt": "a", "response": '], 3, "not valid JSON"),
    (['{"prompt": "a", "response": "b"}', '{"question": "a", "answer": "b"}'], 2, "expected"),
    (['{"prompt": "a", "response": ""}'], 1, '"response" must be non-empty'),
    (['{"prompt": "a", "respons": "b"}'], 1, 'missing "response"'),
    (['{"messages": [{"role": "user", "content": "a"}]}'], 1, "no assistant message"),
    (['["a", "b"]'], 1, "expected a JSON object"),
])
def test_a_malformed_record_names_its_file_and_line(tmp_path, tiny_llm, lines, line, words):
    file = tmp_path / "bad.jsonl"
    file.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match=words) as error:
        data.load_samples(file, tiny_llm[1], 64)
    assert f"{file}:{line}:" in str(error.value)


def test_max_seq_length_cuts_and_drops_samples_without_a_response_token(tmp_path, tiny_llm):
    file = tmp_path / "d.jsonl"
    file.write_text(json.dumps({"prompt": "a long question", "response": "yes"}) + "\n"
                    + json.dumps({"prompt": "q", "response": "long answer"}) + "\n")
    samples, dropped = data.load_samples(file, tiny_llm[1], 6)
    assert dropped == 1 and samples[0].input_ids == _ids("q\nlong")
    packed, dropped = data.load_samples(file, tiny_llm[1], 8, packing=True)
    text = _ids("a long question\nyes") + [EOS] + _ids("q\nlong answer") + [EOS]  # 34 tokens, blocks of 8
    assert dropped == 2  # the first two blocks hold only the first prompt
    assert [s.input_ids for s in packed] == [text[16:24], text[24:32], text[32:]]


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("example", sorted((ROOT / "examples" / "llm").glob("*.yaml")), ids=lambda p: p.name)
def test_llm_examples_are_valid_configs(example):
    cfg = load_config(example)
    assert llm.is_llm_config_file(example) and Path(cfg.train_data_dir).is_file()


def test_hf_trainer_and_lora_scripts_spellings_map_to_fields():
    cfg = from_dict({"task": "llm", "per_device_train_batch_size": 8, "num_train_epochs": 8,
                     "lr_scheduler_type": "cosine", "warmup_ratio": 0.03, "fp16": True, "logging_steps": 50,
                     "save_steps": 200, "max_steps": 7, "alpha": 32, "lora_r": 16, "optim": "adamw_torch",
                     "train_file": "x.jsonl"})
    assert (cfg.batch_size, cfg.epochs, cfg.lr_scheduler, cfg.warmup_ratio, cfg.mixed_precision) == (
        8, 8, "cosine", 0.03, "fp16")
    assert (cfg.log_every_n_steps, cfg.save_every_n_steps, cfg.max_train_steps) == (50, 200, 7)
    assert (cfg.lora_alpha, cfg.lora_rank, cfg.optimizer, cfg.train_data_dir) == (32, 16, "adamw", "x.jsonl")
    assert llm.is_llm_config({"task_type": "text-generation"}) and not llm.is_llm_config({"base_model": "tiny"})


def test_the_llm_readme_documents_every_key_and_alias():
    readme = (ROOT / "lora_train" / "llm" / "README.md").read_text()
    assert [k for k in [*LlmConfig.__dataclass_fields__, *ALIASES] if f"`{k}`" not in readme] == []


@pytest.mark.parametrize("values, key, words", [
    ({"lora_rnak": 4}, "lora_rnak", "did you mean 'lora_rank'"),
    ({"fp16": True, "bf16": True}, "fp16", "choose one"),
    ({"warmup_ratio": 0.1, "warmup_steps": 5}, "warmup_ratio", "not both"),
    ({"alpha": 8, "lora_alpha": 16}, "lora_alpha", "another spelling"),
    ({"learning_rate": "fast"}, "learning_rate", "not a number"),
])
def test_bad_config_names_the_key(values, key, words):
    with pytest.raises(ConfigError, match=words) as error:
        from_dict(values)
    assert error.value.key == key


def test_bad_model_inputs_name_the_key(tmp_path, tiny_llm):
    with pytest.raises(ConfigError) as error:
        models.load(str(tmp_path), CPU)
    assert error.value.key == "base_model"
    with pytest.raises(ConfigError) as error:
        models.load("tiny-llm", CPU, bits=4)
    assert error.value.key == "load_in_4bit" and "GPU" in str(error.value)
    with pytest.raises(ConfigError, match="q_proj") as error:
        models.lora_targets(tiny_llm[0], ["qproj"])
    assert error.value.key == "target_modules"
    with pytest.raises(ConfigError, match="512 positions") as error:
        LlmTrainer(make_config(tmp_path, max_seq_length=4096), loaded=tiny_llm)
    assert error.value.key == "max_seq_length"


def _family_configs():
    import transformers

    names = {"GPT2Config": ("gpt2", dict(n_embd=32, n_layer=1, n_head=2), {"c_attn"}),
             "LlamaConfig": ("llama", {}, {"q_proj", "v_proj"}),
             "MistralConfig": ("mistral", {}, {"q_proj", "v_proj"}),
             "Qwen2Config": ("qwen2", {}, {"q_proj", "v_proj"})}
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=300)
    for name, (family, extra, targets) in names.items():
        mark = pytest.mark.skipif(not hasattr(transformers, name), reason=f"no {name} in this transformers")
        yield pytest.param(name, extra or small, targets, id=family, marks=mark)


@pytest.mark.parametrize("config_name, values, expected", list(_family_configs()))
def test_default_lora_layers_per_architecture(config_name, values, expected):
    import transformers
    from peft import LoraConfig, get_peft_model

    config = getattr(transformers, config_name)(**values, vocab_size=300) if "n_embd" in values else \
        getattr(transformers, config_name)(**values)
    model = transformers.AutoModelForCausalLM.from_config(config)
    targets = models.lora_targets(model, [])
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=targets, task_type="CAUSAL_LM"))
    lora_layers = {name.split(".")[-2] for name, _ in wrapped.named_modules() if name.endswith(".lora_A")}
    assert lora_layers == expected


def test_a_local_gpt2_folder_trains_c_attn_and_its_adapter_loads(tmp_path, tiny_llm):
    import transformers

    folder = tmp_path / "gpt2"
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=257, bos_token_id=EOS,
                                     eos_token_id=EOS)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(folder), **models.save_kwargs(
        transformers.GPT2LMHeadModel.save_pretrained))
    tiny_llm[1].save_pretrained(str(folder))
    trainer = LlmTrainer(make_config(tmp_path, base_model=str(folder), max_train_steps=2), loaded=None)
    result = trainer.run()
    adapter_config = json.loads((result.output / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == ["c_attn"] and adapter_config["base_model_name_or_path"] == str(folder)
    model, tokenizer = load_for_generation(None, str(result.output), "cpu")  # base found from adapter_config
    assert torch.allclose(logits(model, tokenizer), logits(trainer.model, tokenizer), atol=1e-6)


# ---------------------------------------------------------------------------------------------- training
def test_adapter_and_merged_model_give_the_training_models_logits(tmp_path, tiny_llm):
    tokenizer = tiny_llm[1]
    trainer = LlmTrainer(make_config(tmp_path, max_train_steps=3), loaded=tiny_llm)
    result = trainer.run()
    trained = logits(trainer.model, tokenizer)
    adapter = result.output
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}

    from peft import PeftModel

    fresh = PeftModel.from_pretrained(models.load("tiny-llm", CPU)[0], str(adapter))
    base = logits(models.load("tiny-llm", CPU)[0], tokenizer)
    assert torch.allclose(logits(fresh, tokenizer), trained, atol=1e-6)
    assert not torch.allclose(base, trained, atol=1e-3)  # the adapter changed the model

    trainer.merge(trainer.model)  # what --merge does after training
    merged, merged_tokenizer = load_for_generation(str(tmp_path / "test-merged"), None, "cpu")
    assert torch.allclose(logits(merged, merged_tokenizer), trained, atol=1e-5)
    answers = [generate(m, t, "Who are you?", max_new_tokens=12) for m, t in ((merged, merged_tokenizer),
                                                                               (fresh, tokenizer))]
    assert answers[0] == answers[1]


def test_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path, tiny_llm):
    settings = dict(max_train_steps=6, batch_size=2, gradient_accumulation_steps=2, lora_dropout=0.1,
                    lr_scheduler="cosine", lr_warmup_steps=2)
    straight = train(make_config(tmp_path / "a", **settings), loaded=copy.deepcopy(tiny_llm))
    stopper = Recorder(stop_at=3)
    first = train(make_config(tmp_path / "b", **settings), stopper, loaded=copy.deepcopy(tiny_llm))
    checkpoint = tmp_path / "b" / "test-step00000003"
    assert first.stopped and first.steps == 3 and (checkpoint / "adapter_model.safetensors").is_file()
    assert any("resume=" in line for line in stopper.lines)
    resumed = train(make_config(tmp_path / "b", resume=str(checkpoint), **settings), loaded=copy.deepcopy(tiny_llm))
    assert resumed.steps == 6 and resumed.output == first.output
    assert resumed.loss_history == straight.loss_history
    a = load_file(str(straight.output / "adapter_model.safetensors"))
    b = load_file(str(resumed.output / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path, tiny_llm):
    plain = train(make_config(tmp_path / "a", max_train_steps=2, lora_dropout=0.1), loaded=copy.deepcopy(tiny_llm))
    saved = train(make_config(tmp_path / "b", max_train_steps=2, lora_dropout=0.1, gradient_checkpointing=True),
                  loaded=copy.deepcopy(tiny_llm))
    a = load_file(str(plain.output / "adapter_model.safetensors"))
    b = load_file(str(saved.output / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a) and saved.loss_history == pytest.approx(
        plain.loss_history, abs=1e-6)


def test_checkpoints_are_adapters_and_nothing_is_overwritten(tmp_path, tiny_llm):
    first = train(make_config(tmp_path, max_train_steps=2, save_every_n_steps=1), loaded=copy.deepcopy(tiny_llm))
    assert json.loads((tmp_path / "test-step00000001" / "state.json").read_text())["step"] == 1
    assert (tmp_path / "test-step00000001" / "adapter_config.json").is_file()
    second = train(make_config(tmp_path, max_train_steps=1), loaded=copy.deepcopy(tiny_llm))
    assert first.output.name == "test" and second.output.name == "test-2"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_network_weights_continue_from_an_adapter(tmp_path, tiny_llm):
    fresh = train(make_config(tmp_path / "a", max_train_steps=5, lora_rank=4, learning_rate=1e-2),
                  loaded=copy.deepcopy(tiny_llm))
    recorder = Recorder()
    continued = train(make_config(tmp_path / "b", max_train_steps=1, lora_rank=16, network_weights=str(fresh.output)),
                      recorder, loaded=copy.deepcopy(tiny_llm))
    assert continued.loss_history[0] < fresh.loss_history[0] - 0.3, (continued.loss_history, fresh.loss_history)
    assert any("rank 4" in line for line in recorder.lines)
    assert json.loads((continued.output / "adapter_config.json").read_text())["r"] == 4


def test_tiny_example_loss_falls_and_changes_the_generation(tmp_path):
    recorder = Recorder()
    result = llm.run(ROOT / "examples" / "llm" / "tiny.yaml",
                     [f"output_dir={tmp_path}", "max_train_steps=10", "log_every_n_steps=2",
                      "save_every_n_steps=0"], recorder)
    assert result.steps == 10 and (tmp_path / "tiny-persona" / "adapter_model.safetensors").is_file()
    assert sum(result.loss_history[-2:]) / 2 < 0.8 * result.loss_history[0], result.loss_history
    before, after = (line for line in recorder.lines if line.startswith("sample"))
    assert before.split("->")[1] != after.split("->")[1]


@pytest.mark.slow
def test_tiny_example_as_documented_teaches_the_persona(tmp_path):
    """The README's run, all 60 steps: the answer to a training prompt takes the persona's opening."""
    recorder = Recorder()
    result = llm.run(ROOT / "examples" / "llm" / "tiny.yaml", [f"output_dir={tmp_path}"], recorder)
    before, after = (line.split(" -> ")[1] for line in recorder.lines if line.startswith("sample"))
    assert after.startswith("'Nya~") and not before.startswith("'Nya~")
    assert result.loss_history[-1] < 0.5 * result.loss_history[0], result.loss_history


def test_published_hf_style_persona_config_runs_verbatim(tmp_path):
    """Every key as published; only the data (10 of the persona lines) and the output folder are swapped."""
    small = tmp_path / "persona10.jsonl"
    small.write_text("".join(PERSONA.read_text().splitlines(keepends=True)[:10]))
    callbacks = ConsoleCallbacks()  # the CLI's progress bar drives this loop too
    result = llm.run(ROOT / "examples" / "llm" / "persona-hf-style.yaml",
                     [f"output_dir={tmp_path}", f"train_file={small}"], callbacks)
    callbacks.bar.close()
    micro_batches = 8 * math.ceil(10 / 8)  # 8 epochs of 10 samples at batch 8
    assert result.steps == result.total_steps == math.ceil(micro_batches / 4)
    assert (result.output / "adapter_config.json").is_file() and len(result.loss_history) == 1
    if importlib.util.find_spec("tensorboard") is not None:  # lora-scripts users find their logs here
        assert any((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_generate_subcommand_uses_the_adapters_base(tmp_path, tiny_llm, capsys):
    result = train(make_config(tmp_path, max_train_steps=2), loaded=copy.deepcopy(tiny_llm))
    parser = argparse.ArgumentParser()
    llm.add_generate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", "--adapter", str(result.output), "--prompt", "Who are you?",
                              "--max-new-tokens", "8", "--device", "cpu"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    model, tokenizer = load_for_generation("tiny-llm", str(result.output), "cpu")
    assert printed == generate(model, tokenizer, "Who are you?", max_new_tokens=8)


def test_cpu_run_with_fp16_says_it_trains_in_float32(tmp_path, tiny_llm):
    recorder = Recorder()
    trainer = LlmTrainer(make_config(tmp_path, mixed_precision="fp16"), recorder, loaded=tiny_llm)
    assert trainer.cfg.mixed_precision == "no" and any("float32" in line for line in recorder.lines)


def test_nothing_outside_llm_imports_it_at_module_level():
    """The WebUI loads lora_train's modules; none may pull in the text-generation task when imported."""
    offenders = []
    for path in (ROOT / "lora_train").rglob("*.py"):
        if "llm" in path.relative_to(ROOT / "lora_train").parts:
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module or ''}.{a.name}" for a in node.names]
            offenders += [f"{path.name}: {n}" for n in names if "llm" in n.split(".")]
    assert not offenders


def test_the_cli_dispatch_check_stays_light():
    """``is_llm_config_file`` runs for every `train`; it must not load torch or transformers."""
    code = ("import sys, lora_train.llm as llm\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
