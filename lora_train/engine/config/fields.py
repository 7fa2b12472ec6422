"""What each config key means, said once: help, group, human label and where it applies, as dataclass metadata.

``TrainConfig`` declares its fields with ``setting(...)``; ``describe`` reads them back for the README table
(``python -m lora_train.engine.config.doc``), the tab's labels and tooltips and the API's schema route, so the
three never drift apart.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

# Where a key does something. "both": the CLI and the tab. "standalone": the CLI and the standalone ``ui``
# command, not inside the WebUI (which trains the checkpoint it has loaded, on its own device). "cli": the CLI
# only; the tab sets it itself (outputs go where the tab's settings say).
Scope = Literal["both", "standalone", "cli"]
GROUPS = ("Data", "Model and network", "Optimisation", "Noise and loss", "Output", "Samples", "Validation")

# kohya / lora-scripts spellings accepted as the same field.
ALIASES = {
    "pretrained_model_name_or_path": "base_model",
    "network_dim": "lora_rank",
    "network_alpha": "lora_alpha",
    "network_dropout": "lora_dropout",
    "train_batch_size": "batch_size",
    "max_train_epochs": "epochs",
    "optimizer_type": "optimizer",
    "lr_warmup": "lr_warmup_steps",
    "save_model_as_precision": "save_precision",
    # lora-scripts' published configs
    "scheduler": "lr_scheduler",
    "alpha": "lora_alpha",
    "save_steps": "save_every_n_steps",
}
# kohya's flag with the opposite meaning: network_train_unet_only: true is train_text_encoder: false.
INVERTED_ALIASES = {"network_train_unet_only": "train_text_encoder"}


def setting(default: Any = dataclasses.MISSING, *, group: str, label: str, help: str, scope: Scope = "both",
            unset: str | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field carrying its documentation. ``unset`` says what the default means when it is None or
    empty (e.g. "auto: read from the model") and is shown in place of the bare default."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}")
    metadata = {"group": group, "label": label, "help": help, "scope": scope, "unset": unset}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class FieldInfo:
    """One config key as the docs, the tab and the API show it."""

    name: str
    type: str
    nullable: bool
    default: Any
    help: str
    group: str
    label: str
    scope: Scope
    unset: str | None
    choices: tuple[Any, ...] | None
    aliases: tuple[str, ...]
    inverted_aliases: tuple[str, ...]  # true there means false here

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["choices"] = list(self.choices) if self.choices is not None else None
        data["aliases"], data["inverted_aliases"] = list(self.aliases), list(self.inverted_aliases)
        return data


def _type_name(annotation: Any) -> tuple[str, bool, tuple[Any, ...] | None]:
    """(plain type name, accepts None, allowed values) for a field annotation."""
    nullable = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        nullable = type(None) in args
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is Literal:
        return "str", nullable, typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        return "list[str]", nullable, None
    if typing.get_origin(annotation) is dict:
        return "dict", nullable, None
    return annotation.__name__, nullable, None


def _aliases(name: str, table: dict[str, str]) -> tuple[str, ...]:
    return tuple(alias for alias, target in table.items() if target == name)


def describe(cls: type) -> list[FieldInfo]:
    """Every field of the dataclass ``cls`` with its documentation, in declaration order; a field declared
    without ``setting`` raises, so no key goes undocumented."""
    hints = typing.get_type_hints(cls)
    infos = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            raise ValueError(f"config field {f.name!r} has no help; declare it with setting(...)")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        type_name, nullable, choices = _type_name(hints[f.name])
        infos.append(FieldInfo(f.name, type_name, nullable, default, f.metadata["help"], f.metadata["group"],
                               f.metadata["label"], f.metadata["scope"], f.metadata["unset"], choices,
                               _aliases(f.name, ALIASES), _aliases(f.name, INVERTED_ALIASES)))
    return infos
