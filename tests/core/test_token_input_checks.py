"""The shared checks of token-model calibration batches: ids, sequence length, padding-only samples."""

from __future__ import annotations

import numpy as np
import pytest

from inc_core.calibration import check_no_empty_samples, check_sequence_length, check_token_ids
from inc_core.errors import DatasetError


def test_token_ids_inside_the_table_pass_and_outside_name_the_id() -> None:
    ids = np.array([[0, 5, 9]])
    check_token_ids(ids, name="input_ids", rows=10, table="the table 'emb' of 10 rows", where="batch 0")
    with pytest.raises(DatasetError, match=r"batch 0: input 'input_ids' holds id 10, outside the table 'emb' of 10 rows \(ids 0\.\.9\)"):
        check_token_ids(ids + 1, name="input_ids", rows=10, table="the table 'emb' of 10 rows", where="batch 0")
    with pytest.raises(DatasetError, match=r"holds id -1"):
        check_token_ids(ids - 1, name="input_ids", rows=10, table="the table", where="batch 0")


def test_sequence_length_over_the_limit_says_how_to_truncate() -> None:
    check_sequence_length(64, name="input_ids", limit=64, table="the position table", where="batch 2")
    with pytest.raises(DatasetError, match=r"batch 2: input 'input_ids' has sequences of 65 tokens, but the position table "
                       r"allows at most 64\. Truncate the data to 64 tokens"):
        check_sequence_length(65, name="input_ids", limit=64, table="the position table", where="batch 2")


def test_padding_only_samples_are_named() -> None:
    mask = np.ones((4, 6), dtype=np.int64)
    check_no_empty_samples(mask, name="attention_mask", where="batch 0")
    mask[[1, 3]] = 0
    with pytest.raises(DatasetError, match=r"batch 0: sample\(s\) \[1, 3\] of input 'attention_mask' are all padding"):
        check_no_empty_samples(mask, name="attention_mask", where="batch 0")
    check_no_empty_samples(np.zeros(3), name="attention_mask", where="batch 0")  # no batch axis: nothing to judge
