from dataclasses import dataclass

import pytest

from compressor.config import MethodConfig
from compressor.errors import ConfigError
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
