"""Training configs, one way: ``TrainingConfig`` (``need`` and the strict ``from_dict`` of models/config.py, raising
``TrainingInputError``) and command-line flags made from a config dataclass (``add_flags`` / ``from_flags``) for the
tools. Pure Python.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..models.config import Config, ConfigError, field_types, from_dict, invalid

__all__ = ["Config", "ConfigError", "Flag", "TrainingConfig", "TrainingInputError", "add_flags", "field_types",
           "from_dict", "from_flags", "invalid"]

Flag = tuple[str, str, str]  # (command-line flag, config field, help)


class TrainingInputError(ConfigError):
    """Bad training input; the message names the input, the value and the fix."""


class TrainingConfig(Config):
    """Base of the training config dataclasses: their errors are TrainingInputErrors."""

    _error = TrainingInputError
    _label = "training settings"


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
