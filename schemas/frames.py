"""msgpack response bodies from frames.

The responses to one model's requests differ only in their id and their outputs' raw bytes:
the model's name and version, the output names, datatypes and shapes, and the headers of the
binary data (their lengths) are the same bytes every time. Those bytes are cut once into
frames around the id and each output's data; a body is then the frames joined with one
request's id and its rows' bytes, byte for byte what `encode` writes for the whole response.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np

from surge.schemas.inference import InferenceResponse, Tensor

_encode = msgspec.msgpack.Encoder().encode
# Responses, at least, to build as the rows of one array: below, numpy's calls cost more than
# joining them one by one (about 0.5 µs each).
_BLOCK_FROM = 32


class ResponseFrames:
    """The fixed bytes of msgpack responses whose outputs have the given names, datatypes,
    shapes and byte sizes."""

    __slots__ = ("_frames",)

    def __init__(self, frames: tuple[bytes, ...]) -> None:
        self._frames = frames  # before the id, then after it and after each output's data

    @classmethod
    def cut(
        cls,
        model_name: str,
        model_version: str | None,
        outputs: Sequence[tuple[str, str, list[int], int]],
    ) -> ResponseFrames | None:
        """Frames for responses with these outputs (name, datatype, shape, bytes), or None
        when they cannot be cut for certain (an output without bytes, say)."""
        sizes = [size for *_, size in outputs]
        if not sizes or min(sizes) <= 0:
            return None
        # Two responses that differ only in the id ("a", "b") and the data (all bits flipped):
        # where their bytes differ is where the id and each output's data lie.
        first, second = (
            _encode(
                _response(model_name, model_version, request_id, outputs, [fill * s for s in sizes])
            )
            for request_id, fill in (("a", b"\x00"), ("b", b"\xff"))
        )
        if len(first) != len(second):
            return None
        differ = np.flatnonzero(np.frombuffer(first, np.uint8) != np.frombuffer(second, np.uint8))
        runs = np.split(differ, np.flatnonzero(np.diff(differ) > 1) + 1)
        if [len(run) for run in runs] != [1, *sizes]:
            return None
        starts = [int(run[0]) for run in runs]
        frames = [first[: starts[0] - 1]]  # the id's one-byte string header goes with the id
        for run, following in zip(runs, [*starts[1:], len(first)], strict=True):
            frames.append(first[int(run[-1]) + 1 : following])
        cut = cls(tuple(frames))
        return cut if cut._proves(model_name, model_version, outputs) else None

    def body(self, request_id: str, data: Sequence[memoryview | bytes]) -> bytes:
        """The response to one request: its id, and each output's raw bytes in order."""
        frames = self._frames
        if len(data) == 1:  # the common case, without a loop
            return b"".join((frames[0], _encode(request_id), frames[1], data[0], frames[2]))
        parts = [frames[0], _encode(request_id)]
        for frame, raw in zip(frames[1:], data, strict=False):
            parts += (frame, raw)
        parts.append(frames[-1])
        return b"".join(parts)

    def bodies(self, request_ids: Sequence[str], data: Sequence[memoryview | bytes]) -> list[bytes]:
        """The responses to consecutive requests of as many rows each, `data` holding each
        output's bytes for all of them, in order. When the ids encode to as many bytes (one
        producer's usually do), the bodies are the rows of one array, built column by column:
        a constant frame broadcast down its columns, ids and data copied in as blocks (for
        `_BLOCK_FROM` responses or more)."""
        count, width = len(request_ids), len(request_ids[0])
        if count < _BLOCK_FROM:
            return self._one_by_one(request_ids, data)
        text = "".join(request_ids)
        raw_ids = text.encode()
        if len(raw_ids) != len(text) or len(text) != count * width:
            return self._one_by_one(request_ids, data)  # beyond ASCII, or of other lengths
        if min(map(len, request_ids)) != width:  # none shorter, and the total: none longer
            return self._one_by_one(request_ids, data)
        frames = self._frames
        id_header = _encode("a" * width)[: -width or None]
        parts = [_row(frames[0] + id_header), np.frombuffer(raw_ids, np.uint8).reshape(count, -1)]
        for frame, raw in zip(frames[1:], data, strict=False):  # one frame more than outputs
            parts += (_row(frame), np.frombuffer(raw, np.uint8).reshape(count, -1))
        parts.append(_row(frames[-1]))
        length = sum(part.shape[-1] for part in parts)
        block = np.empty((count, length), np.uint8)
        at = 0
        for part in parts:
            block[:, at : at + part.shape[-1]] = part
            at += part.shape[-1]
        joined = block.tobytes()
        return [joined[start : start + length] for start in range(0, count * length, length)]

    def _one_by_one(
        self, request_ids: Sequence[str], data: Sequence[memoryview | bytes]
    ) -> list[bytes]:
        count = len(request_ids)
        views = [memoryview(raw).cast("B") for raw in data]
        sizes = [view.nbytes // count for view in views]
        return [
            self.body(
                request_id, [v[i * n : (i + 1) * n] for v, n in zip(views, sizes, strict=True)]
            )
            for i, request_id in enumerate(request_ids)
        ]

    def _proves(
        self,
        model_name: str,
        model_version: str | None,
        outputs: Sequence[tuple[str, str, list[int], int]],
    ) -> bool:
        """An id with a longer string header, and uneven data: the same bytes as `encode`."""
        request_id = "é" * 40
        data = [(np.arange(size) * 7 % 251).astype(np.uint8).tobytes() for *_, size in outputs]
        response = _response(model_name, model_version, request_id, outputs, data)
        return self.body(request_id, data) == _encode(response)


def _row(frame: bytes) -> np.ndarray:
    return np.frombuffer(frame, np.uint8)


def _response(
    model_name: str,
    model_version: str | None,
    request_id: str,
    outputs: Sequence[tuple[str, str, list[int], int]],
    data: Sequence[bytes],
) -> InferenceResponse:
    return InferenceResponse(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        outputs=[
            Tensor(name=name, shape=shape, datatype=datatype, data=raw)  # type: ignore[arg-type]
            for (name, datatype, shape, _), raw in zip(outputs, data, strict=True)
        ],
    )
