"""YAML + ``--set key=value`` overrides -> typed, nested config dataclasses.

Every experiment script declares its settings as a ``@dataclass`` with defaults (CleanRL style:
the defaults *are* the documentation) and calls :func:`parse_config`. This module is the only
place that reads YAML or overrides, so a typo in either fails loudly with the known keys instead
of being silently ignored, and every run can record exactly what it resolved to.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override names an unknown key or a value of the wrong type."""


class _Text(str):
    """An override's raw text plus its YAML reading: str fields keep the text (``name=yes`` stays 'yes')."""

    parsed: Any


def _text(raw: str) -> _Text:
    out = _Text(raw)
    try:
        out.parsed = yaml.safe_load(raw)
    except yaml.YAMLError:
        out.parsed = raw
    return out


class _Patch(dict):
    """A mapping created by overrides alone: a dict field it lands on is updated, not replaced."""


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _coerce(tp: Any, value: Any, key: str, base: Any = dataclasses.MISSING) -> Any:
    """Turn a YAML value into ``tp``; ``base`` is the field's default (a _Patch updates it)."""
    origin, args = typing.get_origin(tp) or (tp if tp in (tuple, list, dict) else None), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, _Text) and value.parsed is None)):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key, base)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors) or f"config key '{key}' cannot be null")
    if tp in (str, Path) and isinstance(value, _Text):
        return tp(str(value))
    if isinstance(value, _Text):
        value = value.parsed
    bad = ConfigError(f"config key '{key}' expects {getattr(tp, '__name__', tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _merge(tp, value, key + ".", base if dataclasses.is_dataclass(base) else dataclasses.MISSING)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise bad
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp in (str, Path):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return tp(value)
        raise ConfigError(f"config key '{key}' expects a string, got {value!r} (quote it in YAML)")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):  # "2,4,8" on the command line
            value = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' expects {len(args)} values, got {value!r}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        return origin(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        kt, vt = args or (Any, Any)
        out = dict(base) if isinstance(value, _Patch) and isinstance(base, dict) else {}
        out.update({_coerce(kt, k, key): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()})
        return out
    raise ConfigError(f"config key '{key}' has an unsupported type annotation {tp!r}")


def _merge(cls: type[T], data: Any, prefix: str, base: Any = dataclasses.MISSING) -> T:
    """Build ``cls`` from a mapping, starting from ``base`` (an instance) when given."""
    where = f"in {prefix[:-1]}" if prefix else "at top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{prefix[:-1] or '<root>'}' must be a mapping, got {data!r}")
    known, hints = _fields(cls), typing.get_type_hints(cls)
    for k in data:
        if k not in known:
            close = difflib.get_close_matches(str(k), list(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{k}'{hint}; known keys {where}: {', '.join(known)}")
    updates = {}
    for name, value in data.items():
        current = getattr(base, name) if base is not dataclasses.MISSING else _default(known[name])
        updates[name] = _coerce(hints[name], value, prefix + name, current)
    if base is not dataclasses.MISSING:
        return dataclasses.replace(base, **updates)
    missing = [prefix + n for n, f in known.items() if n not in updates and _default(f) is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(missing)}")
    return cls(**updates)


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> T:
    """Defaults <- YAML file <- ``key=value`` / ``section.key=value`` overrides, in that order.

    ``prepare`` sees the raw mapping (file + overrides, before typing): a script whose sections
    derive from each other (the main job's per-stage ``env`` overlays) resolves them there, so the
    typed config it returns is the one that runs.
    """
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found; pass an existing YAML file to --config")
        data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r} must look like KEY=VALUE (e.g. env.shots=5)")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = _Patch()
            node = node[part]
        node[parts[-1]] = _text(raw)
    if prepare is not None:
        data = prepare(data)
    return _merge(cls, data, "")


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML/JSON-safe dict (tuples -> lists, paths -> str), for files and ``wandb.config``."""
    return _plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically), so a run can be re-run with ``--config``."""
    from experiments.io import write_text

    return write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _describe(cls: type, prefix: str = "") -> list[str]:
    """One help line per leaf key, so ``--help`` documents every ``--set`` target."""
    lines, hints = [], typing.get_type_hints(cls)
    for name, f in _fields(cls).items():
        tp, default = hints[name], _default(f)
        if dataclasses.is_dataclass(tp):
            lines += _describe(tp, f"{prefix}{name}.")
        else:
            shown = "(required)" if default is dataclasses.MISSING else f"= {_plain(default)!r}"
            lines.append(f"  {prefix}{name}: {getattr(tp, '__name__', None) or str(tp).replace('typing.', '')} {shown}")
    return lines


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", metavar="PATH", default=None, help="YAML config file")
    parser.add_argument("--set", metavar="KEY=VALUE", dest="overrides", action="append", default=[],
                        help="override one config key, e.g. --set env.shots=5 (repeatable)")
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None,
                 parser: argparse.ArgumentParser | None = None,
                 prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> tuple[T, argparse.Namespace]:
    """Parse ``--config``/``--set`` (plus any extra arguments already on ``parser``) into ``cls``."""
    if parser is None:
        parser = argparse.ArgumentParser(description=description)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "config keys (defaults shown; change with --set KEY=VALUE):\n" + "\n".join(_describe(cls))
    args = add_config_args(parser).parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides, prepare), args
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
