"""YAML recipes: load (yaml.safe_load), apply `--set` overrides, validate every level."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import re

import yaml

from .config import did_you_mean
from .errors import ConfigError
from .offload import parse_max_memory

TOP_LEVEL_KEYS = {
    "model": "model id, folder or .gguf (default: the embedded stories260K)",
    "seed": "integer seed for data sampling and training",
    "device": "auto (default: CUDA when available, else CPU), cpu, cuda, cuda:0, ...",
    "dtype": "float32, bfloat16 or float16",
    "trust_remote_code": "run a Hub model's custom code (off by default)",
    "load_in": "4bit or 8bit bitsandbytes loading of the frozen base",
    "max_memory": "accelerate offload: per-device budget, e.g. `0=20GiB,cpu=60GiB` (low-rank methods)",
    "offload_folder": "accelerate offload: folder for the weights that fit nowhere else (disk)",
    "out": "output folder",
    "merge": "write dense nn.Linear weights instead of factored layers",
    "text_column": "column holding the text in tabular data (.jsonl/.json/.csv/.tsv/.parquet, datasets)",
    "evaluate": "{data, seq_len, num_windows, batch_size} or false",
    "gates": "{max_ppl, max_ppl_increase, min_cosine}: exit non-zero when missed",
    "stages": "ordered list of {method: NAME, **fields}",
}
EVALUATE_KEYS = {"data": str, "seq_len": int, "num_windows": int, "batch_size": int, "text_column": str}
GATE_KEYS = ("max_ppl", "max_ppl_increase", "min_cosine")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe `{path}` does not exist; pass a YAML file (see recipes/)")
    try:
        recipe = yaml.safe_load(path.read_text())
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
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        value = float(value)  # YAML 1.1 reads `1e-2` (no dot) as a string
    return key.strip().split("."), value


def apply_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set a.b=v`: the path must exist (or be a field of a stage); YAML-typed values."""
    for text in overrides:
        path, value = parse_override(text)
        if path[0] not in TOP_LEVEL_KEYS and len(recipe.get("stages", [])) == 1:
            path = ["stages", "0", *path]  # single-stage runs: `--set rank=0.4` means the stage
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
                if i == 0 and part in TOP_LEVEL_KEYS:
                    node[part] = {}
                else:
                    raise ConfigError(f"`--set {text}`: no `{part}` in the recipe{did_you_mean(part, node)}")
            node = node[part]
        else:
            raise ConfigError(f"`--set {text}`: `{part}` is not a mapping")
    if isinstance(node, list):
        raise ConfigError(f"`--set {text}`: cannot replace a whole list element")
    node[path[-1]] = value


def validate_top_level(recipe: dict[str, Any]) -> None:
    for key in recipe:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"recipe: unknown top-level key `{key}`{did_you_mean(key, TOP_LEVEL_KEYS)} "
                              f"(valid: {', '.join(TOP_LEVEL_KEYS)})")
    stages = recipe.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError("recipe: `stages` must be a non-empty list of {method: NAME, ...} mappings")
    evaluate = recipe.get("evaluate")
    if evaluate not in (None, False, True) and not isinstance(evaluate, dict):
        raise ConfigError(f"recipe: `evaluate` must be a mapping or false, got {evaluate!r}")
    for key, value in (evaluate or {}).items() if isinstance(evaluate, dict) else []:
        if key not in EVALUATE_KEYS:
            raise ConfigError(f"recipe: unknown key `evaluate.{key}`{did_you_mean(key, EVALUATE_KEYS)}")
        if not isinstance(value, EVALUATE_KEYS[key]) or isinstance(value, bool):
            raise ConfigError(f"recipe: `evaluate.{key}` must be {EVALUATE_KEYS[key].__name__}, got {value!r}")
    gates = recipe.get("gates") or {}
    if not isinstance(gates, dict):
        raise ConfigError(f"recipe: `gates` must be a mapping, got {gates!r}")
    for key, value in gates.items():
        if key not in GATE_KEYS:
            raise ConfigError(f"recipe: unknown gate `{key}`{did_you_mean(key, GATE_KEYS)} (valid: {', '.join(GATE_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"recipe: gate `{key}` must be a number, got {value!r}")
    for key, kind in (("seed", int), ("merge", bool), ("trust_remote_code", bool)):
        if key in recipe and (not isinstance(recipe[key], kind) or (kind is int and isinstance(recipe[key], bool))):
            raise ConfigError(f"recipe: `{key}` must be {kind.__name__}, got {recipe[key]!r}")
    if recipe.get("text_column") is not None and not isinstance(recipe["text_column"], str):
        raise ConfigError(f"recipe: `text_column` must be a column name, got {recipe['text_column']!r}")
    if recipe.get("offload_folder") is not None and not isinstance(recipe["offload_folder"], str):
        raise ConfigError(f"recipe: `offload_folder` must be a folder path, got {recipe['offload_folder']!r}")
    if recipe.get("max_memory") is not None:
        parse_max_memory(recipe["max_memory"])  # raises with the expected format
