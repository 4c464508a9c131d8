"""Each method is declared once, by its config class, in a torch-free module: the registry's
BUILTIN lines, the registrations, `compressor methods` and every `--help` all read that one
declaration (docs/ARCHITECTURE.md, "Contracts every method module follows")."""

import dataclasses
import json
import subprocess
import sys

import pytest

from compressor.config import MethodConfig, args_section, field_docs
from compressor.registry import (
    _BY_NAME,
    BUILTIN,
    declared_config,
    get_method,
    load_builtin_methods,
    method_info,
    method_names,
    register,
    summary_of,
)


def test_each_builtin_line_declares_the_method_its_apply_module_registers():
    load_builtin_methods()
    builtin = {n: m for n, m in _BY_NAME.items() if m.apply.__module__.startswith("compressor.")}
    declared = [declared_config(module) for module in BUILTIN]
    assert sorted(c.method_name for c in declared) == sorted(builtin) and len(declared) == 20
    for module, config_cls in zip(BUILTIN, declared):
        method = builtin[config_cls.method_name]
        assert module.startswith("compressor.configs.") and config_cls.__module__ == module
        assert method.config_cls is config_cls and method.apply.__module__ == config_cls.apply_module
        assert method.kind == config_cls.method_kind in ("analyze", "compress", "finetune")


def test_every_field_has_a_default_and_a_description():
    for module in BUILTIN:
        config_cls = declared_config(module)
        for doc, field in zip(field_docs(config_cls), dataclasses.fields(config_cls), strict=True):
            assert doc.name == field.name and doc.default != "(required)", (module, field.name)
            assert doc.description, f"{config_cls.__name__}.{field.name} has no description in an Args: section"


def test_field_docs_show_defaults_as_a_recipe_writes_them():
    rows = {doc.name: doc for doc in field_docs(get_method("saes-svd").config_cls)}
    assert rows["beta"].default == "null" and rows["damping"].default == "1e-05"
    assert rows["num_windows"].default == "128"  # CalibratedLowRankConfig's class keyword
    assert rows["second_phase"].default.startswith("[o_proj, down_proj, ")
    assert rows["rank"].description.startswith("KEEP ratio")  # LowRankConfig's Args, inherited
    lora = {doc.name: doc for doc in field_docs(get_method("lora").config_cls)}
    assert lora["lr"].description.startswith("None = 2e-4 with adamw")  # the subclass's wins over TrainConfig's


def test_args_section_joins_continuation_lines():
    doc = """Title.

    Args:
        rank: keep ratio,
            continued here.
        seed: the seed.
    """
    assert args_section(doc) == {"rank": "keep ratio, continued here.", "seed": "the seed."}


def test_summary_is_one_whole_sentence():
    assert summary_of("KappaTune: tune (O. Ludwig, arXiv 1). More text.") == "KappaTune: tune (O. Ludwig, arXiv 1)."
    assert summary_of("Sorted: at once. arXiv 2309.08968.\n\nLater.") == "Sorted: at once. arXiv 2309.08968."
    assert method_info("svd-llm").summary == "SVD-LLM: truncation-aware data whitening (+ optional least-squares update of U)."


def test_flag_table_names_real_fields_and_help_lists_every_method():
    from compressor.cli.common import method_help

    from compressor.registry import FLAG_FIELDS

    every = {f for module in BUILTIN for f in declared_config(module).field_names()}
    stale = {flag: fields for flag, fields in FLAG_FIELDS.items() if not set(fields) <= every}
    assert not stale, f"FLAG_FIELDS maps flags to fields no method has: {stale}"
    for kind in ("compress", "finetune"):
        assert all(name in method_help(kind) for name in method_names(kind))


def test_offloadable_follows_the_kind():
    infos = {name: method_info(name) for name in method_names()}
    offloadable = {name for name, info in infos.items() if info.offloadable}
    assert offloadable == {name for name, info in infos.items() if info.kind in ("analyze", "compress")}
    assert {"analyze", "svd", "prune", "dsformer", "maestro"} <= offloadable and "lora" not in offloadable


def test_the_quant_config_accepts_exactly_the_widths_the_kernels_pack():
    from compressor.configs.quant import INT_BITS
    from compressor.kernels.packing import INT_BITS as PACKED

    assert INT_BITS == PACKED


# -- the declaration: class keywords, read by register(), never written back --------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyConfig(MethodConfig, method="toy-declared", kind="transform", apply=__name__):
    """Toy: a declaration read by the registry. More text.

    Args:
        scale: a factor.
    """

    scale: float = 2.0


@pytest.fixture
def clean_registry(monkeypatch):
    from compressor import registry

    monkeypatch.setattr(registry, "_BY_NAME", dict(registry._BY_NAME))
    monkeypatch.setattr(registry, "_BY_CONFIG", dict(registry._BY_CONFIG))


def test_register_reads_the_declaration_and_writes_nothing_onto_the_class(clean_registry):
    before = dict(vars(ToyConfig))

    @register(ToyConfig)
    def apply(model, config, ctx):
        return None

    assert dict(vars(ToyConfig)) == before
    method = get_method("toy-declared")
    assert (method.name, method.kind, method.apply) == ("toy-declared", "transform", apply)
    assert ToyConfig.declares_method() and method_info("toy-declared").module == __name__
    assert "toy-declared" in method_names("transform")
    with pytest.raises(KeyError, match="registered twice"):
        register(ToyConfig)(apply)


def test_bad_declarations_are_refused(clean_registry):
    with pytest.raises(TypeError, match=r"is now register\(Config\): declare the method on the config"):
        register("toy-declared", ToyConfig, kind="transform")
    with pytest.raises(TypeError, match="missing or not a string: apply"):
        type("NoApply", (MethodConfig,), {}, method="x", kind="compress")
    with pytest.raises(TypeError, match="kind='quantize' must be one of analyze, compress"):
        type("BadKind", (MethodConfig,), {}, method="x", kind="quantize", apply=__name__)
    Inherits = dataclasses.dataclass(frozen=True, kw_only=True)(type("Inherits", (ToyConfig,), {}))
    assert Inherits.method_name == "toy-declared" and not Inherits.declares_method()
    with pytest.raises(TypeError, match="not a config that declares a method"):
        register(Inherits)
    Elsewhere = type("Elsewhere", (MethodConfig,), {}, method="elsewhere", kind="compress", apply="other.module")
    with pytest.raises(TypeError, match="declares apply='other.module' but `elsewhere` is registered in"):
        register(Elsewhere)(lambda model, config, ctx: None)


FRESH = """
import json, sys
from typer.testing import CliRunner
from compressor.cli.main import app
from compressor.registry import _BY_NAME
listing = CliRunner().invoke(app, ["methods", "saes-svd"])
helped = CliRunner().invoke(app, ["compress", "--help"])
result = {"codes": [listing.exit_code, helped.exit_code], "torch": "torch" in sys.modules,
          "registered": sorted(_BY_NAME), "fields": listing.output.count("\\n"), "listed": "saes-svd" in helped.output}
print(json.dumps(result))
"""


def test_methods_and_help_read_the_dataclasses_without_torch():
    done = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0] and result["listed"]
    assert result["fields"] > 20  # saes-svd's 19 fields, each on one line at least, and the header
    assert not result["torch"] and result["registered"] == []
