"""The import-free metadata (registry.BUILTIN, config_docs) must equal what the modules define."""

import dataclasses
import sys

from compressor.config_docs import args_section, config_fields
from compressor.registry import BUILTIN, MethodInfo, _BY_NAME, load_builtin_methods, summary_of


def test_builtin_table_equals_the_registrations():
    load_builtin_methods()
    registered = {
        name: MethodInfo(m.apply.__module__, m.config_cls.__name__, m.kind, m.summary)
        for name, m in _BY_NAME.items() if m.apply.__module__.startswith("compressor.")
    }
    missing = {n: i for n, i in registered.items() if BUILTIN.get(n) != i}
    assert not missing, f"update compressor/registry.py BUILTIN with: {missing}"
    assert set(BUILTIN) == set(registered)


def test_static_config_fields_equal_the_dataclasses():
    load_builtin_methods()
    for name, info in BUILTIN.items():
        config_cls = getattr(sys.modules[info.module], info.config_class)
        static = config_fields(info.module, info.config_class)
        real = dataclasses.fields(config_cls)
        assert [f.name for f in static] == [f.name for f in real], name
        for doc, field in zip(static, real):
            default = list(field.default) if isinstance(field.default, tuple) else field.default
            value = list(doc.value) if isinstance(doc.value, tuple) else doc.value
            assert doc.literal, f"{info.config_class}.{field.name}: default `{doc.default}` is not a literal"
            assert value == default, (name, field.name, doc.default, default)
            assert doc.description, f"{info.config_class}.{field.name} has no description in an Args: section"


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


def test_flag_table_names_real_fields_and_help_lists_every_method():
    from compressor.cli.common import method_help
    from compressor.registry import FLAG_FIELDS, method_names

    load_builtin_methods()
    every = {f for m in _BY_NAME.values() for f in m.config_cls.field_names()}
    stale = {flag: fields for flag, fields in FLAG_FIELDS.items() if not set(fields) <= every}
    assert not stale, f"FLAG_FIELDS maps flags to fields no method has: {stale}"
    for kind in ("compress", "finetune"):
        assert all(name in method_help(kind) for name in method_names(kind))


def test_offloadable_follows_the_kind():
    offloadable = {name for name, info in BUILTIN.items() if info.offloadable}
    assert offloadable == {name for name, info in BUILTIN.items() if info.kind in ("analyze", "compress")}
    assert {"analyze", "svd", "prune", "dsformer", "maestro"} <= offloadable and "lora" not in offloadable
