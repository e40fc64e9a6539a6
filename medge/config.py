"""TOML configuration validated into typed, frozen dataclasses at start-up.

A daemon declares its configuration as dataclasses; :func:`load` reads the file and converts
it field by field from the type hints. Any problem (missing file, TOML syntax, unknown key,
wrong type, value out of range, unreadable or over-exposed secret) raises :class:`ConfigError`
whose message is one line naming the file, the dotted key and the reason, so nothing ever
starts half-configured.

Ranges and choices go in field metadata: ``field(default=1, metadata=bounds(min=0, max=10))``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """One line: ``FILE: KEY: reason``."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {reason}")


def bounds(
    *, min: float | None = None, max: float | None = None, min_exclusive: bool = False
) -> dict[str, Any]:
    """Field metadata restricting a number (or a collection's length) to a range."""
    return {"min": min, "max": max, "min_exclusive": min_exclusive}


class Secret:
    """A secret read from a file that only its owner may read (mode 0600 or stricter).

    The value is never printed: ``repr`` shows the path only.
    """

    def __init__(self, path: Path, value: str) -> None:
        self.path = path
        self.value = value

    def __repr__(self) -> str:
        return f"Secret({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and (self.path, self.value) == (other.path, other.value)

    def __hash__(self) -> int:
        return hash(self.path)

    @classmethod
    def read(cls, path: Path) -> Secret:
        """Read a secret file; raise ``ValueError`` with the reason when it is not acceptable."""
        try:
            info = path.stat()
        except OSError as exc:
            raise ValueError(f"secret file {path}: {exc.strerror}") from exc
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"secret file {path}: not a regular file")
        if info.st_mode & 0o077:
            raise ValueError(
                f"secret file {path} is readable by group/other (mode {info.st_mode & 0o777:03o});"
                f" run: chmod 600 {path}"
            )
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"secret file {path}: cannot read: {exc}") from exc
        if not value:
            raise ValueError(f"secret file {path} is empty")
        return cls(path, value)


def load(path: str | os.PathLike[str], schema: type[T]) -> T:
    """Read and validate the TOML file at ``path`` into an instance of ``schema``."""
    source = str(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except PermissionError:
        raise ConfigError(source, "", "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(source, "", "is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"invalid TOML: {exc}") from None
    base_dir = Path(path).resolve().parent
    return from_mapping(data, schema, source=source, base_dir=base_dir)


def from_mapping(
    data: Mapping[str, Any],
    schema: type[T],
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
) -> T:
    """Validate an already-parsed mapping (e.g. a JSON job payload) into ``schema``."""
    converter = _Converter(source, base_dir or Path.cwd())
    return typing.cast(T, converter.dataclass(data, schema, ""))


class _Converter:
    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def fail(self, key: str, reason: str) -> typing.NoReturn:
        raise ConfigError(self.source, key, reason)

    def dataclass(self, data: Any, schema: type[Any], prefix: str) -> Any:
        if not isinstance(data, Mapping):
            self.fail(prefix, f"expected a table, got {_kind(data)}")
        hints = typing.get_type_hints(schema)
        fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            key = _join(prefix, unknown[0])
            self.fail(key, f"unknown key (expected one of: {', '.join(sorted(fields))})")
        values: dict[str, Any] = {}
        for name, spec in fields.items():
            key = _join(prefix, name)
            if name not in data:
                no_default = spec.default is dataclasses.MISSING
                if no_default and spec.default_factory is dataclasses.MISSING:
                    self.fail(key, "required key is missing")
                continue
            values[name] = self.value(data[name], hints[name], key, spec.metadata)
        try:
            instance = schema(**values)
        except (ValueError, TypeError) as exc:
            self.fail(prefix, str(exc))
        validate = getattr(instance, "validate", None)
        if callable(validate):
            try:
                validate()
            except ValueError as exc:
                self.fail(prefix, str(exc))
        return instance

    def value(self, raw: Any, hint: Any, key: str, meta: Mapping[str, Any]) -> Any:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            non_none = [a for a in args if a is not type(None)]
            if raw is None and len(non_none) < len(args):
                return None
            if len(non_none) == 1:
                return self.value(raw, non_none[0], key, meta)
            self.fail(key, "unsupported union in schema")
        if origin is Literal:
            if raw not in args:
                self.fail(key, f"must be one of {', '.join(repr(a) for a in args)}, got {raw!r}")
            return raw
        if origin in (list, tuple):
            if not isinstance(raw, list):
                self.fail(key, f"expected an array, got {_kind(raw)}")
            self.check_bounds(len(raw), key, meta, what="number of items")
            item = args[0] if args else Any
            items = [self.value(v, item, f"{key}[{i}]", {}) for i, v in enumerate(raw)]
            return tuple(items) if origin is tuple else items
        if origin is dict:
            if not isinstance(raw, Mapping):
                self.fail(key, f"expected a table, got {_kind(raw)}")
            item = args[1] if len(args) == 2 else Any
            return {str(k): self.value(v, item, _join(key, str(k)), meta) for k, v in raw.items()}
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            return self.dataclass(raw, hint, key)
        if hint is Any:
            return raw
        if hint is bool:
            if not isinstance(raw, bool):
                self.fail(key, f"expected true or false, got {_kind(raw)}")
            return raw
        if hint is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                self.fail(key, f"expected an integer, got {_kind(raw)}")
            self.check_bounds(raw, key, meta)
            return raw
        if hint is float:
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                self.fail(key, f"expected a number, got {_kind(raw)}")
            if not math.isfinite(raw):
                self.fail(key, "must be a finite number")
            self.check_bounds(raw, key, meta)
            return float(raw)
        if hint is str:
            if not isinstance(raw, str):
                self.fail(key, f"expected a string, got {_kind(raw)}")
            self.check_bounds(len(raw), key, meta, what="length")
            return raw
        if hint is Path:
            if not isinstance(raw, str) or not raw:
                self.fail(key, f"expected a path string, got {_kind(raw)}")
            path = Path(raw).expanduser()
            return path if path.is_absolute() else self.base_dir / path
        if hint is Secret:
            path = self.value(raw, Path, key, meta)
            try:
                return Secret.read(path)
            except ValueError as exc:
                self.fail(key, str(exc))
        self.fail(key, f"unsupported type {hint!r} in schema")

    def check_bounds(
        self, value: float, key: str, meta: Mapping[str, Any], what: str = "value"
    ) -> None:
        low, high = meta.get("min"), meta.get("max")
        if low is not None:
            if meta.get("min_exclusive") and value <= low:
                self.fail(key, f"{what} must be greater than {low}, got {value}")
            if value < low:
                self.fail(key, f"{what} must be at least {low}, got {value}")
        if high is not None and value > high:
            self.fail(key, f"{what} must be at most {high}, got {value}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__) + f" ({value!r})"[:60]
