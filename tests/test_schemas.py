"""The wire contract: both encodings, tensors, and the published JSON Schema."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import numpy as np
import pytest

from surge.producers import read_redis_result, request_body
from surge.schemas import (
    JSON,
    MSGPACK,
    ErrorCode,
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    TensorError,
    TensorTooLarge,
    decode_error,
    decode_request,
    decode_response,
    encode,
    from_array,
    json_schema,
    raw_rows,
    row_tensors,
    to_array,
)


@pytest.mark.parametrize(
    "dtype", ["float32", "float64", "float16", "int64", "int32", "uint8", "bool"]
)
@pytest.mark.parametrize("content_type", [JSON, MSGPACK])
def test_tensors_round_trip(dtype: str, content_type: str) -> None:
    array = (np.arange(12).reshape(3, 4) % 3).astype(dtype)
    request = InferenceRequest(
        id="r1", inputs=[from_array("x", array, binary=content_type == MSGPACK)]
    )
    decoded = decode_request(encode(request, content_type), content_type)
    assert decoded.id == "r1"
    back = to_array(decoded.inputs[0])
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_msgpack_raw_bytes_decode_without_copy() -> None:
    array = np.arange(6, dtype=np.float32)
    body = encode(InferenceRequest(inputs=[from_array("x", array, binary=True)]), MSGPACK)
    tensor = decode_request(body, MSGPACK).inputs[0]
    assert isinstance(tensor.data, memoryview)
    assert np.shares_memory(to_array(tensor), np.frombuffer(body, dtype=np.uint8))


def test_v2_json_from_other_clients_decodes() -> None:
    """A body as Triton's / KServe's HTTP clients write it: nested lists, parameters, outputs."""
    body = json.dumps(
        {
            "id": "42",
            "inputs": [
                {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]}
            ],
            "outputs": [{"name": "probs", "parameters": {"binary_data": False}}],
            "parameters": {"priority": 1},
        }
    ).encode()
    request = decode_request(body, JSON)
    assert request.outputs is not None
    assert request.outputs[0].name == "probs"
    np.testing.assert_array_equal(to_array(request.inputs[0]), [[1, 2], [3, 4]])


@pytest.mark.parametrize(
    ("tensor", "error"),
    [
        ({"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}, "do not fill"),
        ({"name": "x", "shape": [2], "datatype": "FP99", "data": [1, 2]}, "unknown datatype"),
        ({"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}, "not FP32"),
        ({"name": "x", "shape": [2], "datatype": "UINT8", "data": [1, 300]}, "not UINT8"),
        ({"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1], [2, 3]]}, "not FP32"),
        ({"name": "x", "shape": [1], "datatype": "FP32", "data": [1e308]}, "not FP32"),
        # numpy converts all of these without a word: 1, -1, True, True, 12, an object array
        ({"name": "x", "shape": [2], "datatype": "INT32", "data": [1.7, -1.9]}, "fractions"),
        ({"name": "x", "shape": [2], "datatype": "INT64", "data": [-0.9, 99.9]}, "fractions"),
        ({"name": "x", "shape": [2], "datatype": "BOOL", "data": ["false", 0.1]}, "not BOOL"),
        ({"name": "x", "shape": [1], "datatype": "BOOL", "data": [0.1]}, "not BOOL"),
        ({"name": "x", "shape": [2], "datatype": "INT32", "data": ["12", "7"]}, "text"),
        # numpy takes true as 1 beside numbers
        ({"name": "x", "shape": [1, 2], "datatype": "INT64", "data": [[True, 1]]}, "true/false"),
        ({"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [[0.5], [False]]}, "true/"),
        ({"name": "x", "shape": [2], "datatype": "UINT8", "data": [True, True]}, "true/false"),
        # ... and would make 2, 0.5 and -3 true beside true and false
        ({"name": "x", "shape": [2], "datatype": "BOOL", "data": [True, 2]}, "numbers beside"),
        ({"name": "x", "shape": [2], "datatype": "BOOL", "data": [False, -3]}, "numbers beside"),
        ({"name": "x", "shape": [2, 1], "datatype": "BOOL", "data": [[True], [0.5]]}, "beside"),
        ({"name": "x", "shape": [2], "datatype": "FP32", "data": ["nan", "inf"]}, "text"),
        ({"name": "x", "shape": [2], "datatype": "BYTES", "data": [{"a": 1}, None]}, "strings"),
        # numpy would keep the inner lists as elements
        ({"name": "x", "shape": [1, 2], "datatype": "BYTES", "data": [["a"], ["b", "c"]]}, "fill"),
        ({"name": "x", "shape": [1], "datatype": "INT8", "data": [-129]}, "outside"),
        # past 2**53 a float cannot tell neighbouring integers apart
        ({"name": "x", "shape": [2], "datatype": "INT64", "data": [2.0**60, 1]}, "too big"),
        ({"name": "x", "shape": [2], "datatype": "UINT64", "data": [2**64, 1]}, "outside"),
        # an empty tensor names dimensions no array may have
        (
            {"name": "x", "shape": [0, 99999999999999999999], "datatype": "FP32", "data": []},
            "shape",
        ),
        ({"name": "x", "shape": [1, 0, 2**62], "datatype": "FP32", "data": []}, "shape"),
    ],
)
def test_bad_tensors_raise_tensor_errors(tensor: dict[str, object], error: str) -> None:
    request = decode_request(json.dumps({"inputs": [tensor]}).encode(), JSON)
    with pytest.raises(TensorError, match=error):
        to_array(request.inputs[0])


def test_json_null_is_nan_in_float_tensors_and_whole_floats_fit_integers() -> None:
    """JSON cannot write NaN or the infinities (a result's become null): null reads as NaN."""
    tensors = [
        {"name": "x", "shape": [3], "datatype": "FP32", "data": [None, 1, 2.5]},
        {"name": "n", "shape": [2], "datatype": "INT16", "data": [3.0, -7]},
        {"name": "b", "shape": [2], "datatype": "BOOL", "data": [True, False]},
    ]
    request = decode_request(json.dumps({"inputs": tensors}).encode(), JSON)
    x, n, b = (to_array(tensor) for tensor in request.inputs)
    np.testing.assert_array_equal(x, np.array([np.nan, 1, 2.5], np.float32))
    assert x.dtype == np.float32
    np.testing.assert_array_equal(n, np.array([3, -7], np.int16))
    assert b.tolist() == [True, False]
    with pytest.raises(TensorError, match="not INT16"):
        to_array(
            decode_request(
                json.dumps({"inputs": [{**tensors[1], "data": [None, 1]}]}).encode(), JSON
            ).inputs[0]
        )


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        # numpy would take each of these lists through float64 (or refuse the object array
        # it makes), rounding the large integers
        ("UINT64", [2**64 - 1, 0]),
        ("UINT64", [2**63 + 1, 7]),
        ("INT64", [2**53 + 1, 3.0]),
        ("INT64", [1234567890123456789, 1.0]),
        ("INT64", [-(2**63), 2**63 - 1]),
    ],
)
def test_large_integers_in_lists_reach_the_model_exactly(datatype: str, data: list[Any]) -> None:
    tensor = {"name": "x", "shape": [len(data)], "datatype": datatype, "data": data}
    request = decode_request(json.dumps({"inputs": [tensor]}).encode(), JSON)
    assert to_array(request.inputs[0]).tolist() == [int(value) for value in data]


def test_raw_bool_bytes_other_than_zero_and_one_are_refused() -> None:
    """numpy reads any nonzero byte as true yet keeps it: a model's Not(2) would be true."""
    body = msgspec.msgpack.encode(
        {"inputs": [{"name": "x", "shape": [4], "datatype": "BOOL", "data": b"\0\1\2\xff"}]}
    )
    with pytest.raises(TensorError, match="0 or 1"):
        to_array(decode_request(body, MSGPACK).inputs[0])
    body = msgspec.msgpack.encode(
        {"inputs": [{"name": "x", "shape": [2], "datatype": "BOOL", "data": b"\0\1"}]}
    )
    assert to_array(decode_request(body, MSGPACK).inputs[0]).tolist() == [False, True]


def test_raw_bytes_must_match_the_shape() -> None:
    body = msgspec.msgpack.encode(
        {"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": b"\0" * 12}]}
    )
    with pytest.raises(TensorError, match="12 bytes"):
        to_array(decode_request(body, MSGPACK).inputs[0])


def test_element_limit() -> None:
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [10, 10], "datatype": "FP32", "data": []}]}
    )
    with pytest.raises(TensorTooLarge):
        to_array(decode_request(body.encode(), JSON).inputs[0], max_elements=99)


@pytest.mark.parametrize(
    "body",
    [b'{"inputs": "nope"}', b'{"id": 5, "inputs": []}', b'{"inputs": [{"name": "x"}]}'],
)
def test_schema_violations_are_validation_errors(body: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_request(body, JSON)


def test_error_body_is_v2_error_plus_code_and_id() -> None:
    body = encode(ErrorResponse(error="boom", code=ErrorCode.MODEL_ERROR, id="7"), JSON)
    assert json.loads(body) == {"error": "boom", "code": "model_error", "id": "7"}
    assert decode_error(body, JSON).code is ErrorCode.MODEL_ERROR


def test_json_schema_covers_the_contract() -> None:
    schema = json_schema()
    assert {"InferenceRequest", "InferenceResponse", "ErrorResponse", "Tensor"} <= set(
        schema["$defs"]
    )
    codes = schema["$defs"]["ErrorCode"]["enum"]
    assert set(codes) == {code.value for code in ErrorCode}


@pytest.mark.parametrize(
    ("inputs", "content_type", "error"),
    [
        pytest.param({"x": np.float32(1.0)}, MSGPACK, "a scalar", id="scalar"),
        pytest.param({1: np.ones(2)}, MSGPACK, "input names are non-empty strings", id="name"),
        pytest.param({"t": np.array([1.5, 2], dtype=object)}, MSGPACK, "not float", id="objects"),
        pytest.param({"t": np.array([None], dtype=object)}, JSON, "not NoneType", id="none"),
        pytest.param(
            {"t": np.array([b"\xff\xd8"], dtype=object)}, JSON, "need msgpack", id="binary"
        ),
        pytest.param({"t": np.array([b"\xff\xd8"])}, JSON, "need msgpack", id="binary-fixed"),
        pytest.param(
            {"x": np.array([[1, -np.inf]], np.float32)}, JSON, "JSON cannot carry", id="inf-json"
        ),
    ],
)
def test_a_request_no_worker_would_take_is_refused_as_it_is_built(
    inputs: dict[Any, np.ndarray], content_type: str, error: str
) -> None:
    with pytest.raises(TensorError, match=error):
        request_body(inputs, "r", content_type)


@pytest.mark.parametrize("request_id", ["", "x" * 257])
def test_a_request_id_a_worker_would_refuse_is_refused_as_the_request_is_built(
    request_id: str,
) -> None:
    with pytest.raises(TensorError, match="request ids are 1 to 256 characters"):
        request_body({"x": np.ones((1, 2), np.float32)}, request_id, MSGPACK)


def test_infinity_crosses_msgpack_and_bool_bytes_go_out_as_0_and_1() -> None:
    """A bool array viewed from other bytes may hold 2, which a worker refuses as no BOOL."""
    inputs = {"x": np.array([[np.inf]], np.float32), "m": np.array([[2, 0]], np.uint8).view(bool)}
    x, m = decode_request(request_body(inputs, "r", MSGPACK), MSGPACK).inputs
    assert to_array(x).tolist() == [[np.inf]]
    assert bytes(m.data) == b"\x01\x00"
    assert to_array(m).tolist() == [[True, False]]


def test_binary_values_cross_msgpack_as_they_are() -> None:
    jpeg = b"\xff\xd8\xff\xe0"
    body = request_body({"image": np.array([jpeg, "text"], dtype=object)}, "r", MSGPACK)
    (tensor,) = decode_request(body, MSGPACK).inputs
    assert to_array(tensor).tolist() == [jpeg, "text"]


def test_an_error_code_added_later_is_read_with_the_workers_message() -> None:
    body = msgspec.msgpack.encode({"error": "quota spent", "code": "over_quota", "id": "7"})
    error = decode_error(body, MSGPACK)
    assert (error.code, error.error, error.id) == ("over_quota", "quota spent", "7")
    with pytest.raises(msgspec.ValidationError):  # anything else amiss is still refused
        decode_error(msgspec.msgpack.encode({"code": "over_quota"}), MSGPACK)


@pytest.mark.parametrize("decode", [decode_request, decode_response])
def test_hostile_nesting_is_a_validation_error_in_every_body(decode: Any) -> None:
    body = b'{"parameters": {"p": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}"
    with pytest.raises(msgspec.ValidationError, match="nested too deeply"):
        decode(body, JSON)


def test_a_redis_value_that_is_no_result_says_why_as_a_result() -> None:
    body = msgspec.msgpack.encode({"model_name": "m", "id": "7", "outputs": "nope"})
    with pytest.raises(msgspec.ValidationError, match="outputs"):
        read_redis_result(body, MSGPACK)


def test_json_tensor_data_is_a_list_of_values_never_base64_bytes() -> None:
    """msgspec reads a string as base64 where raw bytes may be: the same string is refused in
    msgpack, and a body must mean the same in both, request or result."""
    body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": "AACAPw=="}]}'
    with pytest.raises(msgspec.ValidationError, match="JSON data is a list of values"):
        decode_request(body, JSON)
    output = b'{"name": "y", "shape": [1], "datatype": "FP32", "data": "AACAPw=="}'
    with pytest.raises(msgspec.ValidationError, match="JSON data is a list of values"):
        decode_response(b'{"model_name": "m", "id": "r", "outputs": [' + output + b"]}", JSON)


def test_bool_outputs_cut_into_rows_go_out_as_0_and_1() -> None:
    """The rows of a batch's output, as the worker sends them, read as a client reads them."""
    out = np.array([0, 2, 1, 255], np.uint8).view(np.bool_).reshape(4, 1)
    raw, row_bytes = raw_rows(out, "BOOL")
    assert (bytes(raw), row_bytes) == (b"\x00\x01\x01\x01", 1)
    tensors = row_tensors("o", out, [2, 2], binary=True)
    response = InferenceResponse(model_name="m", id="r", outputs=tensors)
    outputs = decode_response(encode(response, MSGPACK), MSGPACK).outputs
    assert [to_array(t).tolist() for t in outputs] == [[[False], [True]], [[True], [True]]]


@pytest.mark.parametrize("values", [[1, None], ["a", 2.5], [None]])
def test_bytes_outputs_that_are_not_strings_are_refused_as_they_are_encoded(
    values: list[object],
) -> None:
    """A client could not read them: the worker answers model_error instead of sending them."""
    for binary in (True, False):
        with pytest.raises(TensorError, match="BYTES values must be strings"):
            from_array("o", np.array(values, dtype=object), binary=binary)


@pytest.mark.parametrize("content_type", [JSON, MSGPACK])
def test_numpy_string_scalars_in_an_object_array_go_out_as_strings_and_bytes(
    content_type: str,
) -> None:
    """An object array made from a string array holds numpy's scalars, not str and bytes."""
    texts = np.array(list(np.array(["ab", "c"])), dtype=object).reshape(1, 2)
    (tensor,) = decode_request(request_body({"s": texts}, "r", content_type), content_type).inputs
    assert to_array(tensor).tolist() == [["ab", "c"]]
    raw = np.array([np.bytes_(b"x")], dtype=object).reshape(1, 1)
    (tensor,) = decode_request(request_body({"s": raw}, "r", content_type), content_type).inputs
    assert to_array(tensor).tolist() == [[b"x" if content_type == MSGPACK else "x"]]
