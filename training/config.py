"""Training configs, one way: ``TrainingConfig`` (``need`` and the strict ``from_dict`` of models/config.py, raising
``TrainingInputError``) and command-line flags made from a config dataclass (``add_flags`` / ``from_flags``) for the
tools. Pure Python.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, ClassVar

from ..models.config import Config, ConfigError, field_types, from_dict, invalid

__all__ = ["Config", "ConfigError", "Flag", "Presets", "TrainingConfig", "TrainingInputError", "add_flags",
           "field_types", "from_dict", "from_flags", "invalid"]

Flag = tuple[str, str, str]  # (command-line flag, config field, help)


class TrainingInputError(ConfigError):
    """Bad training input; the message names the input, the value and the fix."""


class TrainingConfig(Config):
    """Base of the training config dataclasses: their errors are TrainingInputErrors."""

    _error = TrainingInputError
    _label = "training settings"


class Presets:
    """Mixin for a TrainingConfig dataclass with named presets: ``_presets`` maps a name to the settings it fixes
    ("small": the dataclass defaults). Used by Meta-LoRA stage 1 (``MetaStage1Config``)."""

    _presets: ClassVar[dict[str, dict]] = {"small": {}}

    @classmethod
    def preset(cls, name: str = "small", **settings):
        """The validated config of preset ``name``; ``settings`` override it (a tool's flags that were given)."""
        if name not in cls._presets:
            raise TrainingInputError(f"preset = {name!r} is invalid: use one of {tuple(cls._presets)}")
        return cls(**{**cls._presets[name], **settings}).validate()

    @classmethod
    def preset_settings(cls, name: str) -> dict:
        """The settings preset ``name`` fixes (the rest are the dataclass defaults)."""
        cls.preset(name)
        return dict(cls._presets[name])

    @classmethod
    def from_widgets(cls, name: str, **widgets):
        """The config of a node: preset ``name`` and the node's widget values. A widget of a setting the preset
        fixes must hold the preset's value or the dataclass default (then the preset's value is used); any other
        value is an error naming it, so that no widget is ignored in silence."""
        cls.preset(name)
        fixed, small = cls._presets[name], cls()

        def same(a, b) -> bool:  # a float widget may come back with rounding noise
            return math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) or isinstance(b, float) else a == b
        clash = {k: v for k, v in widgets.items() if k in fixed and not same(v, fixed[k])
                 and not same(v, getattr(small, k))}
        if clash:
            raise TrainingInputError(
                f"preset {name!r} sets {', '.join(f'{k} = {fixed[k]!r}' for k in clash)}, but the widget value"
                f"{'s' if len(clash) > 1 else ''} {', '.join(f'{k} = {v!r}' for k, v in clash.items())} differ: set "
                f"preset 'small' to train with your own values, or reset "
                f"{', '.join(f'{k} to {getattr(small, k)!r}' for k in clash)}")
        return cls.preset(name, **{k: v for k, v in widgets.items() if k not in fixed})


def add_flags(parser: Any, cls: type, flags: tuple[Flag, ...], **defaults: Any) -> None:
    """One option per flag: its type and default are the config field's (``defaults`` override a default); a bool
    field is a switch. The dest is argparse's own (``--lr`` -> ``lr``), so a tool keeps its flag names."""
    hints = field_types(cls)
    own = {f.name: f.default for f in dataclasses.fields(cls)}
    for flag, name, text in flags:
        kind, default = hints[name], defaults.get(name, own[name])
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})")


def from_flags(cls: type, a: argparse.Namespace, flags: tuple[Flag, ...], **values: Any):
    """The validated config from the parsed ``flags`` (``values``: fields not given by a flag, or overriding one)."""
    given = {name: getattr(a, flag.lstrip("-").replace("-", "_")) for flag, name, _ in flags}
    return cls(**{**given, **values}).validate()
