"""Config dataclasses: every number finite and every integer within 64 bits, whatever the field's shape,
checked by the Options base class; YAML that Python cannot hold is a one-line ConfigError."""

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from scoreaction.config import (
    Options,
    apply_overrides,
    check_nonnegative,
    check_positive,
    check_range,
    load_yaml,
    option,
    yaml_load,
)
from scoreaction.errors import ConfigError, ScoreactionError
from scoreaction.tasks import make_task
from scoreaction.train import TrainConfig

NON_FINITE = [math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("check", [check_positive, check_nonnegative, lambda n, v: check_range(n, v, 0, 1)])
def test_range_checks_refuse_non_finite_numbers(check, value):
    with pytest.raises(ConfigError, match=f"^lr must be finite, found {value!r}$"):
        check("lr", value)


def test_range_checks_keep_their_messages():
    with pytest.raises(ConfigError, match="lr must be a number > 0, found -1"):
        check_positive("lr", -1)
    with pytest.raises(ConfigError, match="lr must be a number >= 0, found 'x'"):
        check_nonnegative("lr", "x")
    with pytest.raises(ConfigError, match=r"p must be in \[0, 1\], found 2"):
        check_range("p", 2, 0, 1)
    check_positive("lr", 1e308)
    check_range("p", 1, 0, 1)


@dataclass
class Plain(Options):
    """No __post_init__ of its own: the base class checks it."""
    rate: float = option(1.0, help="a float")
    vector: float | list = option(0.0, help="a number or a list")
    steps: int = option(1, help="an int")
    nested: dict = option(factory=dict, help="a mapping")
    names: list = option(factory=list, help="a list of anything")
    pair: tuple = option((1.0, 2.0), help="a tuple")


@dataclass
class Own(Plain):
    """A __post_init__ that does not call the base class's: checked all the same, before it runs."""
    seen: list = field(default_factory=list)

    def __post_init__(self):
        self.seen.append(self.rate)


@pytest.mark.parametrize("cls", [Plain, Own])
@pytest.mark.parametrize("values, message", [
    ({"rate": math.nan}, "rate must be finite, found nan"),
    ({"rate": -math.inf}, "rate must be finite, found -inf"),
    ({"vector": [0.0, math.inf]}, r"vector\[1\] must be finite, found inf"),
    ({"vector": [[1.0, 0.0], [0.0, math.nan]]}, r"vector\[1\]\[1\] must be finite, found nan"),
    ({"vector": np.array([1.0, np.nan])}, r"vector\[1\] must be finite, found nan"),
    ({"vector": np.float32("inf")}, "vector must be finite, found inf"),
    ({"vector": [1, "1e308"]}, r"vector\[1\] must be a number, found '1e308'"),
    ({"vector": "abc"}, "vector must be a number, found 'abc'"),
    ({"rate": "1e308"}, "rate must be a number, found '1e308'"),
    ({"steps": 2**63}, "steps must fit in 64 bits, found an integer of 64 bits"),
    ({"steps": -(10**30)}, "steps must fit in 64 bits, found an integer of 100 bits"),
    ({"nested": {"a": {"b": [1.0, math.nan]}}}, r"nested.a.b\[1\] must be finite, found nan"),
    ({"names": ["x", math.inf]}, r"names\[1\] must be finite, found inf"),
    ({"pair": (1.0, math.nan)}, r"pair\[1\] must be finite, found nan"),
])
def test_every_number_of_every_field_is_checked(cls, values, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        cls.from_dict(values)
    with pytest.raises(ConfigError, match=message):
        cls(**values)


def test_checked_before_the_class_own_checks_and_text_where_text_is_allowed():
    own = Own(rate=2.0, names=["a", "b"], nested={"path": "x"})
    assert own.seen == [2.0]
    with pytest.raises(ConfigError):
        Own(rate=math.nan)


def test_from_dict_refuses_a_non_mapping_and_unknown_keys_first():
    with pytest.raises(ConfigError, match="options for x must be a mapping, found list"):
        Plain.from_dict([1, 2], "for x")
    with pytest.raises(ConfigError, match="unknown option 'nope'"):
        Plain.from_dict({"nope": 1, "rate": math.nan})


@pytest.mark.parametrize("overrides, message", [
    (["algo.lr=.inf"], "lr must be finite, found inf"),
    (["task.beta_kl=.inf"], "beta_kl must be finite, found inf"),
    (["task.mean=[.nan,0]"], r"mean\[0\] must be finite, found nan"),
    (["action_noise=.inf"], "action_noise must be finite, found inf"),
    (["task.reward_matrix=[['1e308',0],[0,1]]"], r"reward_matrix\[0\]\[0\] must be a number, found '1e308'"),
    (["task.reward_matrix=[[1e400,0],[0,1]]"], r"reward_matrix\[0\]\[0\] must be finite, found inf"),
    (["task.path_options.beta_max=.nan"], "path_options.beta_max must be finite, found nan"),
    (["seed=100000000000000000000"], "seed must fit in 64 bits"),
    (["task.dimm=2", "algo.lr=.inf"], "unknown option 'dimm'"),  # unknown keys come before values
])
def test_train_config_refuses_non_finite_options(overrides, message):
    config = apply_overrides({"task": {"name": "gaussian"}}, overrides)
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(config, "for training")


def test_task_configs_of_lists_are_checked():
    with pytest.raises(ConfigError, match=r"means\[1\]\[0\] must be finite, found nan"):
        make_task("mixture", {"means": [[0.0, 0.0], [math.nan, 1.0]]})
    with pytest.raises(ConfigError, match=r"weights\[0\] must be finite"):
        make_task("mixture", {"weights": [math.inf, 1.0, 1.0]})


@pytest.mark.parametrize("text, message", [
    ("9" * 5000, "cannot be read"),
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
])
def test_yaml_python_cannot_hold_is_a_config_error(text, message):
    with pytest.raises(ConfigError, match=message):
        yaml_load(text)
    with pytest.raises(ConfigError, match=f"override x=...: YAML value .*{message}"):
        apply_overrides({}, [f"x={text}"])


def test_yaml_reads_non_finite_numbers_as_floats():
    assert yaml_load("1e-3") == 0.001 and yaml_load(".inf") == math.inf and math.isnan(yaml_load(".nan"))
    assert yaml_load("1e400") == math.inf  # then refused by the checks above


@pytest.mark.parametrize("content, message", [
    (b"a: [", "is not valid YAML"), (b"- 1\n", "must hold a mapping, found list"),
    (b"\xff\xfe\x00", "is not text"), (b"a: " + b"9" * 5000, "cannot be read"),
])
def test_config_files_name_themselves(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as err:
        load_yaml(path)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match="is not a file"):
        load_yaml(tmp_path)


def test_config_errors_are_the_library_family():
    assert issubclass(ConfigError, ScoreactionError) and issubclass(ScoreactionError, ValueError)
