"""YAML recipes: load (yaml.safe_load), apply `--set` overrides, and the typed top level
(`RunConfig`), validated by the same strict `from_dict` as every stage's config."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .config import Config, did_you_mean
from .dtypes import AUTO, check_output_dtype
from .errors import ConfigError
from .export import check_format
from .offload import parse_max_memory
from .preflight import check_int
from .protocol import PROTOCOL


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(Config):
    """The recipe's `evaluate:`: held-out quality before and after the stages (`false` = none).

    Args:
        data: held-out text, its second half scored (`default`, a file or a datasets name).
        seq_len: tokens per window.
        num_windows: windows scored: the first ones of the held-out half.
        batch_size: windows per forward pass.
        text_column: column holding the text in tabular data; null = the run's `text_column`.
        tasks: lm-evaluation-harness tasks scored before and after, next to perplexity (needs the
            `eval` extra), e.g. [tinystories_cloze] (shipped, offline) or [hellaswag, arc_easy].
        tasks_dir: a folder of extra lm-eval task YAML files (tasks with local data files).
    """

    unknown_key: ClassVar[str] = "unknown key `{key}`"

    data: str = PROTOCOL["data"]
    seq_len: int = PROTOCOL["seq_len"]
    num_windows: int = PROTOCOL["num_windows"]
    batch_size: int = PROTOCOL["batch_size"]
    text_column: str | None = None
    tasks: tuple[str, ...] = ()
    tasks_dir: str | None = None

    def __post_init__(self) -> None:
        for key in ("seq_len", "num_windows", "batch_size"):
            check_int(f"evaluate.{key}", getattr(self, key), 1)
        if not all(t.strip() for t in self.tasks):
            raise ConfigError(f"`evaluate.tasks` must be a list of lm-eval task names, got {list(self.tasks)!r}")


@dataclass(frozen=True, kw_only=True)
class GatesConfig(Config):
    """The recipe's `gates:`: the run exits non-zero (3) when one is missed; null = not checked.

    Args:
        max_ppl: highest held-out perplexity accepted after the run.
        max_ppl_increase: highest relative perplexity increase accepted (0.1 = +10 %).
        min_cosine: lowest mean embedding cosine to the dense model accepted (encoders).
    """

    unknown_key: ClassVar[str] = "unknown gate `{key}`"

    max_ppl: float | None = None
    max_ppl_increase: float | None = None
    min_cosine: float | None = None

    def active(self) -> dict[str, float]:
        """{gate: limit} of the gates that are set."""
        return {k: v for k, v in self.to_dict().items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class RunConfig(Config):
    """A recipe's top level: everything but the stages' own fields.

    Args:
        model: model id, folder or .gguf (default: the embedded stories260K).
        seed: integer seed for data sampling and training.
        device: auto (default: CUDA when available, else CPU), cpu, cuda, cuda:0, ...
        dtype: the written checkpoint's dtype: auto (the source model's, default), float32,
            bfloat16 or float16.
        trust_remote_code: run a Hub model's custom code (off by default).
        load_in: 4bit or 8bit bitsandbytes loading of the frozen base.
        max_memory: accelerate offload: per-device budget, e.g. `0=20GiB,cpu=60GiB`.
        offload_folder: accelerate offload: folder for the weights that fit nowhere else (disk).
        out: output folder.
        overwrite: replace `out` when it holds an earlier result of this tool (other folders are
            refused).
        merge: write dense nn.Linear weights instead of factored layers.
        export: also write the checkpoint in a standard format into <out>/<format>:
            compressed-tensors (int4/int8 gptq/rtn -> pack-quantized, 2:4 prune -> sparse-24-bitmask).
        text_column: column holding the text in tabular data (.jsonl/.json/.csv/.tsv/.parquet,
            datasets).
        calibration: text for every stage that calibrates (its `calibration`) or heals (heal's and
            welore-tune's training `data`); a stage that sets its own keeps it.
        evaluate: {data, seq_len, num_windows, batch_size, text_column, tasks, tasks_dir} or false.
        gates: {max_ppl, max_ppl_increase, min_cosine}: exit non-zero when missed.
        stages: ordered list of {method: NAME, **fields}; each is validated by its method's config.
    """

    unknown_key: ClassVar[str] = "unknown top-level key `{key}`"
    # Not written to recipe.resolved.yaml: re-running a resolved recipe must not name or replace
    # an output folder.
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("out", "overwrite")

    model: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = AUTO
    trust_remote_code: bool = False
    load_in: str | None = None
    max_memory: str | dict | None = None
    offload_folder: str | None = None
    out: str | None = None
    overwrite: bool = False
    merge: bool = False
    export: str | None = None
    text_column: str | None = None
    calibration: str | None = None
    evaluate: EvaluateConfig | None = field(default_factory=EvaluateConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    stages: tuple[Any, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> RunConfig:
        """`evaluate: true` (or null) = the default protocol; `evaluate: false` = no evaluation."""
        data = dict(data)
        if "evaluate" in data and data["evaluate"] in (True, None, False):
            data["evaluate"] = None if data["evaluate"] is False else {}
        if data.get("gates") is None:
            data.pop("gates", None)
        return super().from_dict(data, where)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("`stages` must be a non-empty list of {method: NAME, ...} mappings")
        check_output_dtype(self.dtype)
        check_int("seed", self.seed, 0)
        if self.export is not None:
            check_format(self.export)
        if self.max_memory is not None:
            for device, size in parse_max_memory(self.max_memory).items():  # raises with the expected format
                check_memory_size(device, size)

    def to_recipe(self, stages: list[dict[str, Any]]) -> dict[str, Any]:
        """The resolved recipe: every top-level default filled in, then `stages` (resolved)."""
        top = {k: v for k, v in self.to_dict().items() if k not in (*self.RUN_ONLY, "stages")}
        if self.evaluate is None:
            top["evaluate"] = False
        return {**top, "stages": stages}


    def stage_specs(self) -> list[Any]:
        """The stages with the top-level `calibration` filled in where a stage calibrates or heals
        and does not name its own text (specs that are not stages are left for the stage parser)."""
        if self.calibration is None:
            return list(self.stages)
        return [_with_calibration(spec, self.calibration) for spec in self.stages]


def _with_calibration(spec: Any, text: str) -> Any:
    from .adapters._heal_train import HealFields
    from .registry import get_method

    if not isinstance(spec, dict) or "method" not in spec:
        return spec
    try:
        config_cls = get_method(str(spec["method"])).config_cls
    except ConfigError:
        return spec  # the stage parser names the unknown method
    key = "calibration" if "calibration" in config_cls.field_names() else \
        "data" if issubclass(config_cls, HealFields) else None
    return spec if key is None or key in spec else {**spec, key: text}


# What accelerate's max_memory takes: bytes, or a number with a unit (`20GiB`, `5.0GB`, `512MB`).
_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|B)?$", re.IGNORECASE)


def check_memory_size(device: Any, size: Any) -> None:
    if isinstance(size, bool) or not (isinstance(size, int) and size > 0 or isinstance(size, str) and _SIZE.match(size)):
        raise ConfigError(f"`max_memory`: the size for `{device}` is {size!r}, not a size; write e.g. "
                          "`0=20GiB,cpu=60GiB` (bytes, or a number with KB/MB/GB/KiB/MiB/GiB)")


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


# A recipe is a few dozen lines: these bounds stop a small hostile file (a YAML "billion laughs"
# of nested aliases, a 10k-deep nesting) before it is expanded or walked recursively.
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 100_000
INT64 = 2**63


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader without YAML 1.1's base-60 numbers (`2:4` stays the string an N:M pattern
    is spelled with, not 124), and refusing a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"{self.where}: key `{key}` is given twice (line {line}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _without_base60(tag: str, regexp: re.Pattern) -> re.Pattern:
    """The int / float resolver's pattern refusing any value with a colon (YAML 1.1's `1:30`)."""
    if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
        return regexp
    return re.compile(r"(?!.*:)" + regexp.pattern, regexp.flags)


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, _without_base60(tag, regexp)) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def safe_yaml(text: str, where: str) -> Any:
    """yaml.safe_load after a streaming pass that bounds depth and the alias-expanded size."""
    _check_shape(text, where)
    loader = RecipeLoader(text)
    loader.where = where
    try:
        value = loader.get_single_data()
    finally:
        loader.dispose()
    _check_ints(value, where)
    return value


def _check_shape(text: str, where: str) -> None:
    """Walk the parser's events (no recursion, nothing built): depth and expanded node count,
    where an alias counts as the whole subtree its anchor names."""
    sizes: dict[str, int] = {}
    stack: list[list] = []  # [anchor, nodes so far] per open collection
    total = 0

    def add(count: int) -> None:
        nonlocal total
        total += count
        if stack:
            stack[-1][1] += count
        if total > MAX_NODES:
            raise ConfigError(f"{where} expands to more than {MAX_NODES} values (YAML aliases?); a recipe is "
                              "a short list of stages: write it out plainly")

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            add(sizes.get(event.anchor, 1))
        elif isinstance(event, yaml.ScalarEvent):
            add(1)
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            stack.append([event.anchor, 1])
            if len(stack) > MAX_DEPTH:
                raise ConfigError(f"{where} is nested more than {MAX_DEPTH} levels deep; a recipe needs a few")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, size = stack.pop()
            if anchor:
                sizes[anchor] = size
            add(size)


def _check_ints(value: Any, where: str) -> None:
    """Integers must fit in 64 bits (torch and numpy overflow on larger ones)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool) and not -INT64 <= item < INT64:
            raise ConfigError(f"{where}: the integer {item} is out of range (at most {INT64 - 1}); use a "
                              "realistic value")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe `{path}` does not exist; pass a YAML file (see recipes/)")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe `{path}` is larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a short YAML file")
    try:
        recipe = safe_yaml(path.read_text(encoding="utf-8"), f"recipe `{path}`")
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe `{path}` is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"recipe `{path}` is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe `{path}` must be a mapping with a `stages:` list, got {type(recipe).__name__}")
    return apply_overrides(recipe, overrides or [])


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"`--set {text}` must look like key=value (e.g. stages.0.rank=0.4)")
    key, raw = text.split("=", 1)
    try:
        value = safe_yaml(raw, f"`--set {text[:60]}`") if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        value = float(value)  # YAML 1.1 reads `1e-2` (no dot) as a string
    return key.strip().split("."), value


def apply_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set a.b=v`: the path must exist (or be a field of a stage); YAML-typed values."""
    for text in overrides:
        path, value = parse_override(text)
        if path[0] not in RunConfig.field_names() and len(recipe.get("stages", [])) == 1:
            path = ["stages", "0", *path]  # single-stage runs: `--set rank=0.4` means the stage
        if path[-1] == "method" and len(path) == 3 and path[0] == "stages":
            raise ConfigError(f"`--set {text}`: a stage's method cannot be overridden (its other fields and the "
                              "report belong to it); use --method, or edit the recipe")
        _set_path(recipe, path, value, text)
    return recipe


def _set_path(node: Any, path: list[str], value: Any, text: str) -> None:
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"`--set {text}`: `{part}` is not a valid index (0..{len(node) - 1})")
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                if i == 0 and part in RunConfig.field_names():
                    node[part] = {}
                else:
                    raise ConfigError(f"`--set {text}`: no `{part}` in the recipe{did_you_mean(part, node)}")
            node = node[part]
        else:
            raise ConfigError(f"`--set {text}`: `{part}` is not a mapping")
    if isinstance(node, list):
        raise ConfigError(f"`--set {text}`: cannot replace a whole list element")
    node[path[-1]] = value
