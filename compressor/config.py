"""Config: the frozen, strictly validated base of every stage config (`MethodConfig`), of the
calibrated ones (`CalibrationConfig`) and of the recipe's top level (`recipe.RunConfig`).

Configs are data (torchao's lesson): they round-trip through dicts and so through YAML. Unknown
keys are errors with a did-you-mean suggestion (llm-compressor silently drops some typos; we don't),
and a renamed key names its new spelling.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
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
class Config:
    """Frozen settings built from a plain dict (YAML, CLI flags) and written back to one.

    Unknown keys are errors with a did-you-mean; keys in `renamed` name their new spelling.
    """

    # {old key: "new_key (why)"}: a key that was renamed is an error naming its new spelling.
    renamed: ClassVar[dict[str, str]] = {}
    # How an unknown key is reported ({key}: the key, {name}: the class name).
    unknown_key: ClassVar[str] = "unknown key `{key}` for {name}"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> Config:
        """Build from a plain dict, rejecting unknown keys and wrong types."""
        prefix = f"{where}: " if where else ""
        names = cls.field_names()
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            if key not in names:
                label = where or getattr(cls, "method_name", "")
                raise ConfigError(f"{label}: " * bool(label) + cls.unknown_key_message(key))
            kwargs[key] = coerce(value, hints[key], f"{prefix}`{key}`")
        try:
            built = cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{prefix}{err}") from None
        for key, value in kwargs.items():  # after the class's own checks, which name the field better
            if isinstance(value, float) and not math.isfinite(value):  # `.nan` would silently switch a limit off
                raise ConfigError(f"{prefix}`{key}` must be a finite number, got {value!r}; give a real value "
                                  "(see `compressor methods NAME` for its meaning and default)")
        return built

    @classmethod
    def unknown_key_message(cls, key: str) -> str:
        if key in cls.renamed:
            new, _, why = cls.renamed[key].partition(" ")
            return f"`{key}` was renamed `{new}`{' ' + why if why else ''}"
        names = cls.field_names()
        return (f"{cls.unknown_key.format(key=key, name=cls.__name__)}{did_you_mean(key, names)} "
                f"(valid: {', '.join(sorted(names))})")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


KINDS = ("analyze", "compress", "finetune", "transform")
# The class keywords with which a config declares its method (`MethodConfig.__init_subclass__`).
METHOD_KEYWORDS = ("method", "kind", "apply")


@dataclass(frozen=True, kw_only=True)
class MethodConfig(Config):
    """Fields shared by every stage.

    A config declares its method once, with class keywords: `class SVDLLMConfig(LowRankConfig,
    method="svd-llm", kind="compress", apply="compressor.methods.svd_llm")` (the module whose
    `@register(SVDLLMConfig)` function runs it). The registry reads the declaration; nothing
    writes onto the class afterwards.

    Args:
        targets: which linears the stage touches. A plain name matches the full module name or any
            dotted suffix (`q_proj`, `layers.0.mlp.up_proj`); `re:<regex>` full-matches the module
            name. Empty = every linear except `lm_head` and embeddings.
        ignore: names in the same syntax that are excluded from `targets`.
    """

    # The declaration (class keywords); "" on the shared bases, which declare no method.
    method_name: ClassVar[str] = ""  # the name in recipes and on `--method`
    method_kind: ClassVar[str] = ""  # one of KINDS: the command that runs it
    apply_module: ClassVar[str] = ""  # the module that registers its apply
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def __init_subclass__(cls, *, method: str | None = None, kind: str | None = None, apply: str | None = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        given = {"method": method, "kind": kind, "apply": apply}
        if all(value is None for value in given.values()):
            return
        missing = [key for key, value in given.items() if not isinstance(value, str) or not value]
        if missing:
            raise TypeError(f"{cls.__name__}: a method is declared with all of method=, kind=, apply= (names); "
                            f"missing or not a string: {', '.join(missing)}")
        if kind not in KINDS:
            raise TypeError(f"{cls.__name__}: kind={kind!r} must be one of {', '.join(KINDS)}")
        cls.method_name, cls.method_kind, cls.apply_module = method, kind, apply

    @classmethod
    def declares_method(cls) -> bool:
        """True for the class that declared a method itself (not a subclass inheriting it)."""
        return "method_name" in cls.__dict__

    def __post_init__(self) -> None:
        for field in ("targets", "ignore"):
            value = getattr(self, field)
            if isinstance(value, str):
                object.__setattr__(self, field, (value,))
            elif not all(isinstance(v, str) for v in value):
                raise ConfigError(f"`{field}` must be a list of names, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig(MethodConfig):
    """The calibration data of every calibrated method, declared once.

    A method whose defaults differ states them once, as class keywords:
    `class PruneConfig(CalibrationConfig, num_windows=64)`.

    Args:
        calibration: text source of the calibration windows (`default` = the embedded TinyStories
            excerpt, a .txt/.jsonl/.csv/.tsv path, or a datasets name); its `calib` split is used,
            which never overlaps the `eval` split used for perplexity. null = the stage's training
            `data` (methods that train).
        num_windows: calibration windows.
        seq_len: tokens per calibration window.
        batch_size: windows per forward pass (memory vs speed).
    """

    calibration: str | None = "default"
    num_windows: int = 64
    seq_len: int = 256
    batch_size: int = 8

    def __init_subclass__(cls, **keywords: Any) -> None:
        """`class X(CalibrationConfig, num_windows=128)`: X's default for a calibration field.

        Runs before @dataclass reads the class, so the override becomes that field's default
        (keeping its place in the field order). The method keywords go on to MethodConfig."""
        declaration = {key: keywords.pop(key) for key in METHOD_KEYWORDS if key in keywords}
        super().__init_subclass__(**declaration)
        defaults = keywords
        unknown = set(defaults) - set(CALIBRATION_FIELDS)
        if unknown:
            raise TypeError(f"{cls.__name__}: {sorted(unknown)} are not calibration fields {CALIBRATION_FIELDS}")
        annotations = cls.__dict__.get("__annotations__", {})
        for name, value in defaults.items():
            annotations[name] = CalibrationConfig.__annotations__[name]
            setattr(cls, name, value)
        cls.__annotations__ = annotations

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.method_name or type(self).__name__
        for key in ("num_windows", "seq_len", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: `{key}` must be a positive integer, got {value!r}")
        if self.calibration is None and not isinstance(getattr(self, "data", None), str):
            raise ConfigError(f"{name}: `calibration` must name a text source (e.g. `default`), got null")


CALIBRATION_FIELDS = ("calibration", "num_windows", "seq_len", "batch_size")
# Linears whose inputs come from their block's other linears (attention output, MLP down): the
# calibration engine compresses them after the rest of their block (`second_phase`).
DEFAULT_SECOND_PHASE = (
    "o_proj",
    "down_proj",
    "out_proj",
    "output.dense",
    "fc2",
    "c_proj",
    "dense_4h_to_h",
)


def plain(value: Any) -> Any:
    """Tuples -> lists and nested configs -> dicts, so the dict is YAML/JSON friendly."""
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


_NONE = type(None)
MAX_INT = 2**63  # torch and numpy take 64-bit integers


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a type hint, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and _NONE in args:
            return None
        options = [a for a in args if a is not _NONE]
        if len(options) == 1:  # `X | None` given a value: X's own error (did-you-mean) is the useful one
            return coerce(value, options[0], where)
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
    if _is_config(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return hint.from_dict(value, where=where)
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
        if not -MAX_INT <= value < MAX_INT:
            raise ConfigError(f"{where} is out of range, got {value}; use a value below 2**63")
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


def _is_config(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, Config)


def _type_name(hint: Any) -> str:
    if hint is _NONE:
        return "null"
    if _is_config(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


# -- a config's fields as `compressor methods NAME` shows them -----------------------------------

_ENTRY = re.compile(r"^(\s*)([A-Za-z_]\w*(?:, [A-Za-z_]\w*)*):\s?(.*)$")  # "beta_min, beta_max: ..."
_HEADER = re.compile(r"^\s*Args\b[^:]*:")  # "Args:" or "Args (plus every `TrainConfig` field):"


@dataclass(frozen=True)
class FieldDoc:
    name: str
    default: str  # as a user writes it in a recipe or `--set`
    description: str


def field_docs(config_cls: type[Config]) -> list[FieldDoc]:
    """The dataclass's fields in order, with defaults and the descriptions of the `Args:`
    sections of its docstring and its bases' (a subclass's description wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        docs.update(args_section(klass.__dict__.get("__doc__") or ""))  # its own, not an inherited one
    return [FieldDoc(f.name, "(required)" if f.default is dataclasses.MISSING else yaml_text(f.default),
                     docs.get(f.name, "")) for f in dataclasses.fields(config_cls)]


def yaml_text(value: object) -> str:
    """A default as a user writes it in a recipe or `--set`: null, true, [a, b], 1e-06."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{yaml_text(k)}: {yaml_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def args_section(docstring: str) -> dict[str, str]:
    """{name: description} of a Google-style `Args:` section (continuation lines joined)."""
    lines = docstring.expandtabs().splitlines()
    start = next((i for i, line in enumerate(lines) if _HEADER.match(line)), None)
    if start is None:
        return {}
    first = lines[start][_HEADER.match(lines[start]).end():].strip()
    body = ([first] if first else []) + lines[start + 1:]
    entries: dict[str, str] = {}
    indent, current = None, ()
    for line in body:
        match = _ENTRY.match(line)
        if match and (indent is None or len(match.group(1)) <= indent):
            indent, current = len(match.group(1)), tuple(match.group(2).split(", "))
            entries.update(dict.fromkeys(current, match.group(3).strip()))
        elif current and line.strip():
            entries.update({name: f"{entries[name]} {line.strip()}" for name in current})
    return entries
