"""Intake: decode a ticket's body and check it against the model's inputs, yielding a Job."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from surge.schemas import (
    MSGPACK,
    DecodeError,
    ErrorCode,
    Tensor,
    TensorError,
    TensorTooLarge,
    ValidationError,
    decode_request,
    to_array,
)
from surge.workers.layouts import Layout, learn
from surge.workers.runtimes import TensorSpec
from surge.workers.runtimes.base import batch_shape
from surge.workers.tickets import Rejection, Ticket, fallback_id


@dataclass(frozen=True, slots=True)
class RawRows:
    """A run's rows of one input: bytes [start, end) of each of its bodies, laid out alike.
    Until the batch is stacked the bodies stay the only copy (`block` makes the other)."""

    bodies: Sequence[bytes]
    start: int
    end: int

    def block(self) -> np.ndarray:
        """The rows as one contiguous uint8 array, a body's per row."""
        joined = np.frombuffer(b"".join(self.bodies), np.uint8).reshape(len(self.bodies), -1)
        return np.ascontiguousarray(joined[:, self.start : self.end])

    def __getitem__(self, which: slice) -> RawRows:
        return RawRows(self.bodies[which], self.start, self.end)


@dataclass(slots=True, eq=False)
class Job:
    """Decoded, validated requests waiting in a batch queue: one request, or a run of alike
    requests read together (`run`)."""

    ticket: Ticket  # the request's; a run's first
    # Each with the job's rows as its first dimension. Raw bytes of a fixed-shape input stay
    # over the messages, already checked to hold exactly the rows they claim: a memoryview
    # (one request) or `RawRows` (a run), joined once per batch (`batching.stack`) instead
    # of made into an array per request.
    inputs: dict[str, np.ndarray | memoryview | RawRows]
    rows: int
    outputs: tuple[str, ...] | None  # requested output names; None: all
    length: int = 0  # elements per row of its padded inputs, set by a batcher that pads
    # A run's requests, in order, of `rows // len(run)` rows each, every output wanted; empty
    # for a job of one request. A run stays one job (one queue entry, one ledger hold) until
    # a batch takes part of it (`split`).
    run: Sequence[Ticket] = ()

    @property
    def tickets(self) -> Sequence[Ticket]:
        return self.run or (self.ticket,)

    @property
    def each(self) -> int:
        """Rows per request."""
        return self.rows // len(self.run) if self.run else self.rows

    def split(self, count: int) -> tuple[Job, Job]:
        """A run's first `count` requests, and the rest, as jobs of their own."""
        assert 0 < count < len(self.run)
        return self._part(slice(None, count)), self._part(slice(count, None))

    def _part(self, which: slice) -> Job:
        tickets = self.run[which]
        inputs = {name: rows[which] for name, rows in self.inputs.items()}  # type: ignore[index]
        return Job(tickets[0], inputs, len(tickets) * self.each, self.outputs, self.length, tickets)


class _Reject(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        self.rejection = Rejection(code, message)


_LAYOUTS = 64  # body lengths remembered per model version
# Bodies of one length, at least, to read as one array: below, numpy's calls cost more than
# reading them one by one (about 1.5 µs each).
_TOGETHER = 16


class Intake:
    """Admission for one served model version. Requests of its one fixed-shape input in raw
    msgpack bytes are read by their layout (`workers.layouts`) once one of the same length
    has been decoded the full way; everything else is decoded and checked by `admit`."""

    def __init__(
        self,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        *,
        max_rows: int,
        max_elements: int,
    ) -> None:
        self._inputs = inputs
        self._outputs = outputs
        self._max_rows = max_rows
        self._max_elements = max_elements
        # Bytes of a row's outputs, as far as their shapes tell (the data, not the encoding
        # around it): what a queued request will hold in memory once answered.
        self.result_row_bytes = sum(spec.row_bytes for spec in outputs)
        spec = inputs[0] if len(inputs) == 1 else None
        laid_out = (
            spec
            and spec.row_bytes
            and spec.pad_value is None
            and not spec.value_range
            and spec.datatype != "BOOL"  # whose bytes `to_array` checks
        )
        self._laid_out = spec.name if laid_out else None
        # By body length; None: a served body of that length could not be laid out.
        self._layouts: dict[int, Layout | None] = {}

    def admit(self, ticket: Ticket) -> Job | Rejection:
        """As `admit`: a Job, or why not."""
        if self._laid_out is not None and ticket.content_type == MSGPACK:
            if len(ticket.value) not in self._layouts:
                return self._admit_and_learn(ticket)
            layout = self._layouts[len(ticket.value)]
            if layout is not None and (read := layout.read(ticket.value)) is not None:
                request_id, data = read
                if request_id is not None:
                    ticket.request_id = request_id
                return Job(ticket, {self._laid_out: data}, layout.rows, None)
        return self._admit(ticket)

    def admit_all(
        self, tickets: Sequence[Ticket]
    ) -> tuple[list[Job], list[tuple[Ticket, Rejection]]]:
        """`admit` for a run of tickets routed alike (`Router.clean_tickets`), each given its
        id here: the jobs to queue, in order, and the tickets rejected, with why. Bodies of
        one length that a learned layout reads are checked together, as the rows of one
        array, and become one job (`Job.run`); the others, and any such group that is not
        laid out alike throughout, go one by one."""
        if self._laid_out is None or tickets[0].content_type != MSGPACK or len(tickets) < _TOGETHER:
            return self._admit_each(tickets)
        lengths = [len(ticket.value) for ticket in tickets]
        if min(lengths) != max(lengths):
            return self._admit_by_length(tickets, lengths)
        run = self._read_together(tickets)  # one producer's requests, usually
        if run is None:
            return self._admit_each(tickets)
        return [run], []

    def _admit_by_length(
        self, tickets: Sequence[Ticket], lengths: Sequence[int]
    ) -> tuple[list[Job], list[tuple[Ticket, Rejection]]]:
        """Bodies of several lengths: each length's group read together where it can be, the
        rest one by one; the jobs in the order of their first tickets."""
        by_length: dict[int, list[Ticket]] = {}
        for ticket, length in zip(tickets, lengths, strict=True):
            by_length.setdefault(length, []).append(ticket)
        jobs: list[Job] = []
        rejected: list[tuple[Ticket, Rejection]] = []
        for group in by_length.values():
            run = self._read_together(group) if len(group) >= _TOGETHER else None
            if run is not None:
                jobs.append(run)
                continue
            group_jobs, group_rejected = self._admit_each(group)
            jobs += group_jobs
            rejected += group_rejected
        position = {id(ticket): index for index, ticket in enumerate(tickets)}
        jobs.sort(key=lambda job: position[id(job.ticket)])
        return jobs, rejected

    def _admit_each(
        self, tickets: Sequence[Ticket]
    ) -> tuple[list[Job], list[tuple[Ticket, Rejection]]]:
        jobs: list[Job] = []
        rejected: list[tuple[Ticket, Rejection]] = []
        for ticket in tickets:
            job = self._admit_alone(ticket)
            if type(job) is Job:
                jobs.append(job)
            else:
                rejected.append((ticket, job))  # type: ignore[arg-type]
        return jobs, rejected

    def _read_together(self, tickets: Sequence[Ticket]) -> Job | None:
        """One job for tickets with bodies of one length, read by its layout as one array;
        None if it has none or some body is not laid out so."""
        layout = self._layouts.get(len(tickets[0].value))
        if layout is None:
            return None
        bodies = [ticket.value for ticket in tickets]
        ids = layout.read_all(bodies)
        if ids is None:
            return None
        if layout.id_at is None:
            for ticket in tickets:
                ticket.request_id = fallback_id(ticket)
        else:
            for ticket, request_id in zip(tickets, ids, strict=True):
                ticket.request_id = request_id
        (start, end), name = layout.data_at, self._laid_out
        assert name is not None
        run = list(tickets)
        return Job(
            run[0], {name: RawRows(bodies, start, end)}, len(run) * layout.rows, None, run=run
        )

    def _admit_alone(self, ticket: Ticket) -> Job | Rejection:
        """`admit` for a ticket of a run, given its fallback id first (its body's, if any,
        replaces it)."""
        ticket.request_id = fallback_id(ticket)
        return self.admit(ticket)

    def _admit(self, ticket: Ticket) -> Job | Rejection:
        return admit(
            ticket,
            self._inputs,
            self._outputs,
            max_rows=self._max_rows,
            max_elements=self._max_elements,
        )

    def _admit_and_learn(self, ticket: Ticket) -> Job | Rejection:
        """The full way, learning the body's layout if it was served as raw rows. A rejected
        body teaches nothing: the next of its length tries again."""
        job = self._admit(ticket)
        if isinstance(job, Job):
            layout = None
            if job.outputs is None and type(job.inputs[self._laid_out]) is memoryview:
                layout = learn(ticket.value)
            if len(self._layouts) >= _LAYOUTS:
                self._layouts.clear()
            self._layouts[len(ticket.value)] = layout
        return job


def admit(
    ticket: Ticket,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    max_rows: int,
    max_elements: int,
) -> Job | Rejection:
    """Decode and validate; every failure comes back as a Rejection, never as an exception."""
    try:
        return _admit(ticket, inputs, outputs, max_rows, max_elements)
    except _Reject as reject:
        return reject.rejection


def _admit(
    ticket: Ticket,
    specs: Sequence[TensorSpec],
    output_specs: Sequence[TensorSpec],
    max_rows: int,
    max_elements: int,
) -> Job:
    try:
        request = decode_request(ticket.value, ticket.content_type)
    except ValidationError as exc:
        raise _Reject(ErrorCode.INVALID_REQUEST, f"not a v2 inference request: {exc}") from None
    except DecodeError as exc:
        raise _Reject(ErrorCode.BAD_ENCODING, f"body is not {ticket.content_type}: {exc}") from None
    if request.id is not None:
        ticket.request_id = request.id

    tensors = request.inputs
    if len(specs) == 1 and len(tensors) == 1 and tensors[0].name == specs[0].name:
        spec, tensor = specs[0], tensors[0]
        if request.outputs is None and tensor.datatype == spec.datatype:
            # The most common case, without building anything: raw rows that fit the model
            # as they are, every output wanted. Anything else goes the general way below.
            raw = _raw_rows(spec, tensor, max_elements)
            if raw is not None and raw[0] <= max_rows and spec.value_range is None:
                return Job(ticket, {spec.name: raw[1]}, raw[0], None)
        pairs = [(spec, tensor)]  # one input, without name bookkeeping
    else:
        provided = {tensor.name: tensor for tensor in tensors}
        expected = [spec.name for spec in specs]
        if sorted(provided) != sorted(expected) or len(provided) != len(tensors):
            raise _Reject(
                ErrorCode.INVALID_INPUT,
                f"inputs {sorted(t.name for t in tensors)} do not match the model's {expected}",
            )
        pairs = [(spec, provided[spec.name]) for spec in specs]
    arrays: dict[str, np.ndarray | memoryview] = {}
    rows = -1
    for spec, tensor in pairs:
        if tensor.datatype != spec.datatype:
            raise _Reject(
                ErrorCode.INVALID_INPUT,
                f"input {spec.name!r} is {tensor.datatype}, the model takes {spec.datatype}",
            )
        raw = _raw_rows(spec, tensor, max_elements)
        if raw is not None:
            count, arrays[spec.name] = raw
        else:
            try:
                array = to_array(tensor, max_elements)
            except TensorTooLarge as exc:
                raise _Reject(ErrorCode.TOO_LARGE, str(exc)) from None
            except TensorError as exc:
                raise _Reject(ErrorCode.INVALID_INPUT, str(exc)) from None
            _check_shape(spec, array.shape)
            if spec.text:
                array = _as_text(spec, array)
            count, arrays[spec.name] = array.shape[0], array
        if rows not in (-1, count):
            raise _Reject(ErrorCode.INVALID_INPUT, "inputs disagree on the batch dimension")
        rows = count
        if spec.value_range is not None:
            _check_values(spec, arrays[spec.name])
    if rows > max_rows:
        raise _Reject(
            ErrorCode.INVALID_INPUT, f"request of {rows} rows exceeds max_batch_size {max_rows}"
        )
    for spec in specs:
        if spec.follows is not None:
            source = next(source for source in specs if source.name == spec.follows)
            _check_follows(spec, arrays[spec.name].shape, arrays[spec.follows].shape, source.shape)

    wanted = None
    if request.outputs:
        wanted = tuple(o.name for o in request.outputs)
        unknown = set(wanted) - {spec.name for spec in output_specs}
        if unknown:
            raise _Reject(ErrorCode.INVALID_INPUT, f"unknown outputs requested: {sorted(unknown)}")
    return Job(ticket=ticket, inputs=arrays, rows=rows, outputs=wanted)


def _raw_rows(spec: TensorSpec, tensor: Tensor, max_elements: int) -> tuple[int, memoryview] | None:
    """(rows, bytes) when the tensor is raw bytes of exactly the spec's fixed row shape;
    None for anything else, which `to_array` then converts or explains."""
    data, shape = tensor.data, tensor.shape
    if (
        not spec.row_bytes
        or spec.pad_value is not None
        or spec.datatype == "BOOL"  # its bytes are checked by `to_array`
        or type(data) is not memoryview
        or len(shape) != len(spec.shape) + 1
    ):
        return None
    rows = shape[0]
    if (
        rows < 1
        or tuple(shape[1:]) != spec.shape
        or data.nbytes != rows * spec.row_bytes
        or rows * spec.row_elements > max_elements
    ):
        return None
    return rows, data


def _check_shape(spec: TensorSpec, shape: tuple[int, ...]) -> None:
    if len(shape) == len(spec.shape) + 1 and shape[1:] == spec.shape and shape[0] >= 1:
        return  # the common case, without a loop
    if not (shape and shape[0] >= 1 and spec.fits(shape[1:])):
        raise _Reject(
            ErrorCode.INVALID_INPUT,
            f"input {spec.name!r} has shape {list(shape)}, the model takes "
            f"{batch_shape(spec.shape)}",
        )
    if 0 in shape[1:] and any(
        want == -1 and got == 0 for want, got in zip(spec.shape, shape[1:], strict=True)
    ):
        # Padded into a batch, an empty row is all padding: a transformer's mean over no
        # tokens, and a failed call for every request beside it.
        raise _Reject(
            ErrorCode.INVALID_INPUT,
            f"input {spec.name!r} has shape {list(shape)}: a variable dimension of 0",
        )
    if spec.max_shape is not None and any(
        got > most >= 0 for most, got in zip(spec.max_shape, shape[1:], strict=True)
    ):
        raise _Reject(
            ErrorCode.INVALID_INPUT,
            f"input {spec.name!r} has shape {list(shape)}, the model takes at most "
            f"{batch_shape(spec.max_shape)}",
        )


def _as_text(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """A string input's values as text: msgpack carries BYTES as bytes, which the model would
    read as their repr ("b'...'")."""
    values = array.ravel().tolist()
    if not any(type(value) is bytes for value in values):
        return array
    try:
        texts = [value.decode() if type(value) is bytes else value for value in values]
    except UnicodeDecodeError:
        raise _Reject(
            ErrorCode.INVALID_INPUT,
            f"input {spec.name!r} holds bytes that are not UTF-8: the model takes text",
        ) from None
    converted = np.empty(len(texts), dtype=object)
    converted[:] = texts
    return converted.reshape(array.shape)


def _check_follows(
    spec: TensorSpec, shape: tuple[int, ...], source: tuple[int, ...], varies: tuple[int, ...]
) -> None:
    """Padded apart, an attention mask shorter than its ids would pass alone and be padded
    to fit in a batch: the same request would get one answer or another by its company.
    Only the lengths it follows must agree (`varies`: the source's declared row shape)."""
    lengths = zip(shape[1 : len(source)], source[1:], varies, strict=False)
    if any(own != theirs for own, theirs, declared in lengths if declared == -1):
        raise _Reject(
            ErrorCode.INVALID_INPUT,
            f"input {spec.name!r} has shape {list(shape)}, unlike {spec.follows!r} "
            f"{list(source)}, whose length it follows",
        )


def _check_values(spec: TensorSpec, data: np.ndarray | memoryview) -> None:
    assert spec.value_range is not None
    values = np.frombuffer(data, spec.dtype) if type(data) is memoryview else data
    if not values.size:
        return
    low, high = spec.value_range
    smallest, largest = values.min(), values.max()
    if not low <= smallest <= largest <= high:  # NaN compares false too
        worst = smallest if not low <= smallest else largest
        raise _Reject(
            ErrorCode.INVALID_INPUT,
            f"input {spec.name!r} holds {worst}, outside the model's range {_shown(low, high)}",
        )


def _shown(*bounds: float) -> str:
    """Bounds as written: whole numbers exactly (INT64's highest has no float), others short."""
    return "[" + ", ".join(str(b) if isinstance(b, int) else f"{b:g}" for b in bounds) + "]"
