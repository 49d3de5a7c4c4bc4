"""What the AP and the workers share: the finiteness check on inputs, the error hierarchy."""

from __future__ import annotations

import numpy as np
import pytest

from apdispatch.common.tensors import all_finite

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8"])
def test_all_finite_sees_nan_and_infinity_anywhere(dtype: str) -> None:
    x = np.linspace(-3.0, 3.0, 24, dtype=dtype).reshape(2, 3, 4)
    assert all_finite(x)
    for bad in (np.nan, np.inf, -np.inf):
        for where in (0, 13, 23):
            y = x.copy()
            y.flat[where] = bad
            assert not all_finite(y), (bad, where)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_all_finite_when_the_sum_overflows_but_every_value_is_finite() -> None:
    # Each value is finite; their float64 sum is not.
    huge = np.full((2, 3), np.finfo(np.float64).max, dtype="<f8")
    assert all_finite(huge)
    huge[1, 2] = np.nan
    assert not all_finite(huge)


def test_all_finite_reads_every_axis_of_a_read_only_view() -> None:
    raw = np.ones((3, 4), dtype="<f4")
    raw[2, 3] = np.inf
    view = np.frombuffer(raw.tobytes(), dtype="<f4").reshape(3, 4)
    assert not view.flags.writeable
    assert not all_finite(view)
