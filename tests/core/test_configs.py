"""Configs: frozen, keyword-only, validated with ConfigError, JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

import inc_core as inc
from inc_core.errors import ConfigError, IncError

ALL_CONFIGS = [
    inc.QuantConfig(
        approach="dynamic",
        calibration="kl",
        granularity="per_tensor",
        scheme="sym",
        activation_dtype="int8",
        calib_samples=7,
        exclude=inc.LayerFilter(names=("fc1",), patterns=(r"layer\d+\.conv",), types=("MatMul",)),
        overrides={"Conv": {"calibration": "percentile"}, "fc2": {"scheme": "sym"}},
        format="qdq",
    ),
    inc.QATConfig(freeze_observer_step=10, freeze_bn_step=5, exclude=inc.LayerFilter(names=("head",))),
    inc.TuningConfig(
        base=inc.QuantConfig(calibration="mse"),
        strategy="mse",
        tolerable_loss=0.02,
        loss_type="absolute",
        higher_is_better=False,
        max_trials=9,
        timeout_s=30.0,
        history="tune.json",
        seed=3,
        keep_searching=True,
        search_space={"calibration": ("minmax", "kl")},
    ),
    inc.PruneConfig(target_sparsity=0.5, pattern="2:4", criterion="snip_momentum", ramp="cosine", end_step=50, frequency=5),
    inc.DistillConfig(temperature=4.0, loss_weights=(0.3, 0.5, 0.2), layer_mappings=(("s.l1", "t.l3"),)),
    inc.DistillConfig(loss_weights=(1, 1, 1), layer_mappings=(("s.l1", "t.l3"),), layer_projection="linear"),
    inc.LayerFilter(names=("a", "b"), validate=False),
]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: type(c).__name__)
def test_json_round_trip_restores_an_equal_config(config):
    text = config.to_json()
    data = json.loads(text)
    assert data["type"] == type(config).__name__ and data["version"] == 1
    again = type(config).from_json(text)
    assert again == config
    assert again.to_json() == text


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: type(c).__name__)
def test_configs_are_frozen(config):
    field = dataclasses.fields(config)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, field, None)


def test_configs_are_keyword_only():
    with pytest.raises(TypeError):
        inc.QuantConfig("static")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: inc.QuantConfig(approach="weird"), r"approach='weird'.*'static', 'dynamic'"),
        (lambda: inc.QuantConfig(calibration="entropy"), r"choose one of 'minmax', 'kl', 'percentile', 'mse'"),
        (lambda: inc.QuantConfig(calib_samples=0), r"calib_samples must be >= 1"),
        (lambda: inc.QuantConfig(percentile=20), r"percentile must be in \(50, 100\]"),
        (lambda: inc.QuantConfig(exclude=["fc1"]), r"exclude must be an inc.LayerFilter"),
        (lambda: inc.QuantConfig(overrides={"Conv": {"dtype": "int8"}}), r"may set calibration"),
        (lambda: inc.QuantConfig(overrides={"Conv": {"calibration": "nope"}}), r"overrides\['Conv'\]"),
        (lambda: inc.TuningConfig(strategy="greedy"), r"'basic', 'mse', 'bayesian'"),
        (lambda: inc.TuningConfig(tolerable_loss=-0.1), r"tolerable_loss must be >= 0"),
        (lambda: inc.TuningConfig(max_trials=0), r"max_trials must be >= 1"),
        (lambda: inc.TuningConfig(timeout_s=0), r"timeout_s must be > 0"),
        (lambda: inc.TuningConfig(search_space={"calibration": ("kl", "bogus")}), r"search_space"),
        (lambda: inc.TuningConfig(search_space={"bits": ("4",)}), r"not a tunable setting"),
        (lambda: inc.PruneConfig(pattern="3of4"), r"'2:4'"),
        (lambda: inc.PruneConfig(pattern="4:2"), r"0 < N < M"),
        (lambda: inc.PruneConfig(target_sparsity=1.0), r"target_sparsity must be < 1"),
        (lambda: inc.PruneConfig(start_step=10, end_step=5), r"end_step \(5\) must be after start_step \(10\)"),
        (lambda: inc.PruneConfig(criterion="random"), r"'magnitude', 'snip'"),
        (lambda: inc.DistillConfig(temperature=0), r"temperature must be > 0"),
        (lambda: inc.DistillConfig(loss_weights=(0, 0)), r"all zero"),
        (lambda: inc.DistillConfig(layer_mappings=(("a",),), loss_weights=(1, 1, 1)), r"pair"),
        (lambda: inc.DistillConfig(layer_projection="conv"), r"layer_projection='conv' is not supported; choose one of 'none', 'linear'"),
        (lambda: inc.DistillConfig(layer_projection="linear"), r"layer_mappings is empty"),
        (lambda: inc.LayerFilter(patterns=("fc[",)), r"not a valid regular expression"),
        (lambda: inc.QATConfig(freeze_bn_step=-1), r"freeze_bn_step must be >= 0"),
    ],
)
def test_bad_values_raise_config_error_with_the_choices(factory, message):
    with pytest.raises(ConfigError, match=message) as info:
        factory()
    assert isinstance(info.value, (IncError, ValueError))


def test_from_dict_rejects_unknown_fields_wrong_type_and_newer_versions():
    data = inc.QuantConfig().to_dict()
    with pytest.raises(ConfigError, match="no field"):
        inc.QuantConfig.from_dict({**data, "bits": 4})
    with pytest.raises(ConfigError, match="TuningConfig.from_dict"):
        inc.QuantConfig.from_dict({**data, "type": "TuningConfig"})
    with pytest.raises(ConfigError, match="version 99"):
        inc.QuantConfig.from_dict({**data, "version": 99})
    with pytest.raises(ConfigError, match="not valid JSON"):
        inc.QuantConfig.from_json("{oops")


def test_effective_setting_prefers_name_over_type_over_global():
    config = inc.QuantConfig(
        calibration="minmax",
        overrides={"MatMul": {"calibration": "kl"}, "mm_3": {"calibration": "percentile"}},
    )
    assert config.setting("mm_3", "MatMul", "calibration") == "percentile"
    assert config.setting("mm_1", "MatMul", "calibration") == "kl"
    assert config.setting("conv", "Conv", "calibration") == "minmax"
    assert config.calibrations_used() == {"minmax", "kl", "percentile"}


class _Op:
    def __init__(self, name, op_type):
        self.name, self.op_type = name, op_type


OPS = [_Op("conv1", "Conv"), _Op("layer1.conv", "Conv"), _Op("fc", "Gemm")]


def test_layer_filter_selects_by_name_pattern_and_type():
    assert inc.LayerFilter(names=("fc",)).select(OPS) == ["fc"]
    assert inc.LayerFilter(patterns=(r"layer\d\.conv",)).select(OPS) == ["layer1.conv"]
    assert inc.LayerFilter(types=("Conv",)).select(OPS) == ["conv1", "layer1.conv"]
    assert not inc.LayerFilter()


def test_layer_filter_validate_rejects_names_matching_nothing_with_close_matches():
    with pytest.raises(ConfigError, match=r"\['conv2'\].*conv1"):
        inc.LayerFilter(names=("conv2",)).select(OPS)
    with pytest.raises(ConfigError, match="match no op name"):
        inc.LayerFilter(patterns=("block.*",)).select(OPS)
    with pytest.raises(ConfigError, match="model's op types are"):
        inc.LayerFilter(types=("LSTM",)).select(OPS)
    assert inc.LayerFilter(names=("conv2",), validate=False).select(OPS) == []


def test_layer_filter_union_keeps_both_without_duplicates():
    merged = inc.LayerFilter(names=("a",)).union(inc.LayerFilter(names=("a", "b"), types=("Conv",)))
    assert merged.names == ("a", "b") and merged.types == ("Conv",)
