"""Which network a run trains, read from the config the way kohya and lora-scripts users write it.

``network_module: networks.lora`` (kohya's LoRA; ``conv_dim`` makes it LoCon) or ``lycoris.kohya`` with
``network_args`` such as ``["algo=loha", "conv_dim=8"]``, ``["algo=lokr", "factor=8"]`` or ``["dora_wd=True"]``.
One ``NetworkSpec`` holds the result, so the layers, the file format and the metadata all read the same answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

from lora_train.engine.config.checks import ConfigError

Algo = Literal["lora", "loha", "lokr"]
# LyCORIS spells LoRA-with-convolutions both ways; "lora" is its default.
_ALGOS: dict[str, Algo] = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}
_ARGS = {"algo", "conv_dim", "conv_alpha", "factor", "dora_wd"}
DEFAULT_CONV_ALPHA = 1.0


@dataclass(frozen=True)
class NetworkSpec:
    """The network: its algorithm, whether 3x3 convolutions are trained and at what rank, and DoRA."""

    module: str = "networks.lora"
    algo: Algo = "lora"
    conv_dim: int = 0
    conv_alpha: float = DEFAULT_CONV_ALPHA
    factor: int = -1
    dora: bool = False

    @property
    def name(self) -> str:
        """What users call it: LoRA, LoCon, LoHa, LoKr, with "DoRA" for weight decomposition."""
        if self.dora:
            return "DoRA" + (" (LoCon)" if self.conv_dim else "")
        if self.algo == "lora":
            return "LoCon" if self.conv_dim else "LoRA"
        return {"loha": "LoHa", "lokr": "LoKr"}[self.algo]

    def metadata_args(self) -> dict[str, str]:
        """``ss_network_args`` as kohya writes it: the network_args as strings."""
        args: dict[str, str] = {}
        if self.module == "lycoris.kohya":
            args["algo"] = "locon" if self.algo == "lora" and self.conv_dim else self.algo
        if self.conv_dim:
            conv_alpha = self.file_alpha(self.conv_dim, self.conv_alpha)
            args["conv_dim"], args["conv_alpha"] = str(self.conv_dim), _number(conv_alpha)
        if self.algo == "lokr":
            args["factor"] = str(self.factor)
        if self.dora:
            args["dora_wd"] = "True"
        return args


    def file_alpha(self, rank: int, alpha: float) -> float:
        """The alpha a module of ``rank`` is trained at and stored with: the asked one, except LoKr's, which is
        the rank (peft 0.13.2's LoKr applies no alpha/rank scale, so scale 1 is what the file must say)."""
        return float(rank) if self.algo == "lokr" else alpha


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def parse_args(items: list[str]) -> dict[str, str]:
    """``["algo=loha", "conv_dim=8"]`` → {"algo": "loha", "conv_dim": "8"}; anything else names the item."""
    args: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ConfigError("network_args", f"{item!r} is not key=value (e.g. algo=loha)")
        if key not in _ARGS:
            raise ConfigError("network_args", f"{key!r} is not supported; known: {', '.join(sorted(_ARGS))}")
        args[key] = value
    return args


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError("network_args", f"{key}={value!r} is not a whole number") from None


def spec_of(values: Mapping[str, Any]) -> NetworkSpec:
    """The network a config's values (by key) ask for, or one ConfigError naming the key that cannot be
    honoured."""
    cfg = SimpleNamespace(**values)
    args = parse_args(cfg.network_args)
    algo_text = args.get("algo", "lora").lower()
    if algo_text not in _ALGOS:
        raise ConfigError("network_args", f"algo={algo_text!r} is not supported; use lora, locon, loha or lokr")
    algo = _ALGOS[algo_text]
    if "algo" in args and cfg.network_module != "lycoris.kohya":
        raise ConfigError("network_module", f"algo={algo_text} needs network_module: lycoris.kohya")
    conv_dim = _int("conv_dim", args["conv_dim"]) if "conv_dim" in args else cfg.conv_dim
    if "conv_dim" in args and cfg.conv_dim and conv_dim != cfg.conv_dim:
        raise ConfigError("conv_dim", f"{cfg.conv_dim} differs from conv_dim={conv_dim} in network_args")
    try:
        conv_alpha = float(args["conv_alpha"]) if "conv_alpha" in args else cfg.conv_alpha
    except ValueError:
        raise ConfigError("network_args", f"conv_alpha={args['conv_alpha']!r} is not a number") from None
    if conv_dim < 0 or conv_alpha <= 0:
        raise ConfigError("conv_dim", "conv_dim must be >= 0 (0: no 3x3 convolutions) and conv_alpha > 0")
    if algo == "lokr" and "conv_alpha" in args:
        raise ConfigError("network_args", "conv_alpha does not apply to algo=lokr: its 3x3 convolutions train at "
                                          "scale 1 (alpha = conv_dim); remove conv_alpha")
    if algo == "lokr" and conv_dim and conv_alpha not in (DEFAULT_CONV_ALPHA, float(conv_dim)):
        raise ConfigError("conv_alpha", f"{_number(conv_alpha)} does not apply to LoKr: its 3x3 convolutions train "
                                        f"at scale 1 (alpha = conv_dim = {conv_dim}); set conv_alpha to "
                                        f"{_number(DEFAULT_CONV_ALPHA)} or {conv_dim}")
    factor = _int("factor", args["factor"]) if "factor" in args else -1
    if "factor" in args and algo != "lokr":
        raise ConfigError("network_args", "factor only applies to algo=lokr")
    if factor == 0 or factor < -1:
        raise ConfigError("network_args", f"factor={factor} must be -1 (balanced) or a positive number")
    dora_text = args.get("dora_wd", "false").lower()
    if dora_text not in ("true", "false"):
        raise ConfigError("network_args", f"dora_wd={args['dora_wd']!r} is not True or False")
    dora = dora_text == "true"
    if dora and algo != "lora":
        raise ConfigError("network_args", "dora_wd=True is trained with algo=lora/locon only")
    if (dora or algo != "lora") and cfg.lora_dropout:
        raise ConfigError("lora_dropout", "only plain LoRA/LoCon trains with dropout; set lora_dropout: 0")
    return NetworkSpec(cfg.network_module, algo, conv_dim, conv_alpha, factor, dora)
