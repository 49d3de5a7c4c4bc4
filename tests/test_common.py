"""What the AP and the workers share: the finiteness check on inputs, the error hierarchy, tensor specs."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from apdispatch.common.binomial import lower_bound
from apdispatch.common.confidence import Acceptance, CalibrationConfig, acceptance_for, calibrate
from apdispatch.common.errors import (
    ApdispatchError,
    DeadlineExceededError,
    InvalidInputError,
    InvalidRequestError,
    NotFoundError,
    RejectedError,
    UnavailableError,
    from_status,
)
from apdispatch.common.manifest import TensorSpec as ManifestTensorSpec
from apdispatch.common.tensors import TensorSpec, all_finite

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


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequestError("sla.deadline_ms", "must be > 0"), grpc.StatusCode.INVALID_ARGUMENT),
        (InvalidInputError("unexpected inference input 'x' for model 'm'"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFoundError("Request for unknown model: 'm' is not found"), grpc.StatusCode.NOT_FOUND),
        (RejectedError("no target can meet the SLA"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (UnavailableError("worker gone"), grpc.StatusCode.UNAVAILABLE),
        (DeadlineExceededError(), grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_each_error_carries_its_status_and_comes_back_from_it(
    error: ApdispatchError, code: grpc.StatusCode
) -> None:
    assert error.code is code
    back = from_status(error.code, error.message, request_id="r1")
    assert isinstance(back, ApdispatchError) and back.code is code and back.request_id == "r1"
    # The SDK raises the family a client catches: a worker's input error is an invalid request.
    assert isinstance(back, InvalidRequestError) == isinstance(error, InvalidRequestError)
    assert isinstance(error, type(back))
    assert back.message == error.message


def test_a_worker_input_error_keeps_its_message_whole() -> None:
    err = InvalidInputError("input 'input' for model 'digits-tiny' holds NaN or infinite values")
    assert str(err) == err.message == "input 'input' for model 'digits-tiny' holds NaN or infinite values"
    assert err.field == ""
    assert InvalidRequestError("inputs[0].data", "contains NaN or infinity").message == (
        "inputs[0].data: contains NaN or infinity"
    )


def test_an_unmapped_status_keeps_its_code() -> None:
    err = from_status(grpc.StatusCode.DATA_LOSS, "no")
    assert type(err) is ApdispatchError and err.code is grpc.StatusCode.DATA_LOSS


def test_one_tensor_spec_from_the_manifest_over_the_wire() -> None:
    assert ManifestTensorSpec is TensorSpec
    spec = TensorSpec(name="input", datatype="FP32", shape=(-1, 1, 8, 8))
    assert TensorSpec.from_json(spec.to_json()) == spec
    wire = spec.to_proto()
    assert (wire.name, wire.datatype, list(wire.shape)) == ("input", "FP32", [-1, 1, 8, 8])
    assert TensorSpec.from_proto(wire) == spec


def test_binomial_lower_bound_by_hand() -> None:
    # k = n: P(n of n | p) = p^n = 1 - level, so p = 0.05^(1/n).
    assert lower_bound(10, 10) == pytest.approx(0.05**0.1)
    # k = 1 of n: P(at least 1) = 1 - (1 - p)^n = 0.05, so p = 1 - 0.95^(1/n).
    assert lower_bound(1, 20) == pytest.approx(1.0 - 0.95**0.05)
    assert lower_bound(0, 5) == 0.0
    # Larger n, tighter: 900 of 1,000 is at least 0.883 at 95 %.
    assert lower_bound(900, 1000) == pytest.approx(0.8830, abs=1e-4)
    assert lower_bound(90, 100) < lower_bound(900, 1000) < 0.9
    with pytest.raises(ValueError, match="successes"):
        lower_bound(3, 2)


def test_calibration_picks_the_lowest_threshold_that_holds_by_hand() -> None:
    # 100 samples, confidence i / 100: the top 50 all right, the bottom 50 right every other one.
    confidence = np.arange(100) / 100.0
    correct = np.array([i >= 50 or i % 2 == 0 for i in range(100)])
    config = CalibrationConfig(level=0.95, thresholds=2, floor_min=0.5, floor_max=0.99, floor_step=0.01)
    table = calibrate(confidence, correct, config)
    # Two candidates, each tested at 1 - 0.05 / 2: every sample (75 of 100 right) and the top half (50 of 50).
    everything = lower_bound(75, 100, 0.975)
    top_half = 0.025 ** (1 / 50)  # all n right: p^n = 0.025
    assert 0.65 < everything < 0.66 and 0.92 < top_half < 0.93
    by_floor = {round(a.floor, 2): a for a in table}
    assert by_floor[0.65] == Acceptance(0.65, 0.0, 1.0, 0.75)
    assert by_floor[0.66].threshold == pytest.approx(0.495) and by_floor[0.92].coverage == 0.5
    assert by_floor[0.92].accuracy == 1.0 and 0.93 not in by_floor and 0.5 in by_floor
    assert acceptance_for(table, 0.655) == by_floor[0.66] and acceptance_for(table, 0.95) is None
    with pytest.raises(ValueError, match="confidence and correct"):
        calibrate(confidence, correct[:3], config)
