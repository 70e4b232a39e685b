"""Sparsity math: patterns and masks, criteria, schedules and the numpy pruning loop."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import inc_core as inc
from inc_core import PruneConfig
from inc_core.errors import ConfigError
from inc_core.sparsity import (
    Block,
    Channel,
    MagnitudeCriterion,
    NOfM,
    PatternLockCriterion,
    Pruner,
    Schedule,
    SnipCriterion,
    SnipMomentumCriterion,
    Unstructured,
    as_matrix,
    check_shape,
    compute_mask,
    compute_masks,
    from_matrix,
    make_criterion,
    parse_pattern,
    should_update,
    sparsity_at,
    sparsity_of,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --- patterns ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unstructured", Unstructured()),
        ("channel", Channel(norm="l2")),
        ("4x1", Block(rows=4, cols=1)),
        ("1x16", Block(rows=1, cols=16)),
        ("2:4", NOfM(n=2, m=4)),
        ("1:8", NOfM(n=1, m=8)),
    ],
)
def test_parse_pattern_round_trips_config_strings(text: str, expected: object) -> None:
    parsed = parse_pattern(text)
    assert parsed == expected
    assert str(parsed) == text
    assert parse_pattern(parsed) is parsed
    # Every string PruneConfig accepts parses here too.
    assert PruneConfig(pattern=text).pattern == text


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("dense", r"'dense' is not supported; use 'unstructured', 'channel'"),
        ("2:2", r"'2:2' is invalid: NOfM: needs n < m"),
        ("0x4", r"'0x4' is invalid: Block: rows must be >= 1"),
        ("4 x 1", r"is not supported"),
    ],
)
def test_parse_pattern_rejects_bad_strings(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_pattern(text)


def test_parse_pattern_rejects_non_strings() -> None:
    with pytest.raises(ConfigError, match=r"Sparsity pattern 24 is not supported"):
        parse_pattern(24)  # type: ignore[arg-type]


def test_pattern_value_types_validate() -> None:
    with pytest.raises(ConfigError, match=r"NOfM: needs n < m .* got n=4, m=4"):
        NOfM(n=4, m=4)
    with pytest.raises(ConfigError, match=r"Block: cols must be an int"):
        Block(rows=4, cols=1.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"Channel: norm='l3' is not supported; choose one of 'l2', 'l1'"):
        Channel(norm="l3")
    assert NOfM(n=2, m=4).implied_sparsity == 0.5
    assert NOfM(n=1, m=4).implied_sparsity == 0.75


def test_as_matrix_puts_input_channels_innermost(rng: np.random.Generator) -> None:
    weight = rng.normal(size=(5, 4, 3, 2))  # (out, in, kh, kw)
    matrix = as_matrix(weight)
    assert matrix.shape == (5, 3 * 2 * 4)
    for o, i, y, x in [(0, 0, 0, 0), (4, 3, 2, 1), (2, 1, 0, 1), (3, 2, 1, 0)]:
        assert matrix[o, (y * 2 + x) * 4 + i] == weight[o, i, y, x]
    np.testing.assert_array_equal(from_matrix(matrix, weight.shape), weight)
    dense = rng.normal(size=(3, 7))
    assert as_matrix(dense) is dense
    with pytest.raises(ConfigError, match=r"rank >= 2 .* got shape \(7,\)"):
        as_matrix(np.ones(7))


@pytest.mark.parametrize(
    ("pattern", "shape", "match"),
    [
        ("2:4", (8, 6), r"'2:4' needs the input dimension of a weight of shape \(8, 6\) .* multiple of 4, got 6"),
        ("2:4", (8, 3, 3, 3), r"2-D view \(8, 27\).* multiple of 4, got 27"),
        ("4x1", (6, 8), r"Block pattern '4x1' does not tile .* 4 must divide 6 and 1 must divide 8"),
        ("1x3", (4, 8), r"3 must divide 8"),
        ("channel", (10,), r"Pattern 'channel' needs a weight of rank >= 2 .* got shape \(10,\)"),
    ],
)
def test_check_shape_rejects_patterns_that_do_not_fit(pattern: str, shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_shape(pattern, shape)
    with pytest.raises(ConfigError, match=match):
        compute_mask(np.ones(shape), pattern, 0.5)


def test_check_shape_accepts_fitting_shapes() -> None:
    assert check_shape("2:4", (16, 8, 3, 3)) == NOfM(n=2, m=4)
    assert check_shape("4x1", (8, 3)) == Block(rows=4, cols=1)
    assert check_shape("unstructured", (7,)) == Unstructured()


# --- masks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.77, 0.95, 1.0])
def test_unstructured_prunes_exact_count_of_lowest_magnitudes(rng: np.random.Generator, sparsity: float) -> None:
    scores = rng.normal(size=(16, 9, 3))
    mask = compute_mask(scores, "unstructured", sparsity)
    assert mask.dtype == bool and mask.shape == scores.shape
    pruned = round(sparsity * scores.size)
    assert int((~mask).sum()) == pruned
    if 0 < pruned < scores.size:
        assert np.abs(scores[~mask]).max() < np.abs(scores[mask]).min()
    # Same set as a hand sort of |scores|.
    expected = np.ones(scores.size, dtype=bool)
    expected[np.argsort(np.abs(scores).ravel(), kind="stable")[:pruned]] = False
    np.testing.assert_array_equal(mask.ravel(), expected)


def test_unstructured_uses_magnitude_and_breaks_ties_by_position() -> None:
    mask = compute_mask(np.array([-5.0, 1.0, 2.0, -0.5]), Unstructured(), 0.5)
    np.testing.assert_array_equal(mask, [True, False, True, False])
    ties = compute_mask(np.ones(6), "unstructured", 0.5)
    np.testing.assert_array_equal(ties, [False, False, False, True, True, True])


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.9])
def test_ties_follow_a_stable_sort_of_the_scores(rng: np.random.Generator, sparsity: float) -> None:
    scores = rng.integers(-3, 4, size=(12, 20))  # many equal magnitudes around every threshold
    expected = np.ones(scores.size, dtype=bool)
    expected[np.argsort(np.abs(scores).ravel(), kind="stable")[: round(sparsity * scores.size)]] = False
    np.testing.assert_array_equal(compute_mask(scores, "unstructured", sparsity).ravel(), expected)
    rows = np.ones(12, dtype=bool)
    rows[np.argsort(np.abs(scores).sum(axis=1), kind="stable")[: round(sparsity * 12)]] = False
    np.testing.assert_array_equal(compute_mask(scores, Channel(norm="l1"), sparsity)[:, 0], rows)


def test_integer_scores_do_not_wrap() -> None:
    mask = compute_mask(np.array([-128, 1, 127, 2], dtype=np.int8), "unstructured", 0.5)
    np.testing.assert_array_equal(mask, [True, False, True, False])


def test_block_mask_is_constant_per_block_and_prunes_lowest_blocks(rng: np.random.Generator) -> None:
    scores = rng.normal(size=(16, 12))
    mask = compute_mask(scores, "4x1", 0.3)
    blocks = mask.reshape(4, 4, 12, 1)  # (block row, row in block, block col, col in block)
    assert (blocks == blocks[:, :1, :, :1]).all()
    block_keep = blocks[:, 0, :, 0]
    assert int((~block_keep).sum()) == round(0.3 * 48) == 14
    assert sparsity_of(mask) == 14 / 48
    sums = {(br, bc): np.abs(scores[4 * br : 4 * br + 4, bc]).sum() for br in range(4) for bc in range(12)}
    lowest = sorted(sums, key=lambda key: sums[key])[:14]
    assert {key for key in sums if not block_keep[key]} == set(lowest)


def test_block_on_conv_uses_the_2d_view(rng: np.random.Generator) -> None:
    weight = rng.normal(size=(8, 4, 3, 3))
    mask = compute_mask(weight, Block(rows=2, cols=4), 0.5)
    view = as_matrix(mask).reshape(4, 2, 9, 4)
    assert (view == view[:, :1, :, :1]).all()
    assert int((~view[:, 0, :, 0]).sum()) == 18
    np.testing.assert_array_equal(as_matrix(mask), compute_mask(as_matrix(weight), "2x4", 0.5))


def _check_n_of_m(groups_w: np.ndarray, groups_mask: np.ndarray, n: int) -> None:
    assert (groups_mask.sum(axis=-1) == n).all()
    kept = np.where(groups_mask, np.abs(groups_w), np.inf).min(axis=-1)
    dropped = np.where(groups_mask, -np.inf, np.abs(groups_w)).max(axis=-1)
    assert (dropped <= kept).all()


def test_2_of_4_keeps_the_two_largest_of_every_four_inputs(rng: np.random.Generator) -> None:
    weight = rng.normal(size=(8, 16))
    mask = compute_mask(weight, "2:4", 0.5)
    _check_n_of_m(weight.reshape(8, 4, 4), mask.reshape(8, 4, 4), 2)
    assert sparsity_of(mask) == 0.5
    assert compute_mask(np.array([[0.1, -0.9, 0.3, 0.05]]), "2:4", 0.5).tolist() == [[False, True, True, False]]


def test_n_of_m_on_conv_groups_input_channels_at_each_kernel_position(rng: np.random.Generator) -> None:
    weight = rng.normal(size=(4, 8, 3, 3))  # (out, in, kh, kw)
    mask = compute_mask(weight, "1:4", 0.75)
    # groups: 4 consecutive input channels at one (out, kh, kw)
    w_groups = np.moveaxis(weight, 1, -1).reshape(4, 3, 3, 2, 4)
    m_groups = np.moveaxis(mask, 1, -1).reshape(4, 3, 3, 2, 4)
    _check_n_of_m(w_groups, m_groups, 1)
    assert sparsity_of(mask) == 0.75


def test_n_of_m_below_implied_sparsity_makes_the_cheapest_groups_n_of_m() -> None:
    weight = np.array(
        [
            [1.0, 2.0, 3.0, 4.0, 0.1, 0.2, 5.0, 6.0],  # costs 3 and 0.3
            [9.0, 9.0, 0.0, 0.5, 7.0, 1.0, 7.0, 2.0],  # costs 0.5 and 3
        ]
    )
    mask = compute_mask(weight, "2:4", 0.25)  # half of the 4 groups
    expected = np.ones_like(weight, dtype=bool)
    expected[0, [4, 5]] = False
    expected[1, [2, 3]] = False
    np.testing.assert_array_equal(mask, expected)
    assert (compute_mask(weight, "2:4", 0.0)).all()
    assert sparsity_of(compute_mask(weight, "2:4", 0.5)) == 0.5


def test_n_of_m_rejects_sparsity_above_the_implied_one() -> None:
    with pytest.raises(ConfigError, match=r"pattern '2:4' keeps 2 of every 4 .* cannot exceed 0.5; got 0.7"):
        compute_mask(np.ones((4, 8)), "2:4", 0.7)


def test_channel_prunes_whole_rows_with_lowest_norm(rng: np.random.Generator) -> None:
    scale = np.array([3.0, 0.1, 2.0, 0.5, 1.0, 0.2])[:, None]
    weight = rng.normal(size=(6, 10)) * scale
    mask = compute_mask(weight, "channel", 0.5)
    norms = np.linalg.norm(weight, axis=1)
    pruned_rows = set(np.argsort(norms)[:3].tolist())
    for row in range(6):
        assert mask[row].all() != (row in pruned_rows)
        assert (~mask[row]).all() == (row in pruned_rows)


def test_channel_norm_choice_changes_the_ranking() -> None:
    weight = np.array([[3.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # L2: 3 vs 2; L1: 3 vs 4
    l2 = compute_mask(weight, Channel(), 0.5)
    l1 = compute_mask(weight, Channel(norm="l1"), 0.5)
    np.testing.assert_array_equal(l2[:, 0], [True, False])
    np.testing.assert_array_equal(l1[:, 0], [False, True])


def test_channel_on_conv_prunes_whole_filters(rng: np.random.Generator) -> None:
    weight = rng.normal(size=(4, 3, 3, 3))
    weight[2] *= 0.01
    mask = compute_mask(weight, "channel", 0.25)
    assert not mask[2].any()
    assert mask[[0, 1, 3]].all()


def test_compute_mask_validates_inputs() -> None:
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\] .* got 1.5"):
        compute_mask(np.ones(4), "unstructured", 1.5)
    with pytest.raises(ConfigError, match=r"sparsity must be a number in \[0, 1\], got '0.5'"):
        compute_mask(np.ones(4), "unstructured", "0.5")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"scores of shape \(3,\) hold NaN"):
        compute_mask(np.array([1.0, np.nan, 2.0]), "unstructured", 0.5)
    with pytest.raises(ConfigError, match=r"scores must be real numbers, got an array of dtype <U1"):
        compute_mask(np.array(["a", "b"]), "unstructured", 0.5)


def test_compute_masks_names_the_failing_layer(rng: np.random.Generator) -> None:
    masks = compute_masks({"fc1": rng.normal(size=(4, 8)), "fc2": rng.normal(size=(2, 4))}, "2:4", 0.5)
    assert sorted(masks) == ["fc1", "fc2"]
    assert all(sparsity_of(m) == 0.5 for m in masks.values())
    with pytest.raises(ConfigError, match=r"Layer 'head': N:M pattern '2:4' .* got 6"):
        compute_masks({"fc1": np.ones((4, 8)), "head": np.ones((3, 6))}, "2:4", 0.5)


def test_sparsity_of_counts_zeros() -> None:
    assert sparsity_of(np.array([0.0, 1.0, 0.0, -2.0])) == 0.5
    assert sparsity_of(np.array([[True, False, False, False]])) == 0.75
    assert sparsity_of(np.zeros((0, 3))) == 0.0


# --- criteria -------------------------------------------------------------------------------------


def test_magnitude_and_snip_scores() -> None:
    weight = np.array([[1.0, -2.0], [0.5, 0.0]])
    grad = np.array([[0.5, 0.25], [-4.0, 3.0]])
    magnitude = MagnitudeCriterion()
    magnitude.update(weight)
    np.testing.assert_array_equal(magnitude.scores(), np.abs(weight))
    snip = SnipCriterion()
    snip.update(weight, grad)
    np.testing.assert_array_equal(snip.scores(), [[0.5, 0.5], [2.0, 0.0]])
    np.testing.assert_array_equal(snip.mask("unstructured", 0.5), [[False, True], [True, False]])


def test_snip_needs_gradients() -> None:
    for criterion in (SnipCriterion(), SnipMomentumCriterion(0.5)):
        with pytest.raises(ConfigError, match=r"scores \|weight \* gradient\| and needs gradients, got grad=None"):
            criterion.update(np.ones(3))
        with pytest.raises(ValueError, match=r"gradient shape \(2,\) differs from weight shape \(3,\)"):
            criterion.update(np.ones(3), np.ones(2))


def test_scores_before_update_raise() -> None:
    with pytest.raises(ConfigError, match=r"'snip' has no scores yet: call update\(weight, grad\) with gradients"):
        SnipCriterion().scores()
    with pytest.raises(ConfigError, match=r"'pattern_lock' has no scores yet"):
        PatternLockCriterion().mask("unstructured", 0.5)


def test_snip_momentum_matches_hand_computed_running_average() -> None:
    criterion = SnipMomentumCriterion(momentum=0.8)
    criterion.update(np.array([1.0, -2.0]), np.array([0.5, 0.25]))  # |w*g| = [0.5, 0.5]
    np.testing.assert_allclose(criterion.scores(), [0.2 * 0.5, 0.2 * 0.5], rtol=0, atol=1e-15)
    criterion.update(np.array([2.0, 1.0]), np.array([1.0, -3.0]))  # |w*g| = [2, 3]
    np.testing.assert_allclose(criterion.scores(), [0.8 * 0.1 + 0.2 * 2.0, 0.8 * 0.1 + 0.2 * 3.0], atol=1e-15)
    np.testing.assert_allclose(criterion.scores(), [0.48, 0.68], atol=1e-15)
    criterion.update(np.array([0.0, 1.0]), np.array([5.0, 1.0]))  # |w*g| = [0, 1]
    np.testing.assert_allclose(criterion.scores(), [0.8 * 0.48, 0.8 * 0.68 + 0.2], atol=1e-15)
    with pytest.raises(ConfigError, match=r"weight shape \(3,\) differs from the shape \(2,\)"):
        criterion.update(np.ones(3), np.ones(3))
    with pytest.raises(ConfigError, match=r"SnipMomentumCriterion: momentum must be < 1.0, got 1.0"):
        SnipMomentumCriterion(1.0)


def test_pattern_lock_keeps_the_existing_zero_pattern(rng: np.random.Generator) -> None:
    weight = rng.normal(size=(6, 8))
    weight[rng.random(size=weight.shape) < 0.4] = 0.0
    criterion = PatternLockCriterion()
    criterion.update(weight)
    expected = weight != 0
    np.testing.assert_array_equal(criterion.mask("unstructured", 0.9), expected)
    # Training refills the zeros; the lock does not move.
    criterion.update(rng.normal(size=weight.shape) + 10.0)
    np.testing.assert_array_equal(criterion.mask("2:4", 0.5), expected)


def test_make_criterion_follows_the_config() -> None:
    assert isinstance(make_criterion(PruneConfig(criterion="magnitude")), MagnitudeCriterion)
    assert isinstance(make_criterion(PruneConfig(criterion="snip")), SnipCriterion)
    assert isinstance(make_criterion(PruneConfig(criterion="pattern_lock")), PatternLockCriterion)
    momentum = make_criterion(PruneConfig(criterion="snip_momentum", momentum=0.75))
    assert isinstance(momentum, SnipMomentumCriterion) and momentum.momentum == 0.75
    a, b = make_criterion(PruneConfig()), make_criterion(PruneConfig())
    assert a is not b
    with pytest.raises(ConfigError, match=r"make_criterion: expected an inc.PruneConfig, got dict"):
        make_criterion({"criterion": "snip"})  # type: ignore[arg-type]


# --- schedules -----------------------------------------------------------------------------------

RAMP_MIDPOINTS = {  # p = 0.5, s_i = 0.1, s_f = 0.8
    "cubic": 0.8 + (0.1 - 0.8) * 0.5**3,
    "polynomial": 0.8 + (0.1 - 0.8) * 0.5**2,
    "linear": 0.1 + 0.7 * 0.5,
    "cosine": 0.1 + 0.7 * (1 - math.cos(math.pi / 2)) / 2,
    "exponential": 1 - 0.9 * (0.2 / 0.9) ** 0.5,
}


def _iterative(ramp: str, **kwargs: object) -> PruneConfig:
    values: dict[str, object] = dict(
        target_sparsity=0.8, initial_sparsity=0.1, start_step=10, end_step=110, frequency=10, ramp=ramp
    )
    values.update(kwargs)
    return PruneConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("ramp", sorted(RAMP_MIDPOINTS))
def test_iterative_ramps(ramp: str) -> None:
    config = _iterative(ramp)
    schedule = Schedule.from_config(config)
    values = [schedule.sparsity_at(step) for step in range(200)]
    assert values[:10] == [0.0] * 10
    assert values[10] == 0.1
    assert values[110] == 0.8 and values[199] == 0.8  # exactly the target from end_step on
    assert all(b >= a for a, b in zip(values, values[1:]))
    for step in range(10, 110):  # held between update steps
        assert values[step] == values[10 + (step - 10) // 10 * 10]
    assert values[60] == pytest.approx(RAMP_MIDPOINTS[ramp], rel=1e-12)
    assert all(0.1 <= v <= 0.8 for v in values[10:])
    assert sparsity_at(60, config) == values[60]
    updates = [step for step in range(200) if schedule.should_update(step)]
    assert updates == list(range(10, 111, 10))
    assert should_update(20, config) and not should_update(25, config)


def test_cubic_matches_zhu_gupta_at_every_update_step() -> None:
    config = _iterative("cubic", initial_sparsity=0.0, start_step=0, end_step=100, frequency=25)
    for step in (0, 25, 50, 75):
        assert sparsity_at(step, config) == pytest.approx(0.8 + (0.0 - 0.8) * (1 - step / 100) ** 3, rel=1e-12)
    assert sparsity_at(50, config) == pytest.approx(0.7, rel=1e-12)


def test_end_step_off_the_frequency_grid_is_still_an_update() -> None:
    schedule = Schedule(target_sparsity=0.5, ramp="linear", start_step=0, end_step=25, frequency=10)
    assert [s for s in range(40) if schedule.should_update(s)] == [0, 10, 20, 25]
    assert schedule.sparsity_at(24) == schedule.sparsity_at(20) == 0.4
    assert schedule.sparsity_at(25) == 0.5
    assert schedule.last_update_step == 25


def test_oneshot_schedule() -> None:
    config = PruneConfig(schedule="oneshot", target_sparsity=0.6, start_step=5, end_step=0)
    assert [sparsity_at(s, config) for s in (0, 4, 5, 6, 1000)] == [0.0, 0.0, 0.6, 0.6, 0.6]
    assert [s for s in range(20) if should_update(s, config)] == [5]
    assert Schedule.from_config(config).last_update_step == 5


def test_n_of_m_schedule_targets_the_implied_sparsity() -> None:
    config = PruneConfig(pattern="2:4", target_sparsity=0.7, start_step=0, end_step=100, frequency=10)
    assert Schedule.from_config(config).target_sparsity == 0.5
    assert sparsity_at(100, config) == 0.5
    with pytest.raises(ConfigError, match=r"initial_sparsity=0.6 exceeds the sparsity 0.5 that pattern '2:4' implies"):
        Schedule.from_config(PruneConfig(pattern="2:4", initial_sparsity=0.6))


def test_schedule_validation() -> None:
    with pytest.raises(ConfigError, match=r"end_step \(10\) must be after start_step \(10\)"):
        Schedule(target_sparsity=0.5, start_step=10, end_step=10)
    with pytest.raises(ConfigError, match=r"Schedule: initial_sparsity must be <= 0.5, got 0.6"):
        Schedule(target_sparsity=0.5, initial_sparsity=0.6)
    with pytest.raises(ConfigError, match=r"Schedule: ramp='step' is not supported; choose one of 'cubic'"):
        Schedule(target_sparsity=0.5, ramp="step")
    with pytest.raises(ConfigError, match=r"Schedule: step must be >= 0, got -1"):
        Schedule(target_sparsity=0.5).sparsity_at(-1)
    with pytest.raises(ConfigError, match=r"expected an inc.PruneConfig, got str"):
        Schedule.from_config("cubic")  # type: ignore[arg-type]


# --- pruning loop -------------------------------------------------------------------------------


def test_pruner_magnitude_iterative_reaches_target_with_nested_masks(rng: np.random.Generator) -> None:
    config = PruneConfig(target_sparsity=0.75, start_step=2, end_step=12, frequency=5, ramp="linear")
    weights = {"fc1": rng.normal(size=(8, 16)), "conv": rng.normal(size=(4, 2, 3, 3))}
    pruner = Pruner(config, {name: w.shape for name, w in weights.items()})
    seen: dict[int, dict[str, np.ndarray]] = {}
    for step in range(20):
        assert pruner.needs_data(step) == (step in (2, 7, 12))
        masks = pruner.step(step, weights)
        if masks is not None:
            seen[step] = masks
            for name, mask in masks.items():
                assert int((~mask).sum()) == round(sparsity_at(step, config) * mask.size)
                weights[name] = weights[name] * mask  # what a framework hook does
    assert sorted(seen) == [2, 7, 12]
    assert sparsity_of(seen[12]["fc1"]) == 0.75 and sparsity_of(seen[12]["conv"]) == 0.75
    for name in weights:  # magnitude pruning of masked weights only grows the pruned set
        assert (seen[7][name] <= seen[2][name]).all() and (seen[12][name] <= seen[7][name]).all()
    np.testing.assert_array_equal(pruner.masks["fc1"], seen[12]["fc1"])


def test_pruner_snip_momentum_reads_every_step_until_the_end(rng: np.random.Generator) -> None:
    config = PruneConfig(criterion="snip_momentum", schedule="oneshot", target_sparsity=0.5, start_step=3)
    weight = rng.normal(size=(4, 4))
    pruner = Pruner(config, {"w": weight.shape})
    assert [pruner.needs_data(s) for s in range(6)] == [True, True, True, True, False, False]
    with pytest.raises(ConfigError, match=r"Layer 'w': Pruning criterion 'snip_momentum' .* needs gradients"):
        pruner.step(0, {"w": weight})
    grads = [rng.normal(size=weight.shape) for _ in range(4)]
    expected = SnipMomentumCriterion(0.9)
    for step in range(4):
        expected.update(weight, grads[step])
        masks = pruner.step(step, {"w": weight}, {"w": grads[step]})
        assert (masks is None) == (step < 3)
    assert masks is not None
    np.testing.assert_array_equal(masks["w"], compute_mask(expected.scores(), "unstructured", 0.5))


def test_pruner_pattern_lock_returns_the_lock_once(rng: np.random.Generator) -> None:
    weight = rng.normal(size=(3, 6))  # 6 is not a multiple of 4: the lock ignores the pattern
    weight[:, ::2] = 0.0
    pruner = Pruner(PruneConfig(criterion="pattern_lock", pattern="2:4"), {"w": weight.shape})
    masks = pruner.step(0, {"w": weight})
    assert masks is not None
    np.testing.assert_array_equal(masks["w"], weight != 0)
    assert not pruner.needs_data(1)
    assert pruner.step(1, {"w": np.ones_like(weight)}) is None


def test_a_pattern_that_misfits_several_layers_names_them_all() -> None:
    # a stem conv reading 3 channels, a depthwise conv (one input channel) and a 10-way head: one error with
    # every layer and the exclusion that skips them, not one layer per attempt
    shapes = {"stem": (16, 3, 3, 3), "dw": (16, 1, 3, 3), "pw": (32, 16, 1, 1), "head": (10, 30)}
    with pytest.raises(ConfigError) as info:
        Pruner(PruneConfig(pattern="2:4"), shapes)
    message = str(info.value)
    assert message.startswith("Pattern '2:4' does not fit 3 of the 4 layers to prune. Layer 'stem': N:M pattern")
    assert "'stem' (16, 3, 3, 3), 'dw' (16, 1, 3, 3), 'head' (10, 30)" in message
    assert message.endswith("To leave them dense: PruneConfig(exclude=inc.LayerFilter(names=('stem', 'dw', 'head'))).")
    Pruner(PruneConfig(pattern="2:4"), {"pw": shapes["pw"]})  # what is left after that exclusion fits


def test_pruner_validates_layers() -> None:
    with pytest.raises(ConfigError, match=r"Layer 'head': N:M pattern '2:4' .* multiple of 4, got 10"):
        Pruner(PruneConfig(pattern="2:4"), {"fc": (8, 16), "head": (3, 10)})
    with pytest.raises(ConfigError, match=re.escape("To leave it dense: PruneConfig(exclude=inc.LayerFilter(names=('head',)))")):
        Pruner(PruneConfig(pattern="2:4"), {"fc": (8, 16), "head": (3, 10)})
    with pytest.raises(ConfigError, match=r"Pruner: no weights to prune"):
        Pruner(PruneConfig(), {})
    pruner = Pruner(PruneConfig(schedule="oneshot"), {"fc": (2, 2)})
    with pytest.raises(ConfigError, match=r"missing \['fc'\], unexpected \['fc2'\]"):
        pruner.step(0, {"fc2": np.ones((2, 2))})


def test_select_layers_applies_include_types_and_exclude_with_one_set_of_messages() -> None:
    from inc_core.sparsity import select_layers

    ops = [inc.Op("fc1", "Linear"), inc.Op("fc2", "Linear"), inc.Op("conv", "Conv2d")]
    config = inc.PruneConfig(exclude=inc.LayerFilter(names=("fc2",)))
    assert select_layers(ops, config, model_types=["Linear", "Conv2d"], model="Net") == ["fc1", "conv"]
    with pytest.raises(ConfigError, match=r"include_types \['Dense'\] match no prunable layer of Net; .*\['Conv2d', 'Linear'\]"):
        select_layers(ops, inc.PruneConfig(include_types=("Dense",)), model_types=["Linear", "Conv2d"], model="Net")
    with pytest.raises(ConfigError, match="fc3.*match no op"):
        select_layers(ops, inc.PruneConfig(exclude=inc.LayerFilter(names=("fc3",))), model_types=[], model="Net")
    with pytest.raises(ConfigError, match="no layer left to prune in Net"):
        select_layers(ops, inc.PruneConfig(exclude=inc.LayerFilter(types=("Linear", "Conv2d"))), model_types=[], model="Net")
