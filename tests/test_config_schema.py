"""The YAML -> dataclass layer: unknown keys, wrong types and overrides are errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from dmlgen.engine.config import config_from_dict
from dmlgen.engine.config_schema import apply_overrides, from_dict, load_yaml, parse_override, to_dict
from dmlgen.errors import ConfigError


@dataclass
class Inner:
    size: int = 3
    names: list[str] = field(default_factory=list)
    scale: tuple[float, float] | None = None


@dataclass
class Outer:
    kind: Literal["a", "b"] = "a"
    rate: float = 0.1
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    params: dict[str, Any] = field(default_factory=dict)
    either: int | list[str] = 2

    def validate(self) -> None:
        if self.rate < 0:
            raise ConfigError("rate: must be >= 0")


def test_round_trip_and_conversion() -> None:
    cfg = from_dict(Outer, {"kind": "b", "rate": 1, "inner": {"size": 5, "scale": [0.5, 1.0]}, "either": ["x"]})
    assert cfg.kind == "b" and cfg.rate == 1.0 and isinstance(cfg.rate, float)
    assert cfg.inner.size == 5 and cfg.inner.scale == (0.5, 1.0)
    assert cfg.either == ["x"]
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"rat": 0.1}, "rat"),
        ({"inner": {"sise": 1}}, "inner.sise"),
        ({"kind": "c"}, "kind"),
        ({"rate": "fast"}, "rate"),
        ({"flag": 1}, "flag"),
        ({"inner": {"size": 2.5}}, "inner.size"),
        ({"inner": {"size": True}}, "inner.size"),
        ({"inner": {"names": [1]}}, "inner.names[0]"),
        ({"inner": {"scale": [1.0]}}, "inner.scale"),
        ({"inner": 3}, "inner"),
        ({"rate": -1.0}, "rate"),
    ],
)
def test_errors_name_the_key(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        from_dict(Outer, data)


def test_overrides_parse_yaml_values() -> None:
    assert parse_override("inner.size=7") == (["inner", "size"], 7)
    assert parse_override("inner.names=[a, b]") == (["inner", "names"], ["a", "b"])
    data = apply_overrides({"inner": {"size": 1}}, ["inner.size=9", "flag=true", "params.x=0.5"])
    cfg = from_dict(Outer, data)
    assert cfg.inner.size == 9 and cfg.flag is True and cfg.params == {"x": 0.5}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("nonsense")
    with pytest.raises(ConfigError, match="inner.sise"):
        from_dict(Outer, apply_overrides({}, ["inner.sise=2"]))
    with pytest.raises(ConfigError, match="rate is not a mapping"):
        apply_overrides({"rate": 0.1}, ["rate.x=1"])


def test_yaml_loader_refuses_code_and_names_the_file(tmp_path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("x: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="evil.yaml"):
        load_yaml(evil)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(listy)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_yaml(tmp_path / "missing.yaml")


def test_an_error_inside_an_optional_section_names_the_inner_key() -> None:
    # data.unlabeled is `UnlabeledConfig | None`: the message must name the bad key, not only the section.
    with pytest.raises(ConfigError, match=r"data\.unlabeled\.max_images: expected an integer"):
        config_from_dict({"data": {"unlabeled": {"source": "train_alphabets", "max_images": "many"}}})
