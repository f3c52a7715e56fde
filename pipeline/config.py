"""Typed configuration: dataclass trees loaded from YAML plus dotted ``key=value`` overrides.

Every section of a config is a dataclass; loading walks the YAML mapping against the
dataclass fields, so a mistyped key or a value of the wrong type is an error that names
the file, the dotted key and what was expected, instead of a silently ignored setting::

    cfg = load_config(PrepConfig, "configs/data/sample.yaml", ["tokenizer.vocab_size=4000"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the typed schema."""


def _where(source: str, key: str) -> str:
    return f"{source}: key '{key}'" if key else source


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, source: str, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (ints widen to float)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{_where(source, key)}: expected a mapping for section {tp.__name__}, got {value!r}"
            )
        # A section whose schema depends on one of its keys (``model.family``) names its class.
        dispatch = getattr(tp, "config_class_for", None)
        cls = dispatch(value, source, key) if dispatch is not None else tp
        return _build(cls, value, source, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{_where(source, key)}: got {value!r}, expected {_type_name(tp)}")
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            with contextlib.suppress(ConfigError):  # try the next member of the union
                return _convert(value, arg, source, key)
        raise ConfigError(f"{_where(source, key)}: got {value!r}, expected {_type_name(tp)}")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_where(source, key)}: got {value!r}, expected a mapping")
        _, val_tp = get_args(tp)
        return {str(k): _convert(v, val_tp, source, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{_where(source, key)}: got {value!r}, expected {_type_name(tp)}")
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "3e-4" as a string; a float key takes it as the number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{_where(source, key)}: got {value!r}, expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_where(source, key)}: got {value!r}, expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(source, key)}: got {value!r}, expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_where(source, key)}: got {value!r}, expected a string")
        return value
    raise TypeError(f"config annotation {tp!r} at {key!r} is not supported")


def _build(cls: type[T], data: Mapping[str, Any], source: str, prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        dotted = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{_where(source, dotted)}: unknown key{hint}; allowed: {', '.join(sorted(fields))}"
            )
        kwargs[name] = _convert(value, hints[name], source, dotted)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"section '{prefix}'" if prefix else "top level"
        raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)} in {where}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return obj


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=3", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value (for example data.batch_size=8)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``extra`` wins. Returns a new dict."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<config>") -> T:
    """Build dataclass ``cls`` from a nested mapping, validating keys, types and ``validate()``.

    A class with a ``config_class_for(data, source, key)`` classmethod (a family-dependent section such
    as ``ModelConfig``) builds the subclass it names."""
    dispatch = getattr(cls, "config_class_for", None)
    return _build(dispatch(data, source, "") if dispatch is not None else cls, data, source, "")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from an optional YAML file with dotted ``key=value`` overrides applied on top."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        data = merge(data, parse_overrides(overrides))
        source += " + overrides"
    return from_dict(cls, data, source)


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (for manifests, logging and YAML dumps)."""
    return dataclasses.asdict(obj)
