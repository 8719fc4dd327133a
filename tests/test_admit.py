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
