"""Inputs with a `value_range` (token ids within the vocabulary, say) or a `max_shape` (no
more tokens than the model has positions): a request holding a value outside it, or longer,
is refused on its own, by every way a request is read, before any batch."""

from __future__ import annotations

import numpy as np
import pytest

from surge.config import ConfigError, ModelConfig, convert
from surge.producers.requests import request_body
from surge.schemas import JSON, MSGPACK, ErrorCode
from surge.workers import Rejection
from surge.workers.intake import Intake, Job
from surge.workers.runtimes import TensorSpec, warm_up
from tests.helpers import make_ticket

IDS = TensorSpec("ids", "INT64", (-1,), pad_value=0, value_range=(0, 99))
ROWS = TensorSpec("x", "FP32", (4,), value_range=(-1, 1))  # fixed shape: read as raw bytes


def _admit(spec: TensorSpec, values: np.ndarray, content_type: str = MSGPACK) -> Job | Rejection:
    intake = Intake([spec], [], max_rows=64, max_elements=1 << 16)
    ticket = make_ticket(request_body({spec.name: values}, "r", content_type), content_type)
    return intake.admit(ticket)


@pytest.mark.parametrize("content_type", [MSGPACK, JSON])
@pytest.mark.parametrize(
    ("spec", "values"),
    [
        (IDS, np.array([[5, 99, 100]], np.int64)),
        (IDS, np.array([[-1, 0]], np.int64)),
        (ROWS, np.array([[0, 0.5, 1.5, 0]], np.float32)),
        (ROWS, np.array([[0, np.nan, 0, 0]], np.float32)),
    ],
)
def test_a_value_out_of_range_is_refused(
    spec: TensorSpec, values: np.ndarray, content_type: str
) -> None:
    result = _admit(spec, values, content_type)
    assert isinstance(result, Rejection)
    assert result.code == ErrorCode.INVALID_INPUT
    assert f"input {spec.name!r} holds" in result.message
    assert "outside the model's range" in result.message


def test_values_in_range_are_served_every_time() -> None:
    """The same body length again: raw rows of one layout are not read past the check."""
    for values in ([[0, 99, 42]], [[1, 2, 3]]):
        assert isinstance(_admit(IDS, np.array(values, np.int64)), Job)
    good = np.array([[-1, 0, 0.5, 1]], np.float32)
    bad = np.array([[-1, 0, 0.5, 2]], np.float32)  # as long as the good one
    assert isinstance(_admit(ROWS, good), Job)
    assert isinstance(_admit(ROWS, bad), Rejection)
    assert isinstance(_admit(ROWS, good), Job)


def test_an_empty_range_is_a_config_error() -> None:
    tensor = {"name": "ids", "datatype": "INT64", "shape": [-1], "value_range": [5, 1]}
    with pytest.raises(ConfigError, match="empty"):
        convert({"inputs": [tensor]}, ModelConfig, "m")
    tensor |= {"value_range": [1, 5], "pad_value": 0}  # padding reaches the model too
    with pytest.raises(ConfigError, match="pad_value 0 is outside"):
        convert({"inputs": [tensor]}, ModelConfig, "m")
    for bad, message in [
        ({"datatype": "BYTES", "value_range": [0, 1]}, "no value_range"),
        ({"value_range": [0, float("nan")]}, "must be numbers"),
    ]:
        with pytest.raises(ConfigError, match=message):
            convert({"inputs": [tensor | bad]}, ModelConfig, "m")
    output = {"name": "y", "datatype": "FP32", "shape": [2], "value_range": [0, 1]}
    with pytest.raises(ConfigError, match="applies to inputs"):
        convert({"outputs": [output]}, ModelConfig, "m")


def test_warm_up_feeds_values_the_model_accepts() -> None:
    seen: list[np.ndarray] = []

    class Model:
        inputs = (TensorSpec("ids", "INT64", (-1,), value_range=(101, 199)),)
        outputs = ()

        def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            seen.append(inputs["ids"])
            return {}

    warm_up(Model(), [2])  # type: ignore[arg-type]
    assert seen[0].shape == (2, 1)
    assert (seen[0] == 101).all()
    Model.inputs = (TensorSpec("ids", "INT64", (-1,), value_range=(0.5, 10)),)
    warm_up(Model(), [1])  # type: ignore[arg-type]
    assert seen[1].tolist() == [[1]]  # the lowest whole number in range, not 0


LONG = TensorSpec("ids", "INT64", (-1,), pad_value=0, max_shape=(8,))


@pytest.mark.parametrize("content_type", [MSGPACK, JSON])
def test_a_request_longer_than_the_model_takes_is_refused(content_type: str) -> None:
    """In a padded batch it would fail every request it shares the batch with."""
    assert isinstance(_admit(LONG, np.zeros((2, 8), np.int64), content_type), Job)
    result = _admit(LONG, np.zeros((1, 9), np.int64), content_type)
    assert isinstance(result, Rejection)
    assert result.code == ErrorCode.INVALID_INPUT
    assert "has shape [1, 9], the model takes at most ['batch', 8]" in result.message


def test_max_shape_bounds_variable_dimensions_only() -> None:
    tensor = {"name": "ids", "datatype": "INT64", "shape": [-1, 4]}
    config = convert({"inputs": [tensor | {"max_shape": [512, -1]}]}, ModelConfig, "m")
    assert TensorSpec.from_config(config.inputs[0]).max_shape == (512, -1)
    for bad, message in [
        ([512], "has not the 2 dimensions"),
        ([512, 4], "bounds only shape"),
        ([0, -1], "each at 1 or more"),
    ]:
        with pytest.raises(ConfigError, match=message):
            convert({"inputs": [tensor | {"max_shape": bad}]}, ModelConfig, "m")
    output = {"name": "y", "datatype": "FP32", "shape": [-1], "max_shape": [8]}
    with pytest.raises(ConfigError, match="max_shape applies to inputs"):
        convert({"outputs": [output]}, ModelConfig, "m")


def test_a_range_up_to_int64_s_highest_is_checked_exactly() -> None:
    """One short of the highest: the highest itself is refused, and said as written."""
    spec = TensorSpec("ids", "INT64", (-1,), value_range=(0, 2**63 - 2))
    assert isinstance(_admit(spec, np.array([[2**63 - 2]], np.int64), MSGPACK), Job)
    result = _admit(spec, np.array([[2**63 - 1]], np.int64), MSGPACK)
    assert isinstance(result, Rejection)
    assert result.message.endswith(f"outside the model's range [0, {2**63 - 2}]")


@pytest.mark.parametrize("content_type", [MSGPACK, JSON])
def test_an_empty_variable_dimension_is_refused(content_type: str) -> None:
    """No tokens at all: refused on its own, not passed to the model as all padding."""
    result = _admit(IDS, np.zeros((1, 0), np.int64), content_type)
    assert isinstance(result, Rejection)
    assert result.code == ErrorCode.INVALID_INPUT
    assert "has shape [1, 0]: a variable dimension of 0" in result.message
    fixed_empty = TensorSpec("x", "FP32", (0,))  # a dimension the model fixes at 0 is its own
    assert isinstance(_admit(fixed_empty, np.zeros((1, 0), np.float32), content_type), Job)
