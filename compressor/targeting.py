"""Find and select linear layers by name, architecture-agnostically, and swap modules in place.

Syntax (one rule for `targets` and `ignore`, in recipes and in Python): a plain name matches the
full module name or any dotted suffix (`q_proj`, `layers.0.mlp`); `re:<regex>` full-matches the
module name. `lm_head` and embeddings are excluded unless a target names them explicitly.
"""

from __future__ import annotations

import re

from torch import nn

from .errors import ConfigError
from .layers.base import is_linear, linear_shape, linear_weight, replace_module  # noqa: F401  (re-exported)

EXCLUDED_BY_DEFAULT = ("lm_head", "embed_out", "output_projection")


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _is_default_excluded(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in EXCLUDED_BY_DEFAULT or "embed" in leaf


def find_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear-like module by full name, `lm_head` and embeddings included."""
    return {name: mod for name, mod in model.named_modules() if name and is_linear(mod)}


def select_linears(
    model: nn.Module, targets: tuple[str, ...] | list[str] = (), ignore: tuple[str, ...] | list[str] = ()
) -> dict[str, nn.Module]:
    """The linears a stage touches. Raises ConfigError (listing real names) when none match."""
    for pattern in (*targets, *ignore):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ConfigError(f"invalid regex `{pattern}` in targets/ignore: {err}") from None
    chosen = {name: module for name, module in find_linears(model).items() if is_selected(name, targets, ignore)}
    if not chosen:
        raise ConfigError(
            f"`targets` {list(targets)} (ignore={list(ignore)}) matched no linear layer; "
            f"the model has e.g. {example_names(model)}"
        )
    return chosen


def is_selected(name: str, targets=(), ignore=()) -> bool:
    """Whether the linear `name` is one `targets` / `ignore` select (the module docstring's rule)."""
    chosen = any(matches(name, t) for t in targets) if targets else not _is_default_excluded(name)
    return chosen and not any(matches(name, i) for i in ignore)


def example_names(model: nn.Module, limit: int = 8) -> list[str]:
    """A few real linear names plus the distinct leaf names, for error messages."""
    names = list(find_linears(model))
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return names[:limit] + ([f"(leaf names: {', '.join(leaves)})"] if leaves else [])


def layer_type(name: str) -> str:
    """The leaf of a module name (`q_proj`), used to group layers of the same role."""
    return name.rsplit(".", 1)[-1]
