"""The method registry: one `register()` call fills a by-name (YAML/CLI) and a by-config-type
(Python API) lookup, as PEFT and torchao do respectively.

A method is declared once, by its config class (`config.MethodConfig`'s class keywords):
`class SVDLLMConfig(CalibratedLowRankConfig, method="svd-llm", kind="compress",
apply="compressor.methods.svd_llm")`; the apply module registers the function with
`@register(SVDLLMConfig)`. `BUILTIN` is one line per method, the module declaring its config.
Built-ins keep config and apply in two modules: the configs (compressor/configs/) import no torch,
so `compressor methods`, `methods NAME` and every `--help` read the dataclasses themselves
(fields, defaults, `Args:` docs) and `get_method` imports only the apply module it needs. A
plugin may hold both in one module (`apply=__name__`); its line in `BUILTIN` is all it adds
(tests/test_add_method.py).

A method's capabilities follow from its declaration and its config, never from a list elsewhere:
its kind says which command runs it and whether it runs offloaded (`MethodInfo.offloadable`);
`FLAG_FIELDS` maps the commands' flags onto config fields (`fields_from_flags`), so a flag
applies to every method whose config has the field; a calibrated method's config extends
`config.CalibrationConfig` and states its calibration defaults once, as class keywords.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import MethodConfig, did_you_mean
from .errors import ConfigError
from .report.records import StageResult

# Kinds whose stages run under accelerate offload (`max_memory` / `offload_folder`): they read
# weights through the calibration engine, which materialises offloaded ones block by block.
OFFLOADABLE_KINDS = ("analyze", "compress")

# CLI flag -> the config fields it fills, first one the method has wins. Any other flag fills the
# field of its own name (`--from-trained` -> `from_trained`), so a new method's fields get the
# commands' flags without an entry here.
FLAG_FIELDS: dict[str, tuple[str, ...]] = {
    "calib": ("calibration",),
    "calib-windows": ("num_windows",),
    "eval-windows": ("num_eval",),
    "r": ("r", "lora_r"),
    "reduction": ("welore_reduction",),
}


# The built-in methods: each line names the torch-free module that declares one method's config
# (class keywords method=, kind=, apply=). A built-in keeps its apply in a second module (the
# `apply=` one, imported only when the method runs), so `compressor methods` and `--help` import
# no torch. A plugin may hold its config and its apply in ONE module (`apply=__name__`); adding a
# method is that module plus its line here (tests/test_add_method.py).
BUILTIN: tuple[str, ...] = (
    "compressor.configs.analyze",
    "compressor.configs.asvd",
    "compressor.configs.backprop",
    "compressor.configs.dsee",
    "compressor.configs.dsformer",
    "compressor.configs.gptq",
    "compressor.configs.heal",
    "compressor.configs.kappatune",
    "compressor.configs.lora",
    "compressor.configs.maestro",
    "compressor.configs.mezo",
    "compressor.configs.nola",
    "compressor.configs.prune",
    "compressor.configs.rtn",
    "compressor.configs.saes_svd",
    "compressor.configs.sorted_ft",
    "compressor.configs.svd",
    "compressor.configs.svd_llm",
    "compressor.configs.welore",
    "compressor.configs.welore_tune",
)


@dataclass(frozen=True)
class MethodInfo:
    """A declared method as its config class states it, before its apply module is imported."""

    config_cls: type[MethodConfig]

    @property
    def name(self) -> str:
        return self.config_cls.method_name

    @property
    def kind(self) -> str:
        return self.config_cls.method_kind

    @property
    def module(self) -> str:
        """The module that registers its apply."""
        return self.config_cls.apply_module

    @property
    def config_class(self) -> str:
        return self.config_cls.__name__

    @property
    def summary(self) -> str:
        """The first sentence of the declaring module's docstring (else of the config's)."""
        module = sys.modules.get(self.config_cls.__module__)
        return summary_of(getattr(module, "__doc__", None) or self.config_cls.__doc__)

    @property
    def offloadable(self) -> bool:
        return self.kind in OFFLOADABLE_KINDS


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[MethodConfig]
    apply: Callable[..., StageResult]
    # check_model(config, model, dtype): the method's own refusals that need the loaded model (gptq: a
    # reachable byte budget), called by the pipeline before any stage runs; None = none.
    check_model: Callable[..., None] | None = None

    @property
    def kind(self) -> str:
        return self.config_cls.method_kind

    @property
    def summary(self) -> str:
        return MethodInfo(self.config_cls).summary


_BY_NAME: dict[str, Method] = {}
_BY_CONFIG: dict[type, Method] = {}
_DECLARED_IN: dict[str, type[MethodConfig]] = {}  # config module -> the config it declares


def summary_of(docstring: str | None) -> str:
    """The first sentence of a docstring's first paragraph; full stops inside brackets
    ("(O. Ludwig, ...)") and before a lower-case word ("once. arXiv") do not end it."""
    text = " ".join((docstring or "").strip().split("\n\n")[0].split())
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char in ".!?" and depth == 0 and text[i + 1:i + 2] == " " and text[i + 2:i + 3].isupper():
            return text[:i + 1]
    return text


def register(config_cls: type[MethodConfig], *old_style: Any, check_model: Callable[..., None] | None = None,
             **old_keywords: Any):
    """Decorator registering `apply(model, config, ctx) -> StageResult` for the method that
    `config_cls` declares (name and kind are read from it; nothing is written onto it), with its
    optional `check_model(config, model, dtype)` (see `Method`)."""
    if old_style or old_keywords or isinstance(config_cls, str):  # register("foo", FooConfig, kind=...)
        raise TypeError('register("name", Config, kind=...) is now register(Config): declare the method on the '
                        'config, class FooConfig(MethodConfig, method="foo", kind="compress", apply=__name__)')
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig) and config_cls.declares_method()):
        raise TypeError(f"register({getattr(config_cls, '__name__', config_cls)!r}): not a config that declares a "
                        'method; declare it with class keywords: class FooConfig(MethodConfig, method="foo", '
                        'kind="compress", apply=__name__)')

    def decorator(fn: Callable[..., StageResult]) -> Callable[..., StageResult]:
        name = config_cls.method_name
        if name in _BY_NAME:
            raise KeyError(f"method `{name}` registered twice ({_BY_NAME[name].apply.__module__}, {fn.__module__})")
        if fn.__module__ != config_cls.apply_module:
            raise TypeError(f"{config_cls.__name__} declares apply={config_cls.apply_module!r} but `{name}` is "
                            f"registered in {fn.__module__}; make them the same module")
        method = Method(name, config_cls, fn, check_model)
        _BY_NAME[name] = method
        _BY_CONFIG[config_cls] = method
        return fn

    return decorator


def declared_config(module: str) -> type[MethodConfig]:
    """The one method config that `module` declares (imported by name: the plugin pattern)."""
    if module not in _DECLARED_IN:
        namespace = vars(importlib.import_module(module))
        found = [value for value in namespace.values() if isinstance(value, type) and issubclass(value, MethodConfig)
                 and value.declares_method() and value.__module__ == module]
        if len(found) != 1:
            raise TypeError(f"{module} must declare exactly one method config (class keywords method=, kind=, "
                            f"apply=), found {[c.__name__ for c in found]}")
        _DECLARED_IN[module] = found[0]
    return _DECLARED_IN[module]


def declared_configs() -> dict[str, type[MethodConfig]]:
    """name -> config class of every method: BUILTIN's declarations, then whatever else registered."""
    configs: dict[str, type[MethodConfig]] = {}
    for module in BUILTIN:
        config_cls = declared_config(module)
        other = configs.setdefault(config_cls.method_name, config_cls)
        if other is not config_cls:
            raise KeyError(f"method `{config_cls.method_name}` declared twice ({other.__module__}, {module})")
    for name, method in _BY_NAME.items():
        configs.setdefault(name, method.config_cls)
    return configs


def load_builtin_methods() -> None:
    """Import every built-in method's apply module by name (the registry imports none of them
    statically, so no method module is below it)."""
    for config_cls in declared_configs().values():
        importlib.import_module(config_cls.apply_module)


def get_method(name: str) -> Method:
    if name not in _BY_NAME:
        config_cls = declared_configs().get(name) if isinstance(name, str) else None
        if config_cls is not None:
            importlib.import_module(config_cls.apply_module)  # registers it
            if name not in _BY_NAME:
                raise TypeError(f"{config_cls.apply_module} registers no apply for `{name}`; decorate it with "
                                f"@register({config_cls.__name__})")
    if name not in _BY_NAME:
        raise ConfigError(_unknown(name))
    return _BY_NAME[name]


def method_info(name: str) -> MethodInfo:
    """A method's kind, summary, config class and apply module, importing only config modules."""
    config_cls = declared_configs().get(name) if isinstance(name, str) else None
    if config_cls is None:
        raise ConfigError(_unknown(name))
    return MethodInfo(config_cls)


def _unknown(name: str) -> str:
    names = method_names()
    return (f"unknown method `{name}`{did_you_mean(name, names)} (available: {', '.join(names)}); "
            "see `compressor methods`")


def method_names(kind: str | None = None) -> list[str]:
    """Built-in and user-registered method names (of one kind), importing only config modules."""
    return sorted(name for name, config_cls in declared_configs().items()
                  if kind is None or config_cls.method_kind == kind)


def method_for_config(config: MethodConfig) -> Method:
    config_cls = type(config)
    if config_cls not in _BY_CONFIG and config_cls.declares_method():
        get_method(config_cls.method_name)  # imports its apply module
    try:
        return _BY_CONFIG[config_cls]
    except KeyError:
        raise ConfigError(f"{config_cls.__name__} is not a registered method config") from None


def apply_(model, config: MethodConfig, ctx=None) -> StageResult:
    """Apply one configured method to `model` in place (Python API)."""
    from .context import Context

    method = method_for_config(config)
    return method.apply(model, config, ctx or Context.for_model(model))


def flag_field(flag: str, fields: list[str]) -> str | None:
    """The config field a CLI flag fills among `fields`, or None when the method has none."""
    return next((f for f in FLAG_FIELDS.get(flag, (flag.replace("-", "_"),)) if f in fields), None)


def fields_from_flags(name: str, flags: dict[str, Any]) -> dict[str, Any]:
    """{field: value} for the flags given (None = not given); a flag the method lacks is an error,
    naming the flag that replaced it when its field was renamed."""
    config_cls = get_method(name).config_cls
    fields = config_cls.field_names()
    chosen = {}
    for flag, value in flags.items():
        if value is None:
            continue
        key = flag_field(flag, fields)
        if key is None:
            raise ConfigError(_foreign_flag(name, flag, config_cls))
        chosen[key] = value
    return chosen


def _foreign_flag(name: str, flag: str, config_cls: type[MethodConfig]) -> str:
    old = FLAG_FIELDS.get(flag, (flag.replace("-", "_"),))
    renamed = next((config_cls.renamed[f] for f in old if f in config_cls.renamed), None)
    if renamed:
        new, _, why = renamed.partition(" ")
        return f"{name}: `--{flag}` was renamed `--{new.replace('_', '-')}`" + (f" {why}" if why else "")
    return (f"`--{flag}` does not apply to method `{name}` (its fields: {', '.join(config_cls.field_names())}); "
            "use --set key=value for method-specific fields")
