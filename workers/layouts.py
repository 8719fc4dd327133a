"""Body layouts: read a msgpack request by slicing instead of decoding it.

The requests of one producer differ only in their id and their tensor's bytes: the field
names, the model's shape and datatype, the string and binary headers (their lengths) are
the same bytes every time. Once one body has been decoded and validated the full way, its
layout records where the id's and the tensor's bytes lie and the bytes around them. A later
body of the same length whose surrounding bytes are those same bytes has the same structure
(msgpack skips string and binary contents by their length, never reading them), so what was
validated holds for it too: only its id must still be checked for UTF-8.

A layout is proved before use: a probe body, the learned one with other id and tensor bytes,
must decode to exactly those values and nothing else changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np

from surge.schemas import MSGPACK, InferenceRequest, decode_request
from surge.schemas.inference import MAX_ID_LENGTH

_ID_KEY = msgspec.msgpack.encode("id")
# A layout keeps the body's bytes but the tensor's: bodies with more than this around their
# tensor (large parameters, say) are decoded the full way, where slicing would save little.
MAX_FIXED_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a body's id and tensor bytes lie, and the bytes that must surround them."""

    rows: int
    fixed: tuple[tuple[int, bytes], ...]  # (offset, bytes) outside the id and the tensor
    id_at: tuple[int, int] | None  # the id's UTF-8 bytes; None: the body carries no id
    data_at: tuple[int, int]  # the tensor's raw bytes

    def read(self, body: bytes) -> tuple[str | None, memoryview] | None:
        """(id, tensor bytes) of a body of the learned length, or None if it is laid out
        otherwise (or its id is not UTF-8): decode it the full way."""
        for offset, expected in self.fixed:
            if not body.startswith(expected, offset):
                return None
        request_id = None
        if self.id_at is not None:
            try:
                request_id = body[self.id_at[0] : self.id_at[1]].decode()
            except UnicodeDecodeError:
                return None
        return request_id, memoryview(body)[self.data_at[0] : self.data_at[1]]

    def read_all(self, bodies: Sequence[bytes]) -> list[str] | None:
        """`read` for many bodies of the learned length at once, checked as the rows of one
        array: their ids (all "" when the bodies carry none). None unless every body is laid
        out so and every id is ASCII: read them one by one."""
        count = len(bodies)
        block = np.frombuffer(b"".join(bodies), np.uint8).reshape(count, -1)
        for offset, expected in self.fixed:
            around = block[:, offset : offset + len(expected)]
            if not (around == np.frombuffer(expected, np.uint8)).all():
                return None
        if self.id_at is None or self.id_at[0] == self.id_at[1]:
            return [""] * count
        start, end = self.id_at
        column = block[:, start:end]
        if column.max() >= 0x80:  # UTF-8 beyond ASCII: decoded one by one
            return None
        text = column.tobytes().decode("ascii")
        width = end - start
        return [text[i : i + width] for i in range(0, count * width, width)]


def learn(body: bytes) -> Layout | None:
    """The layout of a msgpack request body with one input in raw bytes, or None when it
    cannot be pinned down for certain."""
    try:
        request = decode_request(body, MSGPACK)
    except msgspec.DecodeError:
        return None
    if len(request.inputs) != 1 or not request.inputs[0].shape:
        return None
    data = request.inputs[0].data
    if type(data) is not memoryview or data.obj is not body or not data.nbytes:
        return None
    if len(body) - data.nbytes > MAX_FIXED_BYTES:
        return None
    start = np.frombuffer(data, np.uint8).ctypes.data - np.frombuffer(body, np.uint8).ctypes.data
    data_at = (start, start + data.nbytes)
    id_at = None
    if request.id is not None:
        raw_id = request.id.encode()
        if len(raw_id) > MAX_ID_LENGTH:
            return None  # other ids of as many bytes could hold more characters than allowed
        needle = _ID_KEY + msgspec.msgpack.encode(request.id)
        found = body.find(needle)
        if found < 0 or body.find(needle, found + 1) >= 0:
            return None  # written otherwise (a longer header) or ambiguous
        end = found + len(needle)
        id_at = (end - len(raw_id), end)
        if id_at[0] < data_at[1] and data_at[0] < id_at[1]:
            return None
    regions = [r for r in (id_at, data_at) if r is not None]
    layout = Layout(request.inputs[0].shape[0], _fixed(body, regions), id_at, data_at)
    return layout if _proves(layout, body, request) else None


def _fixed(body: bytes, regions: list[tuple[int, int]]) -> tuple[tuple[int, bytes], ...]:
    fixed, position = [], 0
    for start, end in sorted(regions):
        if start > position:
            fixed.append((position, body[position:start]))
        position = end
    if position < len(body):
        fixed.append((position, body[position:]))
    return tuple(fixed)


def _proves(layout: Layout, body: bytes, request: InferenceRequest) -> bool:
    """Decode the body with other id and tensor bytes: the layout holds if exactly those
    changed."""
    probe = bytearray(body)
    new_id = None
    if layout.id_at is not None:
        start, end = layout.id_at
        new_id = "".join("b" if c == ord("a") else "a" for c in body[start:end])  # ASCII
        probe[start:end] = new_id.encode()
    start, end = layout.data_at
    new_data = (np.frombuffer(body, np.uint8, end - start, start) ^ 0xFF).tobytes()
    probe[start:end] = new_data
    try:
        decoded = decode_request(bytes(probe), MSGPACK)
    except msgspec.DecodeError:
        return False
    tensor = decoded.inputs[0] if len(decoded.inputs) == 1 else None
    if decoded.id != new_id or tensor is None or type(tensor.data) is not memoryview:
        return False
    if bytes(tensor.data) != new_data:
        return False
    # All else as decoded the first time.
    restored = msgspec.structs.replace(
        decoded,
        id=request.id,
        inputs=[msgspec.structs.replace(tensor, data=request.inputs[0].data)],
    )
    return restored == request
