"""MethodConfig: the frozen, strictly validated base of every stage config.

Configs are data (torchao's lesson): they round-trip through dicts and so through YAML. Unknown
keys are errors with a did-you-mean suggestion (llm-compressor silently drops some typos; we don't).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ConfigError


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """'; did you mean `x`?' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Fields shared by every stage.

    Args:
        targets: which linears the stage touches. A plain name matches the full module name or any
            dotted suffix (`q_proj`, `layers.0.mlp.up_proj`); `re:<regex>` full-matches the module
            name. Empty = every linear except `lm_head` and embeddings.
        ignore: names in the same syntax that are excluded from `targets`.
    """

    method_name: ClassVar[str] = ""
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field in ("targets", "ignore"):
            value = getattr(self, field)
            if isinstance(value, str):
                object.__setattr__(self, field, (value,))
            elif not all(isinstance(v, str) for v in value):
                raise ConfigError(f"`{field}` must be a list of names, got {value!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> MethodConfig:
        """Build from a plain dict, rejecting unknown keys and wrong types."""
        prefix = f"{where}: " if where else ""
        names = cls.field_names()
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            if key not in names:
                raise ConfigError(
                    f"{prefix}unknown key `{key}` for {cls.__name__}{did_you_mean(key, names)} "
                    f"(valid: {', '.join(sorted(names))})"
                )
            kwargs[key] = coerce(value, hints[key], f"{prefix}`{key}`")
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{prefix}{err}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> MethodConfig:
        return dataclasses.replace(self, **changes)


def plain(value: Any) -> Any:
    """Tuples -> lists so the dict is YAML/JSON friendly."""
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


_NONE = type(None)


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a type hint, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{where} must be {names}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}{did_you_mean(value, map(str, args))}")
        return value
    if hint is _NONE:
        if value is not None:
            raise ConfigError(f"{where} must be null, got {value!r}")
        return None
    if origin is tuple or hint is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(coerce(v, inner, where) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _type_name(hint: Any) -> str:
    if hint is _NONE:
        return "null"
    return getattr(hint, "__name__", str(hint))
