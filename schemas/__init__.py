"""The wire contract: v2 inference bodies, Kafka headers, error codes and tensor conversions.

Nothing in `surge.schemas` imports from the rest of Surge; everything else imports from here.
"""

from surge.schemas import headers
from surge.schemas.codec import (
    DecodeError,
    ValidationError,
    decode_error,
    decode_request,
    decode_response,
    encode,
    json_schema,
)
from surge.schemas.errors import ErrorCode
from surge.schemas.frames import ResponseFrames
from surge.schemas.headers import JSON, MSGPACK, Status
from surge.schemas.inference import (
    MAX_ID_LENGTH,
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    RequestedOutput,
    Tensor,
    key_id,
)
from surge.schemas.tensors import (
    DATATYPES,
    TensorError,
    TensorTooLarge,
    datatype_of,
    from_array,
    raw_rows,
    row_tensors,
    to_array,
)

__all__ = [
    "MAX_ID_LENGTH",
    "key_id",
    # bodies
    "InferenceRequest",
    "InferenceResponse",
    "ErrorResponse",
    "RequestedOutput",
    "Tensor",
    # codes and headers
    "ErrorCode",
    "Status",
    "headers",
    "JSON",
    "MSGPACK",
    # encoding
    "encode",
    "ResponseFrames",
    "decode_request",
    "decode_response",
    "decode_error",
    "json_schema",
    "DecodeError",
    "ValidationError",
    # tensors
    "DATATYPES",
    "TensorError",
    "TensorTooLarge",
    "datatype_of",
    "from_array",
    "raw_rows",
    "row_tensors",
    "to_array",
]
