"""Every torch test also checks that it left the shared digits arrays as they were.

The tests pass views of one cached array (``torch_helpers.digits``) to inc as calibration data and as inputs, as
users pass theirs: a path that writes into its inputs (inductor summed an INT8 Linear's output into a model
input in place, see ``inc_torch.ptq._inplace_sums``) is then a failure of the test that ran it, not a changed
dataset for every test after it in the same process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
import torch_helpers


def _fingerprint() -> str:
    images, labels = torch_helpers.digits()
    return hashlib.sha1(images.tobytes() + labels.tobytes()).hexdigest()


@pytest.fixture(autouse=True)
def _digits_left_as_they_were(request: pytest.FixtureRequest) -> Iterator[None]:
    before = _fingerprint()
    yield
    assert _fingerprint() == before, f"{request.node.name} wrote into the shared digits arrays (user data)"
