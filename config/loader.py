"""Load TOML into settings Structs, reporting every bad field at once."""

from __future__ import annotations

import json
import os
import re
import tomllib
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from surge.config.settings import Settings

T = TypeVar("T", bound=msgspec.Struct)
ENV_PREFIX = "SURGE_"
_SERVICE_LINK = re.compile(r"(tcp|udp|sctp)://")


class ConfigError(ValueError):
    """A configuration that does not validate; `problems` has one line per bad field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"invalid configuration in {source}:\n  " + "\n  ".join(problems))


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from a TOML file (optional), overridden by `SURGE_<TABLE>__<FIELD>` variables."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = read_toml(path)
        source = str(path)
    env = os.environ if env is None else env
    if typos := list(_misspelt(env)):
        raise ConfigError("environment", typos)
    try:
        overrides = env_overrides(env)
    except ValueError as exc:
        raise ConfigError("environment", [str(exc)]) from None
    for table, fields in overrides.items():
        if not isinstance(data.setdefault(table, {}), dict):
            raise ConfigError(
                source, [f"{table}: expected a table, got {type(data[table]).__name__}"]
            )
        data[table].update(fields)
    if overrides:
        source += " + environment"
    return convert(data, Settings, source)


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8
        raise ConfigError(str(path), [f"not UTF-8: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None


def env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """`SURGE_KAFKA__BOOTSTRAP_SERVERS=h:9092` -> {"kafka": {"bootstrap_servers": "h:9092"}}.
    A list or a table is written as JSON (`SURGE_WORKER__MODELS='["mlp"]'`): one that is not
    JSON raises a ValueError saying where. Any other value stays a string, whatever it looks
    like (a password `[1]`)."""
    structured = _structured_fields()
    tables: dict[str, dict[str, Any]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        table, _, field = name[len(ENV_PREFIX) :].lower().partition("__")
        value: Any = raw
        if (table, field) in structured:
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                example = _EXAMPLES[structured[table, field]]
                raise ValueError(f"{name}: not JSON ({exc}), e.g. {example}") from None
        tables.setdefault(table, {})[field] = value
    return tables


_EXAMPLES = {list: '\'["a", "b"]\'', dict: '\'{"a": "b"}\''}


def _structured_fields() -> dict[tuple[str, str], Any]:
    """(table, field) of the settings that hold a list or a table."""
    structured = {}
    for table in msgspec.structs.fields(Settings):
        for field in msgspec.structs.fields(table.type):
            if (origin := typing.get_origin(field.type)) in (list, dict):
                structured[table.encode_name, field.encode_name] = origin
    return structured


def _misspelt(env: Mapping[str, str]) -> Iterator[str]:
    """Variables that name a setting with one underscore where two belong, such as
    `SURGE_WORKER_GROUP_ID`: ignored, they would leave the setting silently at its default.
    (Other `SURGE_` variables, naming no setting, are not the settings' business; nor are
    Kubernetes' service links: a Service `surge-metrics` puts `SURGE_METRICS_PORT=tcp://…`
    into every pod of its namespace.)"""
    tables = {f.encode_name: f.type for f in msgspec.structs.fields(Settings)}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" in name or _SERVICE_LINK.match(value):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        for table, struct in tables.items():
            field = rest.removeprefix(f"{table}_")
            if field != rest and field in {f.encode_name for f in msgspec.structs.fields(struct)}:
                meant = f"{ENV_PREFIX}{table}__{field}".upper()
                yield f"{name}: not read; did you mean {meant}?"


def convert(data: dict[str, Any], cls: type[T], source: str) -> T:
    """Validate `data` as `cls`; on failure raise one ConfigError listing every problem."""
    problems = list(_field_problems(data, cls, ""))
    if not problems:
        try:
            return msgspec.convert(data, cls, strict=False)
        # Cross-field checks in __post_init__; a table left out is built by its default
        # factory, whose checks raise ValueError as they are, not msgspec's ValidationError.
        except (msgspec.ValidationError, ValueError) as exc:
            problems = [str(exc)]
    raise ConfigError(source, problems)


def _field_problems(data: Any, cls: type[msgspec.Struct], path: str) -> Iterator[str]:
    if not isinstance(data, dict):
        yield f"{path.rstrip('.') or 'top level'}: expected a table, got {type(data).__name__}"
        return
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    for key in data:
        if key not in fields:
            yield f"{path}{key}: unknown field (known: {', '.join(fields)})"
    for name, field in fields.items():
        if name not in data:
            if field.required:
                yield f"{path}{name}: missing"
            continue
        value = data[name]
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            nested = list(_field_problems(value, field.type, f"{path}{name}."))
            if nested:
                yield from nested
                continue
        try:
            msgspec.convert(value, field.type, strict=False)
        except msgspec.ValidationError as exc:
            yield f"{path}{name}: {exc}"
