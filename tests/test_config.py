import ast
import inspect
import textwrap
from dataclasses import dataclass

import pytest

from compressor.config import CALIBRATION_FIELDS, CalibrationConfig, MethodConfig
from compressor.errors import ConfigError
from compressor.recipe import EvaluateConfig, RunConfig
from compressor.registry import get_method, method_names


@dataclass(frozen=True, kw_only=True)
class ToyConfig(MethodConfig):
    rank: float = 0.5
    steps: int = 10
    mode: str = "a"
    extra: dict | None = None


def test_from_dict_round_trip():
    config = ToyConfig.from_dict({"rank": 1, "targets": ["q_proj"], "extra": {"x": 1}})
    assert config.rank == 1.0 and isinstance(config.rank, float)
    assert config.targets == ("q_proj",)
    assert ToyConfig.from_dict(config.to_dict()) == config


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"stages\[0\] \(toy\): unknown key `rnak`.*did you mean `rank`"):
        ToyConfig.from_dict({"rnak": 0.3}, where="stages[0] (toy)")


@pytest.mark.parametrize("key,value,expected", [("rank", "half", "number"), ("steps", 1.5, "integer"),
                                                ("steps", True, "integer"), ("targets", "x", "list")])
def test_wrong_types_are_errors(key, value, expected):
    if key == "targets":
        value = 3
    with pytest.raises(ConfigError, match=expected):
        ToyConfig.from_dict({key: value})


def test_every_registered_config_round_trips():
    names = method_names()
    assert {"analyze"} <= set(names)
    for name in names:
        cls = get_method(name).config_cls
        config = cls()
        assert cls.from_dict(config.to_dict()) == config, name


def test_unknown_method_did_you_mean():
    with pytest.raises(ConfigError, match="unknown method `analyse`.*did you mean `analyze`"):
        get_method("analyse")


# -- renamed keys: the old name is a one-line error naming the new one ---------------------------


@pytest.mark.parametrize("method,old,new", [("lora", "rank", "r"), ("nola", "rank", "r"), ("dsee", "rank", "r"),
                                            ("kappatune", "lora_rank", "lora_r"), ("mezo", "lora_rank", "lora_r"),
                                            ("dsformer", "rank", "keep_bytes")])
def test_renamed_keys_name_their_new_spelling(method, old, new):
    config_cls = get_method(method).config_cls
    assert new in config_cls.field_names() and old not in config_cls.field_names()
    with pytest.raises(ConfigError) as err:
        config_cls.from_dict({old: 8})
    assert str(err.value).startswith(f"{method}: `{old}` was renamed `{new}` (")
    with pytest.raises(ConfigError, match=rf"^stages\[1\] \({method}\): `{old}` was renamed `{new}`"):
        config_cls.from_dict({old: 8}, where=f"stages[1] ({method})")


def test_rank_stays_a_keep_ratio_where_it_is_one():
    for name in ("svd", "asvd", "svd-llm", "saes-svd", "welore", "maestro"):
        assert "rank" in get_method(name).config_cls.field_names(), name
    for name in method_names():
        fields = get_method(name).config_cls.field_names()
        assert "rank" not in fields or name in ("svd", "asvd", "svd-llm", "saes-svd", "welore", "maestro"), name


# -- the calibration fields: declared once, per-method defaults stated once ----------------------


def test_calibration_defaults_are_the_methods_own():
    expected = {  # what each method declared before the mixin (no behaviour change)
        "asvd": ("default", 128, 256, 8), "svd-llm": ("default", 128, 256, 8), "saes-svd": ("default", 128, 256, 8),
        "prune": ("default", 64, 256, 8), "dsformer": ("default", 64, 256, 8), "maestro": (None, 32, 256, 4),
    }
    for name, values in expected.items():
        config_cls = get_method(name).config_cls
        assert issubclass(config_cls, CalibrationConfig), name
        config = config_cls()
        assert tuple(getattr(config, f) for f in CALIBRATION_FIELDS) == values, name


def test_calibration_fields_are_declared_only_in_the_mixin():
    """No calibrated config's class body (read from its source) redeclares a calibration field."""
    calibrated = [n for n in method_names() if issubclass(get_method(n).config_cls, CalibrationConfig)]
    assert {"svd-llm", "prune", "dsformer", "maestro"} <= set(calibrated)
    for name in calibrated:
        for klass in get_method(name).config_cls.__mro__:
            if not issubclass(klass, CalibrationConfig) or klass is CalibrationConfig:
                continue
            (node,) = ast.parse(textwrap.dedent(inspect.getsource(klass))).body
            redeclared = [item.target.id for item in node.body if isinstance(item, ast.AnnAssign)
                          and getattr(item.target, "id", None) in CALIBRATION_FIELDS]
            assert not redeclared, (
                f"{klass.__module__}.{node.name} redeclares {redeclared}: state its default as a class keyword, "
                f"`class {node.name}(CalibrationConfig, num_windows=...)`")


def test_calibration_validation_and_unknown_keywords():
    with pytest.raises(ConfigError, match="prune: `num_windows` must be a positive integer, got 0"):
        get_method("prune").config_cls(num_windows=0)
    with pytest.raises(ConfigError, match="svd-llm: `calibration` must name a text source"):
        get_method("svd-llm").config_cls.from_dict({"calibration": None})
    assert get_method("maestro").config_cls(calibration=None).calibration is None  # = its training data
    with pytest.raises(TypeError, match="not calibration fields"):
        type("Bad", (CalibrationConfig,), {}, num_window=3)


# -- the recipe's top level: a typed RunConfig -----------------------------------------------------


def test_run_config_defaults_and_round_trip():
    config = RunConfig.from_dict({"stages": [{"method": "svd"}], "evaluate": {"num_windows": 8},
                                  "gates": {"max_ppl": 40}})
    assert config.evaluate == EvaluateConfig(num_windows=8) and config.evaluate.seq_len == 256
    assert config.gates.active() == {"max_ppl": 40.0} and config.seed == 0 and config.dtype == "auto"
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig.from_dict({"stages": [{}], "evaluate": False}).evaluate is None
    assert RunConfig.from_dict({"stages": [{}], "evaluate": True}).evaluate == EvaluateConfig()
    resolved = config.to_recipe([{"method": "svd"}])
    assert "out" not in resolved and "overwrite" not in resolved and list(resolved)[-1] == "stages"


@pytest.mark.parametrize("recipe,message", [
    ({"stages": [{}], "sede": 1}, "recipe: unknown top-level key `sede`; did you mean `seed`?"),
    ({"stages": [{}], "evaluate": {"num_window": 3}}, "unknown key `num_window`; did you mean `num_windows`?"),
    ({"stages": [{}], "evaluate": {"seq_len": 0}}, "`evaluate.seq_len` must be an integer >= 1"),
    ({"stages": [{}], "evaluate": "yes"}, "`evaluate` must be a mapping"),
    ({"stages": [{}], "gates": {"max_pp": 3}}, "unknown gate `max_pp`; did you mean `max_ppl`?"),
    ({"stages": [{}], "gates": {"max_ppl": "low"}}, "`max_ppl` must be a number"),
    ({"stages": [{}], "seed": True}, "`seed` must be an integer"),
    ({"stages": []}, "`stages` must be a non-empty list"),
    ({"stages": [{}], "dtype": "float8"}, "float8"),
])
def test_run_config_rejects_bad_top_levels(recipe, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(recipe)
    assert message in str(err.value) and str(err.value).startswith("recipe: ")
