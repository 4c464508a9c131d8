"""A method config's fields, defaults and descriptions, read from its source without importing it.

`compressor methods NAME` must answer at once, but every method module imports torch. The config
dataclasses are plain enough to read statically: fields are annotated class attributes with literal
defaults (or a module-level constant) or class keywords overriding a base's default
(`CalibrationConfig`), descriptions live in the class docstrings' `Args:` sections, and bases are
classes of the same file or names imported from another compressor module. A test
compares this reading with the imported dataclasses for every registered method, so it cannot drift.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).parent
ROOT_CONFIG = ("compressor.config", "MethodConfig")
_ENTRY = re.compile(r"^(\s*)([A-Za-z_]\w*(?:, [A-Za-z_]\w*)*):\s?(.*)$")  # "beta_min, beta_max: ..."
_HEADER = re.compile(r"^\s*Args\b[^:]*:")  # "Args:" or "Args (plus every `TrainConfig` field):"


@dataclass(frozen=True)
class FieldDoc:
    name: str
    default: str  # the default as written in YAML (source text when it is not a literal)
    description: str
    value: object = None  # the default itself when it is a literal
    literal: bool = True


def yaml_text(value: object) -> str:
    """A literal default as a user writes it in a recipe or `--set`: null, true, [a, b], 1e-06."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{yaml_text(k)}: {yaml_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def config_fields(module: str, class_name: str) -> list[FieldDoc]:
    """Fields of `module.class_name` in dataclass order (bases first), with defaults and docs."""
    fields: dict[str, FieldDoc] = {}
    docs: dict[str, str] = {}
    for mod, node in reversed(_lineage(module, class_name)):
        docs.update(args_section(ast.get_docstring(node) or ""))
        for item in node.body:
            if _is_field(item):
                fields[item.target.id] = _default(mod, item.target.id, item.value)
        for keyword in node.keywords:  # `class X(CalibrationConfig, num_windows=128)`: X's default
            fields[keyword.arg] = _default(mod, keyword.arg, keyword.value)
    return [FieldDoc(f.name, f.default, docs.get(f.name, ""), f.value, f.literal) for f in fields.values()]


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


def _lineage(module: str, class_name: str) -> list[tuple[str, ast.ClassDef]]:
    """The class and its config bases, most derived first, up to MethodConfig."""
    tree = _parse(module)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if node is None:  # re-exported, e.g. `from compressor.training import TrainConfig`
        source = _defining_module(module, class_name)
        if source == module:
            raise LookupError(f"class {class_name} not found in {module}")
        return _lineage(source, class_name)
    chain = [(module, node)]
    if (module, class_name) == ROOT_CONFIG:
        return chain
    for base in node.bases:
        if isinstance(base, ast.Name):
            chain += _lineage(_defining_module(module, base.id), base.id)
    return chain


def _defining_module(module: str, name: str) -> str:
    """Where `name` (used in `module`) is defined: the module itself or the one it is imported from."""
    tree = _parse(module)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return _absolute(module, node)
    return module


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".")[: -node.level]
    return ".".join(package + ([node.module] if node.module else []))


@functools.cache
def _parse(module: str) -> ast.Module:
    parts = module.split(".")
    if parts[0] != "compressor":
        raise LookupError(f"{module} is not a compressor module")
    base = PACKAGE_ROOT.joinpath(*parts[1:])
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    return ast.parse(path.read_text(encoding="utf-8"))


def _is_field(item: ast.stmt) -> bool:
    return (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None
            and "ClassVar" not in ast.unparse(item.annotation))


def _default(module: str, name: str, node: ast.expr) -> FieldDoc:
    """A field's default: a literal, a module constant, or `module.CONSTANT`; else its source text."""
    value = _constant(module, node)
    if value is not _UNKNOWN:
        return FieldDoc(name, yaml_text(value), "", value)
    return FieldDoc(name, ast.unparse(node), "", None, literal=False)


_UNKNOWN = object()


def _constant(module: str, node: ast.expr) -> object:
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Name):
        return _module_constant(_defining_module(module, node.id), node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        owner = _defining_module(module, node.value.id)
        submodule = f"{owner}.{node.value.id}" if owner != module else node.value.id
        return _module_constant(submodule, node.attr)
    return _UNKNOWN


def _module_constant(module: str, name: str) -> object:
    try:
        tree = _parse(module)
    except (LookupError, OSError):
        return _UNKNOWN
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return _UNKNOWN
    return _UNKNOWN
