"""The recipe: which transforms to apply, each with its own config, with a strict YAML/JSON round trip.

Every transform config is a dataclass that validates in ``__post_init__`` and names the field and the fix; an
unknown key, a wrong type or an unknown transform is an error. The same dictionary is a recipe in `configs/`
and the record in a saved model's ``config.json``: one format, one version.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import yaml

from llmopt.errors import ConfigError

FORMAT_VERSION = 2


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def require_choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    require(value in allowed, f"{owner}.{name} = {value!r} is not one of {', '.join(map(repr, allowed))}")


class OptimizationConfig:
    """The transforms to apply, by config field name (``kv``, ``routing``, ``sparse``, ...), run in stage order.

    ``OptimizationConfig(kv=KVCompressionConfig(num_kv_heads=1), sparse=SparseAttentionConfig())``.
    """

    def __init__(self, version: int = FORMAT_VERSION, **transforms: Any) -> None:
        from llmopt.transforms import config_class

        require(version == FORMAT_VERSION,
                f"config version {version} is not supported; this llmopt reads version {FORMAT_VERSION}")
        require(bool(transforms), "the config names no transform: add kv, routing or sparse")
        for name, config in transforms.items():
            expected = config_class(name)
            require(isinstance(config, expected),
                    f"{name}: expected a {expected.__name__}, got {type(config).__name__}")
        self.version = version
        self.transforms: dict[str, Any] = dict(sorted(transforms.items(), key=lambda item: item[1].stage))

    def get(self, name: str) -> Any | None:
        return self.transforms.get(name)

    def replace(self, name: str, config: Any) -> OptimizationConfig:
        """A copy with transform `name` set to `config` (e.g. a baseline in place of the method)."""
        return OptimizationConfig(self.version, **{**self.transforms, name: config})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OptimizationConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"OptimizationConfig({', '.join(f'{k}={v!r}' for k, v in self.transforms.items())})"

    def to_dict(self) -> dict:
        return {"version": self.version, **{name: asdict(config) for name, config in self.transforms.items()}}

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> OptimizationConfig:
        from llmopt.transforms import config_class

        if not isinstance(data, dict):
            raise ConfigError(f"{where}expected a mapping with transform keys (kv, routing, sparse), "
                              f"got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", FORMAT_VERSION)
        return cls(version, **{name: from_dict(config_class(name), value, f"{name}.")
                               for name, value in data.items()})

    @classmethod
    def from_yaml(cls, path: str | Path) -> OptimizationConfig:
        """A recipe from a YAML (or JSON) file; any problem is a ConfigError that names the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such config file: {path}")
        try:
            text = path.read_text()
            data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
            return cls.from_dict(data)
        except (yaml.YAMLError, json.JSONDecodeError) as error:
            raise ConfigError(f"{path} is not valid {path.suffix.lstrip('.').upper() or 'YAML'}: {error}") from None
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from plain data, strictly: unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where or cls.__name__}; "
                          f"allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in data.items()}
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(options[0], value, where)
        for option in options:  # the first that takes the value (e.g. int | list[int])
            try:
                return _coerce(option, value, where)
            except ConfigError:
                pass
        names = " or ".join(o.__name__ if typing.get_origin(o) is None else str(o) for o in options)
        raise ConfigError(f"{where} must be {names}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{where}.")
    if origin is Literal:
        return value  # __post_init__ names the allowed choices
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(args[0], v, where) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, bool, str) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
    return value
