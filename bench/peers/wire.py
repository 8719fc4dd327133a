"""The peers' own minimal view of Surge's msgpack wire format: what a hand-written consumer
would write, decoding only the fields it needs, tensors as raw bytes."""

from __future__ import annotations

import msgspec
import numpy as np


class Tensor(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    data: bytes


class Request(msgspec.Struct):
    id: str
    inputs: list[Tensor]


class Output(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    data: bytes


class Response(msgspec.Struct):
    model_name: str
    id: str
    outputs: list[Output]


decode = msgspec.msgpack.Decoder(Request).decode
encode = msgspec.msgpack.Encoder().encode
REPLY_HEADERS = [("surge-status", b"ok"), ("content-type", b"application/msgpack")]


def reply(request_id: str, row: np.ndarray) -> bytes:
    out = Output("probs", [1, row.shape[-1]], "FP32", row.tobytes())
    return encode(Response("mlp", request_id, [out]))
