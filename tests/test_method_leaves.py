"""In a fresh process, importing one method module registers exactly that method, and importing
a config module (compressor/configs/, the registry's BUILTIN lines) registers none; `apply_` given
a config from its config module alone imports exactly the declared apply module.

One subprocess imports the heavy third-party packages once (no compressor module), then forks a
child per method module: each child starts with no compressor module loaded, imports its one
module and reports what the registry then holds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from compressor.registry import BUILTIN, declared_configs

CODE = """
import importlib, json, os, sys
import torch, transformers  # the expensive imports, once; no compressor module yet
assert not [m for m in sys.modules if m.startswith("compressor")]
found = {}
for module in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            if module.startswith("apply_:"):  # apply_ given a config imported from its config module alone
                _, name, cls = module.split(":")
                from compressor.registry import method_for_config
                method_for_config(getattr(importlib.import_module(name), cls)())
            else:
                importlib.import_module(module)
            from compressor.registry import _BY_NAME
            os.write(write, " ".join(sorted(_BY_NAME)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        found[module] = pipe.read().split()
    os.waitpid(pid, 0)
print(json.dumps(found))
"""


@pytest.mark.slow
def test_importing_a_method_module_registers_exactly_that_method():
    modules = {config_cls.apply_module: [name] for name, config_cls in declared_configs().items()}
    modules.update({module: [] for module in BUILTIN})
    assert len(modules) == 40
    modules["apply_:compressor.configs.svd:SVDConfig"] = ["svd"]  # finds its method by the declaration
    done = subprocess.run([sys.executable, "-c", CODE, *modules], capture_output=True, text=True,
                          timeout=600, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    registered = json.loads(done.stdout.strip().splitlines()[-1])
    assert registered == modules
