"""Config fields as the tab's widgets and back: one widget per TrainConfig field, chosen from its type, labelled
and explained by the field's metadata (``engine/config/fields``), so a new key shows up without UI work.

Every field keeps a widget (hidden where it does nothing), so the form always carries a whole config.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gradio as gr
import yaml

from lora_train.caption.choices import CaptionSources
from lora_train.engine.config.fields import GROUPS, FieldInfo
from lora_train.engine.config.settings import ConfigError, TrainConfig, field_infos
from lora_train.webui.presets import DEFAULT_PRESET, preset_values
from lora_train.webui.ui_caption import DOWNLOADS_SETTING
from lora_train.webui.ui_gradio import make

FIELD_NAMES = [f.name for f in dataclasses.fields(TrainConfig)]
MAIN_FIELDS = ("train_data_dir", "output_name", "trigger_word")  # at the top of the tab, not in Advanced
INFOS = {info.name: info for info in field_infos()}


@dataclass
class UISettings:
    """What the host decides about the tab: where uploads go, the captioner's weights, the default preset."""

    datasets_root: Path
    captioner_weights: str | None = None
    default_preset: str = DEFAULT_PRESET
    defaults: dict[str, Any] = field(default_factory=dict)
    captioner_setting: str = "Settings > LoRA Train > Captioner weights"  # named when the weights are missing
    caption_sources: Callable[[], CaptionSources] | None = None  # read at each click; None: CoCa + WD14 only
    downloads_setting: str = DOWNLOADS_SETTING  # named when downloads are off

    def captioners(self) -> CaptionSources:
        return self.caption_sources() if self.caption_sources else CaptionSources(coca_weights=self.captioner_weights)


def initial_config(settings: UISettings, family: str | None, device: str = "cuda") -> dict[str, Any]:
    """The form's starting values: config defaults, then the default preset for the family and device, then the
    host's."""
    data = TrainConfig().to_dict()
    data.update(preset_values(settings.default_preset, family, device))
    data.update(settings.defaults)
    return data


def shown_in_tab(info: FieldInfo, in_webui: bool) -> bool:
    """Whether the tab shows a field: not the ones the tab sets itself, nor inside the WebUI the ones the WebUI
    decides (its loaded model, its device)."""
    return info.scope == "both" or (info.scope == "standalone" and not in_webui)


def _optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner[0], True
    return annotation, False


def _kind(name: str) -> tuple[Any, bool]:
    """(type without None, whether None is allowed) of a config field."""
    return _optional(typing.get_type_hints(TrainConfig)[name])


def widget(name: str, value: Any, in_webui: bool = False, **extra: Any) -> Any:
    """One widget for a config field: its kind from the type, its label and tooltip from the metadata."""
    info = INFOS[name]
    kind, optional = _kind(name)
    common = {"label": info.label, "info": info.help.replace("`", ""), "elem_id": f"lora_train_cfg_{name}",
              "visible": shown_in_tab(info, in_webui), **extra}
    if typing.get_origin(kind) is Literal:
        return make(gr.Dropdown, choices=list(typing.get_args(kind)), value=value, **common)
    if kind is bool and optional:
        return make(gr.Dropdown, choices=["auto", "true", "false"], value=to_widget(name, value), **common)
    if kind is bool:
        return make(gr.Checkbox, value=bool(value), **common)
    if kind in (int, float) and not optional:
        return make(gr.Number, value=value, precision=0 if kind is int else None, **common)
    lines = 3 if typing.get_origin(kind) in (list, dict) else 1
    placeholder = (info.unset or "not set").replace("`", "") if optional else None  # tooltips are plain text
    return make(gr.Textbox, **{"value": to_widget(name, value), "lines": lines, "placeholder": placeholder, **common})


# The tab's one-click network choice, as kohya / lora-scripts users write each type (Advanced keeps every key).
NETWORK_TYPES: dict[str, dict[str, Any]] = {
    "LoRA": {"network_module": "networks.lora", "network_args": [], "conv_dim": 0},
    "LoCon": {"network_module": "networks.lora", "network_args": [], "conv_dim": 8, "conv_alpha": 4.0},
    "LoHa": {"network_module": "lycoris.kohya", "network_args": ["algo=loha"], "conv_dim": 0},
    "LoKr": {"network_module": "lycoris.kohya", "network_args": ["algo=lokr"], "conv_dim": 0, "conv_alpha": 1.0},
    "DoRA": {"network_module": "lycoris.kohya", "network_args": ["algo=lora", "dora_wd=True"], "conv_dim": 0},
}
NETWORK_KEYS = ("network_module", "network_args", "conv_dim", "conv_alpha")


def network_type_of(values: dict[str, Any]) -> str:
    """The NETWORK_TYPES entry a config's values amount to ("DoRA (LoCon)" counts as DoRA); LoRA if unreadable."""
    try:
        name = TrainConfig(**{k: v for k, v in values.items() if k in FIELD_NAMES}).network.name
    except (ConfigError, TypeError, ValueError):
        return "LoRA"
    return name.split(" ")[0]


def network_type_updates(name: str) -> list[Any]:
    """The NETWORK_KEYS widgets' new values for a network type (a key the type leaves alone stays as it is)."""
    chosen = NETWORK_TYPES[name]
    return [to_widget(key, chosen[key]) if key in chosen else gr.update() for key in NETWORK_KEYS]


def config_panel(start: dict[str, Any], in_webui: bool, notes: dict[str, str] | None = None) -> dict[str, Any]:
    """The Advanced fields (all but MAIN_FIELDS) under their groups' headings, four to a row; above the network
    keys, a network-type choice that fills them in. ``notes`` (the host's ``generation_notes``) replace an
    unset field's placeholder: what it means on this host now (e.g. the WebUI's own Clip skip)."""
    notes = notes or {}
    widgets: dict[str, Any] = {}
    network_type = None
    for group in GROUPS:
        names = [n for n in FIELD_NAMES if INFOS[n].group == group and n not in MAIN_FIELDS]
        shown = [n for n in names if shown_in_tab(INFOS[n], in_webui)]
        make(gr.Markdown, value=f"#### {group}", visible=bool(shown))
        if "network_module" in names:
            network_type = make(gr.Radio, choices=list(NETWORK_TYPES), value=network_type_of(start),
                                label="Network type", elem_id="lora_train_network_type",
                                info="Fills in network_module, network_args and conv_dim/conv_alpha below as "
                                     "kohya and LyCORIS users write them; every WebUI applies all five.")
        for chunk in range(0, len(names), 4):
            with gr.Row():
                for name in names[chunk:chunk + 4]:
                    extra = {"placeholder": notes[name]} if name in notes else {}
                    widgets[name] = widget(name, start.get(name), in_webui, **extra)
    if network_type is not None:
        network_type.change(network_type_updates, [network_type], [widgets[key] for key in NETWORK_KEYS])
    return widgets


def to_widget(name: str, value: Any) -> Any:
    """A config value as its widget shows it."""
    kind, optional = _kind(name)
    if kind is bool and optional:
        return "auto" if value is None else str(bool(value)).lower()
    if typing.get_origin(kind) is list:
        return "\n".join(value or [])
    if typing.get_origin(kind) is dict:
        return yaml.safe_dump(value, default_flow_style=True).strip() if value else ""
    if optional and value is None:
        return ""
    if kind in (int, float) and optional:
        return str(value)
    return value


def _from_widget(name: str, value: Any) -> Any:
    """A widget's value as config data (yaml_io.from_dict then checks and coerces it, naming the field)."""
    kind, optional = _kind(name)
    if kind is bool and optional:
        return None if value in (None, "", "auto") else value == "true"
    if typing.get_origin(kind) is list:
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if typing.get_origin(kind) is dict:
        try:
            parsed = yaml.safe_load(value) if str(value or "").strip() else {}
        except yaml.YAMLError as exc:
            raise ConfigError(name, f"not a YAML mapping: {exc}") from None
        return parsed if parsed is not None else {}
    if isinstance(value, str) and not value.strip() and optional:
        return None
    if isinstance(value, float) and kind is int and value.is_integer():
        return int(value)
    return value


def values_to_config(values: list[Any]) -> dict[str, Any]:
    """Widget values, in FIELD_NAMES order, as config data."""
    return {name: _from_widget(name, value) for name, value in zip(FIELD_NAMES, values, strict=True)}


def config_to_values(cfg: TrainConfig | dict[str, Any]) -> list[Any]:
    data = cfg.to_dict() if isinstance(cfg, TrainConfig) else cfg
    return [to_widget(name, data.get(name)) for name in FIELD_NAMES]
