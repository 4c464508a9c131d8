"""The method registry: one `register()` call fills a by-name (YAML/CLI) and a by-config-type
(Python API) lookup, as PEFT and torchao do respectively."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .config import MethodConfig, did_you_mean
from .errors import ConfigError
from .report.records import StageResult

Kind = Literal["analyze", "compress", "finetune", "transform"]


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[MethodConfig]
    apply: Callable[..., StageResult]
    kind: str
    summary: str


_BY_NAME: dict[str, Method] = {}
_BY_CONFIG: dict[type, Method] = {}


def register(name: str, config_cls: type[MethodConfig], *, kind: Kind):
    """Decorator registering `apply(model, config, ctx) -> StageResult` under `name`."""

    def decorator(fn: Callable[..., StageResult]) -> Callable[..., StageResult]:
        if name in _BY_NAME:
            raise KeyError(f"method `{name}` registered twice ({_BY_NAME[name].apply.__module__}, {fn.__module__})")
        doc = (fn.__module__ and __import__(fn.__module__, fromlist=["_"]).__doc__) or ""
        method = Method(name, config_cls, fn, kind, doc.strip().splitlines()[0] if doc.strip() else "")
        _BY_NAME[name] = method
        _BY_CONFIG[config_cls] = method
        config_cls.method_name = name
        return fn

    return decorator


def load_builtin_methods() -> None:
    """Import the method packages; their explicit imports register every method."""
    from . import adapters, analysis, methods, training  # noqa: F401


def get_method(name: str) -> Method:
    load_builtin_methods()
    if name not in _BY_NAME:
        names = sorted(_BY_NAME)
        raise ConfigError(
            f"unknown method `{name}`{did_you_mean(name, names)} (available: {', '.join(names)}); "
            "see `compressor methods`"
        )
    return _BY_NAME[name]


def method_names(kind: str | None = None) -> list[str]:
    load_builtin_methods()
    return sorted(n for n, m in _BY_NAME.items() if kind is None or m.kind == kind)


def method_for_config(config: MethodConfig) -> Method:
    load_builtin_methods()
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise ConfigError(f"{type(config).__name__} is not a registered method config") from None


def apply_(model, config: MethodConfig, ctx=None) -> StageResult:
    """Apply one configured method to `model` in place (Python API)."""
    from .context import Context

    method = method_for_config(config)
    return method.apply(model, config, ctx or Context.for_model(model))
