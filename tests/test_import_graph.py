"""The library's import graph has no cycle, and method modules are leaves.

Rules (docs/ARCHITECTURE.md, "Import layering"):
1. importing one method module imports no other method module, counting the parent packages that
   every import runs (`import compressor.methods.svd_llm` runs `compressor/methods/__init__.py`);
2. no cycle;
3. no library module imports a method module (helpers, package `__init__`s and methods alike): the
   registry imports them by name only.

Every import statement counts, including those inside functions and under `if TYPE_CHECKING:`:
an import hidden in a function is still a dependency, and a cycle through it only moves the
failure from import time to call time. `from pkg import name` is an edge to `pkg.name` when that
is a submodule, else to `pkg`. Parent packages are not edges (importing `a.b.c` runs
`a/__init__.py` first whoever imports it, so counting it would make every package's `__init__`
part of every cycle through its modules; an `__init__` that imports its modules is an edge of its
own). Plugins loaded by module
name through `importlib` (the registry's BUILTIN lines, each config's `apply=`) are not edges: that is
the point of them.

4. config modules (compressor/configs/) import only `compressor.config`, `compressor.errors`, each
   other and the standard library: no torch, no registry, no method module, so `compressor methods`
   and `--help` read every config without them (tests/test_registry_table.py runs it).

On failure the message lists every cycle with the edges that close it, as `file:line`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> the package name it is installed as (pyproject's package-dir).
PACKAGE_DIRS = {"compressor": "compressor", "cli": "compressor.cli", "kernels": "compressor.kernels"}


def module_files() -> dict[str, Path]:
    """Every library module name -> its source file."""
    files = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if folder == "compressor" and path.relative_to(ROOT / folder).parts[0] == "kernels":
                continue  # compressor/kernels is a link to kernels/, walked under its own name
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    return files


def _imported_names(node: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    """The dotted module names one import statement loads (library modules or not)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: `.` is the current package, each extra dot one level up
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = package[:len(package) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    # `from pkg import sub` loads the submodule; `from pkg import obj` needs pkg itself.
    return [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names]


def import_edges(files: dict[str, Path]) -> dict[str, dict[str, str]]:
    """module -> {imported library module: 'file:line' of its first import there}."""
    graph: dict[str, dict[str, str]] = {}
    for module, path in files.items():
        first_line: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for name in _imported_names(node, module, path.name == "__init__.py", files):
                if name in files and name != module:
                    first_line[name] = min(first_line.get(name, node.lineno), node.lineno)
        graph[module] = {name: f"{path.relative_to(ROOT)}:{line}" for name, line in first_line.items()}
    return graph


def strongly_connected(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def describe(component: list[str], graph: dict[str, dict[str, str]]) -> str:
    """One cycle as its internal edges, each with the import's file:line."""
    members = set(component)
    lines = [f"cycle of {len(component)} modules:"]
    for module in component:
        for target, where in sorted(graph[module].items()):
            if target in members:
                lines.append(f"  {module} -> {target}   ({where})")
    return "\n".join(lines)


def test_the_walker_sees_imports_inside_functions_and_relative_ones():
    graph = import_edges(module_files())
    # Known edges of each syntax, so a walker that silently finds nothing cannot pass.
    assert "compressor.errors" in graph["compressor.config"]  # absolute, top level
    assert "compressor.layers.base" in graph["compressor.layers.low_rank"]  # relative `from .base`
    assert "compressor.kernels.dispatch" in graph["compressor.layers.low_rank"]
    assert "compressor.kernels.ref" in graph["compressor.kernels.dispatch"]  # `from . import ref`
    assert "compressor.kernels.dispatch" not in graph["compressor.kernels.ref"]
    assert "compressor.errors" in graph["compressor.cli.common"]  # cli/ is compressor.cli
    assert "compressor.cli.common" in graph["compressor.cli.main"]  # main imports its commands by name (importlib)
    inside_functions = graph["compressor.models"]  # load_model imports the checkpoint format lazily
    assert "compressor.ckpt_format" in inside_functions
    assert len(graph) > 100


def test_a_cycle_hidden_inside_a_function_is_found():
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:9"}, "c": {"a": "c.py:40"}, "d": {"a": "d.py:2"}}
    (component,) = strongly_connected(graph)
    assert component == ["a", "b", "c"]
    assert "c -> a   (c.py:40)" in describe(component, graph)


def test_the_library_has_no_import_cycle():
    graph = import_edges(module_files())
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles (move the shared code down a layer; see docs/ARCHITECTURE.md):\n" + \
        "\n".join(describe(c, graph) for c in cycles)


# -- method modules are leaves -----------------------------------------------------------------

PARENT = "parent package"


def method_modules() -> set[str]:
    """The modules that register an apply (named by each config's `apply=` declaration)."""
    from compressor.registry import declared_configs

    return {config_cls.apply_module for config_cls in declared_configs().values()}


def config_modules(files: dict[str, Path]) -> set[str]:
    return {module for module in files if module.startswith("compressor.configs.")}


def with_parent_packages(graph: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The graph plus an edge from every module to each of its parent packages: importing a module
    runs their `__init__`s first, so whatever they import comes with it."""
    full = {module: dict(edges) for module, edges in graph.items()}
    for module in graph:
        parts = module.split(".")
        for depth in range(1, len(parts)):
            parent = ".".join(parts[:depth])
            if parent in graph:
                full[module].setdefault(parent, PARENT)
    return full


def reachable_methods(graph: dict[str, dict[str, str]], start: str, methods: set[str]) -> dict[str, list[str]]:
    """Other method modules that importing `start` imports, each with the chain of edges to it."""
    chains = {start: []}
    queue = [start]
    while queue:
        module = queue.pop(0)
        for target, where in sorted(graph.get(module, {}).items()):
            if target not in chains:
                chains[target] = [*chains[module], f"{module} -> {target} ({where})"]
                queue.append(target)
    return {m: chain for m, chain in chains.items() if m in methods and m != start}


def leaf_violations(graph: dict[str, dict[str, str]], methods: set[str]) -> list[str]:
    """Rule 1: one line per method module that imports another, with the import chain."""
    full = with_parent_packages(graph)
    return [f"{start} imports {other}: " + "; ".join(chain)
            for start in sorted(methods) for other, chain in sorted(reachable_methods(full, start, methods).items())]


def method_importers(graph: dict[str, dict[str, str]], methods: set[str]) -> list[str]:
    """Rule 3: every static import of a method module, by any library module."""
    return [f"{module} -> {target} ({where})" for module, edges in sorted(graph.items())
            for target, where in sorted(edges.items()) if target in methods and target != module]


def test_the_leaf_rules_catch_method_to_method_helper_and_parent_package_imports():
    methods = {"pkg.m.a", "pkg.m.b"}
    direct = {"pkg.m.a": {"pkg.m.b": "a.py:3"}, "pkg.m.b": {}, "pkg.m": {}, "pkg": {}}
    via_helper = {"pkg.m.a": {"pkg.m._h": "a.py:5"}, "pkg.m._h": {"pkg.m.b": "_h.py:9"}, "pkg.m.b": {},
                  "pkg.m": {}, "pkg": {}}
    via_parent = {"pkg.m.a": {}, "pkg.m.b": {}, "pkg.m": {"pkg.m.b": "m/__init__.py:2"}, "pkg": {}}
    clean = {"pkg.m.a": {"pkg.m._h": "a.py:5"}, "pkg.m._h": {}, "pkg.m.b": {"pkg.m._h": "b.py:4"},
             "pkg.m": {}, "pkg": {}}
    assert leaf_violations(direct, methods) == ["pkg.m.a imports pkg.m.b: pkg.m.a -> pkg.m.b (a.py:3)"]
    assert leaf_violations(via_helper, methods) == [
        "pkg.m.a imports pkg.m.b: pkg.m.a -> pkg.m._h (a.py:5); pkg.m._h -> pkg.m.b (_h.py:9)"]
    assert "pkg.m.a -> pkg.m (parent package); pkg.m -> pkg.m.b (m/__init__.py:2)" in " ".join(
        leaf_violations(via_parent, methods))
    assert method_importers(via_helper, methods) == ["pkg.m._h -> pkg.m.b (_h.py:9)"]
    assert leaf_violations(clean, methods) == [] and method_importers(clean, methods) == []


def test_importing_one_method_module_imports_no_other():
    graph = import_edges(module_files())
    methods = method_modules()
    assert methods <= set(graph), sorted(methods - set(graph))
    problems = leaf_violations(graph, methods)
    assert not problems, "method modules must be leaves; move the shared code into a helper:\n" + "\n".join(problems)


def test_no_library_module_imports_a_method_module():
    problems = method_importers(import_edges(module_files()), method_modules())
    assert not problems, "only the registry imports method modules (by name):\n" + "\n".join(problems)


# -- config modules are torch-free and below everything ------------------------------------------

CONFIG_IMPORTS = ("compressor.config", "compressor.errors", "compressor.configs")


def config_violations(files: dict[str, Path], configs: set[str]) -> list[str]:
    """Rule 4: every import of a config module that is neither the standard library nor one of
    CONFIG_IMPORTS (and their submodules), as `module -> imported (file:line)`."""
    problems = []
    for module in sorted(configs):
        path = files[module]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for name in _imported_names(node, module, path.name == "__init__.py", files):
                top = name.split(".")[0]
                library = name in files or top == "compressor"
                allowed = any(name == ok or name.startswith(ok + ".") for ok in CONFIG_IMPORTS)
                if (library and not allowed) or (not library and top not in sys.stdlib_module_names):
                    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                    problems.append(f"{module} -> {name} ({where}:{node.lineno})")
    return problems


def test_the_config_rule_catches_torch_registry_and_method_imports(tmp_path):
    source = tmp_path / "bad.py"
    source.write_text("from __future__ import annotations\nimport dataclasses\nimport torch\n"
                      "from ..registry import register\nfrom ..config import MethodConfig\n"
                      "from .lowrank import LowRankConfig\n\ndef f():\n    from ..methods import svd\n")
    files = {"compressor.configs.bad": source, "compressor.registry": source, "compressor.config": source,
             "compressor.configs.lowrank": source, "compressor.methods.svd": source, "compressor.methods": source}
    found = [line.split(" (")[0] for line in config_violations(files, {"compressor.configs.bad"})]
    assert found == ["compressor.configs.bad -> torch", "compressor.configs.bad -> compressor.registry",
                     "compressor.configs.bad -> compressor.methods.svd"]


def test_config_modules_import_only_configs_errors_and_the_standard_library():
    files = module_files()
    configs = config_modules(files)
    assert {"compressor.configs.svd_llm", "compressor.configs.lowrank", "compressor.configs.train"} <= configs
    problems = config_violations(files, configs)
    assert not problems, "config modules must stay torch-free and below the registry:\n" + "\n".join(problems)


def test_the_kernels_import_nothing_from_the_library():
    """ARCHITECTURE rule 5: kernels/ (compressor.kernels) may import torch, triton and each other only."""
    graph = import_edges(module_files())
    kernels = [m for m in graph if m.startswith("compressor.kernels")]
    assert "compressor.kernels.dispatch" in kernels and len(kernels) > 5  # the walker sees them
    problems = [f"{module} -> {target} ({where})" for module in kernels for target, where in graph[module].items()
                if target.startswith("compressor") and not target.startswith("compressor.kernels")]
    assert not problems, "the kernels import nothing from the library:\n" + "\n".join(problems)
