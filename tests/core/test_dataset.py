"""Dataset: arrays, mappings, npz files and iterables; labels; limits; bad input."""

from __future__ import annotations

import numpy as np
import pytest

import inc_core as inc
from inc_core.errors import DatasetError


def test_array_source_batches_along_axis_zero_with_labels():
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    y = np.arange(10)
    items = list(inc.Dataset(x, labels=y, batch_size=4))
    assert [b.shape[0] for b, _ in items] == [4, 4, 2]
    np.testing.assert_array_equal(items[2][0], x[8:])
    np.testing.assert_array_equal(items[1][1], y[4:8])


def test_mapping_and_npz_sources_yield_named_inputs(tmp_path):
    ids = np.ones((5, 8), np.int64)
    mask = np.zeros((5, 8), np.int64)
    path = tmp_path / "calib.npz"
    np.savez(path, input_ids=ids, attention_mask=mask)
    for source in ({"input_ids": ids, "attention_mask": mask}, path, str(path)):
        batches = list(inc.Dataset(source, batch_size=2))
        assert len(batches) == 3
        assert set(batches[0][0]) == {"input_ids", "attention_mask"}
        assert batches[0][1] is None


def test_iterable_and_callable_sources_can_be_read_twice_when_callable():
    batches = [np.zeros((2, 3)), np.ones((2, 3))]
    ds = inc.Dataset(lambda: iter(batches))
    assert len(list(ds)) == 2 and len(list(ds)) == 2
    paired = inc.Dataset([(b, 1) for b in batches], labels=True)
    assert [label for _, label in paired] == [1, 1]


def test_inputs_stops_at_the_sample_limit_and_truncates_the_last_batch():
    ds = inc.Dataset(np.zeros((10, 2)), batch_size=4)
    shapes = [b.shape[0] for b in ds.inputs(limit=6)]
    assert shapes == [4, 2]


def test_the_limit_cuts_nested_batches_and_keeps_batches_whose_arrays_differ_on_axis_zero_whole():
    dense = np.zeros((8, 13), np.float32)
    # DLRM's inputs: features per sample, then per table flat indices (any count) and one offset per sample
    indices, offsets = [np.zeros(20, np.int64)] * 3, [np.arange(8)] * 3
    whole = [b for b in inc.Dataset([(dense, indices, offsets)] * 2).inputs(limit=10)]
    assert [b[0].shape[0] for b in whole] == [8, 8]
    assert whole[1][1][0].shape == (20,) and len(whole[1][1]) == 3
    scalar = [b for b in inc.Dataset([(dense, np.float32(0.5))] * 2).inputs(limit=3)]  # a scalar argument
    assert [b[0].shape[0] for b in scalar] == [8]
    nested = [b for b in inc.Dataset([{"x": dense, "pair": [dense, dense]}] * 2).inputs(limit=10)]
    assert [b["x"].shape[0] for b in nested] == [8, 2]
    assert [v.shape[0] for v in nested[1]["pair"]] == [2, 2] and isinstance(nested[1]["pair"], list)


def test_transform_is_applied_to_inputs():
    ds = inc.Dataset(np.ones((2, 2)), transform=lambda b: b * 3)
    assert float(next(iter(ds))[0].sum()) == 6.0


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: inc.Dataset(np.zeros((0, 3))), "no samples"),
        (lambda: inc.Dataset({}), "mapping is empty"),
        (lambda: inc.Dataset({"a": np.zeros((3, 1)), "b": np.zeros((4, 1))}), "same number of samples"),
        (lambda: inc.Dataset(np.zeros((3, 1)), labels=np.zeros(4)), "4 labels for 3 samples"),
        (lambda: inc.Dataset(np.zeros((3, 1)), batch_size=0), "batch_size must be an int >= 1"),
        (lambda: inc.Dataset(42), "cannot read samples from a int"),
        (lambda: inc.Dataset("/no/such/file.npz"), "no file at"),
        # an iterable carries its labels in its items; an array of labels there is refused, not compared
        (lambda: inc.Dataset([np.zeros((2, 3))] * 2, labels=np.array([0, 1, 2, 3])), "for an iterable source, labels must be True"),
        (lambda: inc.Dataset(iter([np.zeros((2, 3))]), labels=[0, 1]), "got a list"),
        (lambda: inc.Dataset({"x": [[1.0, 2.0], [3.0]]}), r"input 'x' \(list\) cannot be read as an array"),
        (lambda: inc.Dataset(np.zeros((2, 1)), labels=[[1], [2, 3]]), r"labels \(list\) cannot be read as an array"),
        (lambda: inc.Dataset({"x": [object(), object()]}), "not a numeric array"),
    ],
)
def test_bad_sources_raise_dataset_error(build, message):
    with pytest.raises(DatasetError, match=message):
        build()


def test_unreadable_npz_raises_dataset_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(DatasetError, match="not a readable .npz"):
        inc.Dataset(bad)


def test_empty_iterable_fails_when_inputs_are_requested():
    with pytest.raises(DatasetError, match="no samples were produced"):
        list(inc.Dataset([]).inputs())
