"""Response frames: a body joined from frames is byte for byte the body `encode` writes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from surge.schemas import MSGPACK, InferenceResponse, ResponseFrames, Tensor, encode
from surge.schemas.frames import _BLOCK_FROM

NUMERIC = ["BOOL", "UINT8", "INT32", "INT64", "FP16", "FP32", "FP64"]

outputs = st.lists(
    st.tuples(
        st.text(min_size=1, max_size=40),
        st.sampled_from(NUMERIC),
        st.lists(st.integers(1, 5), max_size=3),  # the shape past the rows
        st.integers(1, 300),  # bytes per row
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda output: output[0],
)


@settings(max_examples=200)
@given(
    st.text(min_size=1, max_size=60),
    st.none() | st.text(max_size=10),
    outputs,
    st.integers(1, 4),
    st.lists(st.text(min_size=1, max_size=300), min_size=1, max_size=4),
)
def test_a_joined_body_is_the_encoded_body(
    model: str,
    version: str | None,
    tensors: list[tuple[str, str, list[int], int]],
    rows: int,
    ids: list[str],
) -> None:
    described = [(name, dt, [rows, *tail], rows * size) for name, dt, tail, size in tensors]
    frames = ResponseFrames.cut(model, version, described)
    assert frames is not None
    for request_id in ids:
        data = [np.random.default_rng(len(request_id)).bytes(size) for *_, size in described]
        response = InferenceResponse(
            model_name=model,
            model_version=version,
            id=request_id,
            outputs=[
                Tensor(name=name, shape=shape, datatype=dt, data=memoryview(raw))
                for (name, dt, shape, _), raw in zip(described, data, strict=True)
            ],
        )
        assert frames.body(request_id, [memoryview(raw) for raw in data]) == encode(
            response, MSGPACK
        )


def test_outputs_without_bytes_get_no_frames() -> None:
    assert ResponseFrames.cut("m", "1", [("y", "FP32", [1, 0], 0)]) is None
    assert ResponseFrames.cut("m", "1", []) is None


@settings(max_examples=200)
@given(
    st.text(min_size=1, max_size=20),
    outputs,
    st.integers(1, 3),
    st.sampled_from([1, 5, _BLOCK_FROM, _BLOCK_FROM + 7]),  # one by one, and as one array
    st.sampled_from(["", "r", "req-00", "é", "x" * 40, "y" * 300]),
    st.booleans(),
)
def test_bodies_built_together_are_the_bodies_joined_one_by_one(
    model: str,
    tensors: list[tuple[str, str, list[int], int]],
    rows: int,
    count: int,
    prefix: str,
    same_length: bool,
) -> None:
    """Ids of one length (ASCII or not, empty or long) and of several lengths alike."""
    described = [(name, dt, [rows, *tail], rows * size) for name, dt, tail, size in tensors]
    frames = ResponseFrames.cut(model, "1", described)
    assert frames is not None
    ids = [f"{prefix}{n}" if same_length else f"{prefix}{n * 97}" for n in range(count)]
    rng = np.random.default_rng(count)
    data = [rng.bytes(size * count) for *_, size in described]
    expected = [
        frames.body(
            request_id,
            [
                raw[i * size : (i + 1) * size]
                for raw, (*_, size) in zip(data, described, strict=True)
            ],
        )
        for i, request_id in enumerate(ids)
    ]
    assert frames.bodies(ids, [memoryview(raw) for raw in data]) == expected
