"""Config dataclasses, one way: a check helper and a strict ``from_dict``.

It lives in models/ because models/ must not import training/; training/config.py re-exports it with the training
error type. Pure Python.

``Config`` is a mixin for ``@dataclass`` config classes. ``cfg.need(ok, name, fix)`` raises
``<prefix><name> = <value!r> is invalid: <fix>`` unless ok. ``Cls.from_dict(d)`` builds the config from a dict
(a JSON file, a job's config.json) strictly: a key that is not a field is an error that names it and lists the
known ones, a missing required field is an error, tuples are rebuilt from lists by the fields' type hints and nested
config dataclasses are built recursively, so ``Cls.from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg``.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A bad setting; the message names it, its value and the fix."""


def invalid(obj: Any, name: str, fix: str, error: type[Exception] = ConfigError, prefix: str = "") -> Exception:
    """The error for a bad setting: ``<prefix><name> = <value!r> is invalid: <fix>``. ``name`` is an attribute of
    ``obj``, or a command-line flag (``--log-every``) whose argparse dest (``log_every``) holds the value."""
    value = getattr(obj, name.lstrip("-").replace("-", "_"))
    return error(f"{prefix}{name} = {value!r} is invalid: {fix}")


class Config:
    """Mixin for config dataclasses: ``need`` and a strict ``from_dict``. Subclasses may set ``_error`` (the
    exception type), ``_prefix`` (put before a setting's name in messages) and ``_label`` (what the settings are
    called in the unknown-key message)."""

    _error: typing.ClassVar[type[Exception]] = ConfigError
    _prefix: typing.ClassVar[str] = ""
    _label: typing.ClassVar[str] = "settings"

    def need(self, ok: bool, name: str, fix: str) -> None:
        if not ok:
            raise invalid(self, name, fix, self._error, self._prefix)

    @classmethod
    def from_dict(cls, d: Any):
        return from_dict(cls, d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def from_dict(cls: type, d: Any, path: str = ""):
    """``cls(**d)``, strictly (see the module docstring). ``path`` prefixes key names in messages (``content.``)."""
    error, label = getattr(cls, "_error", ConfigError), getattr(cls, "_label", "settings")
    if not isinstance(d, collections.abc.Mapping):
        raise error(f"{path[:-1] or cls.__name__} must be a mapping of settings (a JSON object), got "
                    f"{type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise error(f"unknown {label} {[path + k for k in unknown]} in {cls.__name__}; known: {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise error(f"{cls.__name__} lacks the required {label} {[path + k for k in missing]}")
    hints = field_types(cls)
    return cls(**{k: _coerce(hints[k], v, f"{path}{k}.") for k, v in d.items()})


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The evaluated type hints of a dataclass (its annotations are strings under ``from __future__``)."""
    return typing.get_type_hints(cls)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    """``value`` (as JSON gives it back) as the type ``hint`` says: tuples from lists, dataclasses from dicts."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return _coerce(kinds[0], value, path) if len(kinds) == 1 else value
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, path)
    if origin in (tuple, collections.abc.Sequence) and isinstance(value, (list, tuple)):
        fixed = origin is tuple and args[-1:] != (Ellipsis,) and len(args) == len(value)
        kinds = args if fixed else args[:1] * len(value)  # tuple[X, Y] item by item; tuple[X, ...], Sequence[X]
        return tuple(_coerce(k, v, path) for k, v in zip(kinds, value)) if kinds else tuple(value)
    return value
