"""Admission of a request to a model's inputs, on plain objects."""

from __future__ import annotations

import numpy as np

from surge.producers.requests import request_body
from surge.schemas import MSGPACK, ErrorCode
from surge.workers.intake import Job, admit
from surge.workers.runtimes import TensorSpec
from surge.workers.tickets import Rejection
from tests.helpers import make_ticket

SPECS = [
    TensorSpec("ids", "INT64", (-1,), pad_value=0),
    TensorSpec("mask", "INT64", (-1,), pad_value=0, follows="ids"),
]


def _admit(ids: list[int], mask: list[int]) -> Job | Rejection:
    inputs = {"ids": np.array([ids]), "mask": np.array([mask])}
    body = request_body(inputs, "r", MSGPACK)
    return admit(make_ticket(body, MSGPACK), SPECS, [], max_rows=8, max_elements=1 << 16)


def test_an_input_that_follows_another_must_be_as_long_in_every_request() -> None:
    """Padded apart, a short mask would fail alone and pass in a batch with longer rows."""
    assert isinstance(_admit([5, 6, 7], [1, 1, 1]), Job)
    refused = _admit([5, 6, 7], [1, 1])
    assert isinstance(refused, Rejection)
    assert refused.code == ErrorCode.INVALID_INPUT
    assert "follows" in refused.message


def test_an_input_follows_only_the_lengths_that_vary() -> None:
    """Token vectors of 3 features and a mask of 5 per token: their lengths agree, and a
    fixed dimension of either is no length to follow."""
    specs = [
        TensorSpec("x", "FP32", (-1, 3), pad_value=0),
        TensorSpec("mask", "FP32", (-1, 5), pad_value=0, follows="x"),
    ]

    def admitted(tokens: int, mask_tokens: int) -> Job | Rejection:
        inputs = {
            "x": np.ones((1, tokens, 3), np.float32),
            "mask": np.ones((1, mask_tokens, 5), np.float32),
        }
        body = request_body(inputs, "r", MSGPACK)
        return admit(make_ticket(body, MSGPACK), specs, [], max_rows=8, max_elements=1 << 16)

    assert isinstance(admitted(4, 4), Job)
    refused = admitted(4, 3)
    assert isinstance(refused, Rejection)
    assert refused.code == ErrorCode.INVALID_INPUT
