"""Tensor codecs shared by the server and the clients: numpy <-> TensorProto, and TF Serving's JSON.

TensorProto: both `tensor_content` and the typed `*_val` fields are read (clients send either).
Responses are written as TF Serving writes them: in the typed field of their dtype (`float_val`,
`int64_val`, `bool_val`, `string_val`, ...) by default, in `tensor_content` only with
--enable_serialization_as_tensor_content (see ndarray_to_proto).
JSON: values follow the signature's dtype; binary strings travel as {"b64": "..."} (standard
base64), and outputs whose alias ends in `_bytes` are written that way, as TF Serving does.
"""

from __future__ import annotations

import base64
import binascii
import json
import math

import numpy as np
import orjson
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from serving.errors import invalid_argument

_NUMPY_TO_ENUM = {np.dtype(tf.dtypes.as_dtype(e).as_numpy_dtype): e for e in (
    types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_INT32, types_pb2.DT_INT64, types_pb2.DT_UINT8,
    types_pb2.DT_INT8, types_pb2.DT_INT16, types_pb2.DT_UINT16, types_pb2.DT_BOOL, types_pb2.DT_HALF,
    types_pb2.DT_UINT32, types_pb2.DT_UINT64)}
_ENUM_TO_NUMPY = {e: d for d, e in _NUMPY_TO_ENUM.items()}
MAX_DIMS = 64  # numpy's limit on an array's dimensions


# The typed field Tensor::AsProtoField (tensorflow/core/framework/tensor.cc, ProtoHelper<T>)
# writes per dtype. Fixed-width fields (float, double) and bool (0/1 is a one-byte
# varint) are the array's little-endian bytes on the wire, so they are written as one packed
# field: 50k floats take 0.03 ms instead of 2.5 ms through a Python list.
_PACKED_FIELDS = {  # numpy dtype -> (TensorProto field number, wire dtype)
    np.dtype(np.float32): (5, "<f4"),  # float_val
    np.dtype(np.float64): (6, "<f8"),  # double_val
    np.dtype(np.bool_): (11, "u1"),  # bool_val
}
_VARINT_FIELDS = {  # numpy dtype -> repeated field; int8/16 and uint8/16 widen to int_val
    np.dtype(np.int32): "int_val", np.dtype(np.int16): "int_val", np.dtype(np.int8): "int_val",
    np.dtype(np.uint8): "int_val", np.dtype(np.uint16): "int_val",
    np.dtype(np.int64): "int64_val", np.dtype(np.uint32): "uint32_val", np.dtype(np.uint64): "uint64_val",
}
_LENGTH_DELIMITED = 2  # protobuf wire type of a packed repeated field


def ndarray_to_proto(array: np.ndarray, out: tensor_pb2.TensorProto | None = None,
                     tensor_content: bool = False) -> tensor_pb2.TensorProto:
    """`array` as a TensorProto, written into `out` (e.g. a response's output entry) when given.

    Values go to the typed field of their dtype, as TF Serving's Predict writes outputs by default
    (`Tensor::AsProtoField`); `tensor_content=True` writes the raw bytes instead, as it does with
    --enable_serialization_as_tensor_content and as tf.make_tensor_proto writes requests.
    Strings always travel in `string_val`.
    """
    array = np.asarray(array)
    enum = _NUMPY_TO_ENUM.get(array.dtype)
    proto = tensor_pb2.TensorProto() if out is None else out
    if enum is None:  # strings (string_val) and rare types: TensorFlow's own (slower) encoder
        proto.CopyFrom(tf.make_tensor_proto(array))
        return proto
    proto.dtype = enum
    proto.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape)
    if tensor_content:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
    elif array.dtype in _PACKED_FIELDS:
        number, wire_dtype = _PACKED_FIELDS[array.dtype]
        data = np.ascontiguousarray(array, dtype=wire_dtype).tobytes()
        proto.MergeFromString(_varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(data)) + data)
    elif array.dtype == np.float16:  # half_val holds each value's 16 bits
        proto.half_val.extend(array.view(np.uint16).ravel().tolist())
    else:
        getattr(proto, _VARINT_FIELDS[array.dtype]).extend(array.ravel().tolist())
    return proto


def _varint(value: int) -> bytes:
    """`value` in protobuf's base-128 varint encoding."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# What a request tensor may carry, by dtype: its numpy dtype and the typed field its values travel
# in when it does not use tensor_content (tensor.proto); HALF and BFLOAT16 travel as 16-bit
# patterns in the int32 half_val field, complex numbers as (real, imaginary) pairs.
_WIRE = {e: (d, f) for e, d, f in (
    (types_pb2.DT_FLOAT, np.float32, "float_val"), (types_pb2.DT_DOUBLE, np.float64, "double_val"),
    (types_pb2.DT_INT32, np.int32, "int_val"), (types_pb2.DT_INT16, np.int16, "int_val"),
    (types_pb2.DT_INT8, np.int8, "int_val"), (types_pb2.DT_UINT8, np.uint8, "int_val"),
    (types_pb2.DT_UINT16, np.uint16, "int_val"), (types_pb2.DT_INT64, np.int64, "int64_val"),
    (types_pb2.DT_UINT32, np.uint32, "uint32_val"), (types_pb2.DT_UINT64, np.uint64, "uint64_val"),
    (types_pb2.DT_BOOL, np.bool_, "bool_val"), (types_pb2.DT_HALF, np.float16, "half_val"),
    (types_pb2.DT_BFLOAT16, tf.bfloat16.as_numpy_dtype, "half_val"),
    (types_pb2.DT_COMPLEX64, np.complex64, "scomplex_val"), (types_pb2.DT_COMPLEX128, np.complex128, "dcomplex_val"),
    (types_pb2.DT_STRING, np.object_, "string_val"))}
# TensorFlow fills a tensor that sends fewer typed values than its shape holds with the last
# value (zeros when none; tensor.cc FromProtoField), and tf.make_tensor_proto(0.0, shape=[3])
# relies on it. Accepted up to this size: beyond it a 35-byte request could allocate gigabytes.
BROADCAST_LIMIT_BYTES = 1 << 20
MAX_RANK = 64  # numpy's limit (TensorFlow's is 254)


def proto_to_ndarray(proto: tensor_pb2.TensorProto, alias: str = "", max_bytes: int | None = None) -> np.ndarray:
    """The array a TensorProto holds, from `tensor_content` or the typed `*_val` fields.

    Sizes are checked before anything is allocated: the declared shape must match the bytes or
    values sent (or be a small broadcast, see BROADCAST_LIMIT_BYTES) and decode to at most
    `max_bytes` (the server's request limit) when given. Mistakes are INVALID_ARGUMENT naming
    the input.
    """
    name = f"input '{alias}'"
    try:
        return _decode(proto, name, max_bytes)
    except (TypeError, ValueError) as e:  # numpy's own limits, e.g. an empty [0, 2**62, 2**62]
        raise invalid_argument(f"{name} is not a valid TensorProto: {e}") from None


def _decode(proto: tensor_pb2.TensorProto, name: str, max_bytes: int | None) -> np.ndarray:
    dtype, field = _wire_type(proto.dtype, name)
    shape = _checked_shape(proto, name)
    count = math.prod(shape)
    size = count * dtype.itemsize  # a string element is a pointer
    if max_bytes is not None and size > max_bytes:
        raise invalid_argument(f"{name} declares shape {shape}, {size} bytes: over the server's request "
                               f"limit of {max_bytes} bytes")
    if proto.tensor_content:
        return _from_content(proto, dtype, shape, size, name)
    values = getattr(proto, field)
    sent = len(values) // (2 if dtype.kind == "c" else 1)
    if sent > count:
        raise invalid_argument(f"{name} sends {sent} values but its shape {shape} holds {count}")
    if sent < count and size > BROADCAST_LIMIT_BYTES:
        raise invalid_argument(f"{name} declares shape {shape} ({count} values) but sends {sent}; send all "
                               f"of them (filling with the last value is accepted up to "
                               f"{BROADCAST_LIMIT_BYTES} bytes)")
    if sent < count or dtype.kind in "Oc" or proto.dtype == types_pb2.DT_BFLOAT16:
        return tf.make_ndarray(proto)  # rare in requests, and now known to be small
    values = np.asarray(values)  # a buffer copy, ~400x faster than make_ndarray's Python loop
    if proto.dtype == types_pb2.DT_HALF:
        values = values.astype(np.uint16).view(np.float16)
    return values.astype(dtype, copy=False).reshape(shape)


def _wire_type(dtype_enum: int, name: str) -> tuple[np.dtype, str]:
    if dtype_enum in _WIRE:
        dtype, field = _WIRE[dtype_enum]
        return np.dtype(dtype), field
    label = types_pb2.DataType.Name(dtype_enum) if dtype_enum in types_pb2.DataType.values() else \
        f"enum value {dtype_enum}"
    raise invalid_argument(f"{name} has dtype {label}, which a request cannot carry; send a numeric, bool, "
                           "complex or string tensor")


def _checked_shape(proto: tensor_pb2.TensorProto, name: str) -> list[int]:
    if proto.tensor_shape.unknown_rank:
        raise invalid_argument(f"{name} has an unknown rank in its TensorProto shape; send its full shape")
    shape = [d.size for d in proto.tensor_shape.dim]
    if len(shape) > MAX_RANK:
        raise invalid_argument(f"{name} has rank {len(shape)}; at most {MAX_RANK} dimensions are supported")
    if any(d < 0 for d in shape):
        raise invalid_argument(f"{name} has an unknown dimension in its TensorProto shape {shape}")
    return shape


def _from_content(proto: tensor_pb2.TensorProto, dtype: np.dtype, shape: list[int], size: int,
                  name: str) -> np.ndarray:
    if dtype.kind == "O":
        raise invalid_argument(f"{name} is a string tensor in tensor_content; send strings in string_val")
    if len(proto.tensor_content) != size:
        raise invalid_argument(f"{name} declares shape {shape} ({size} bytes of "
                               f"{types_pb2.DataType.Name(proto.dtype)}) but sends {len(proto.tensor_content)} "
                               "bytes of tensor_content")
    return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape)


# ---- JSON (REST) ------------------------------------------------------------------------------
# orjson writes numpy arrays directly (float32 in its shortest form) and parses ~5x faster than
# the standard library; the standard library only steps in for NaN/Infinity, which TF Serving
# accepts and writes but strict JSON (and so orjson) does not.
def dumps(value) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def loads(text: bytes):
    """The JSON value of `text`; a ServingError (INVALID_ARGUMENT) naming what is wrong if it is
    not JSON, nests deeper than orjson's 1,024 levels, or holds a lone UTF-16 surrogate."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        strict_error = e
    try:
        value = json.loads(text)  # NaN, Infinity
    except RecursionError:
        raise invalid_argument("JSON Parse error: the value is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise invalid_argument(f"JSON Parse error: {strict_error}") from None
    try:  # the standard library lets lone surrogates ("\ud800") through; nothing downstream can encode them
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise invalid_argument(f"JSON Parse error: {strict_error}") from None
    return value


def json_to_ndarray(value, dtype_enum: int, alias: str) -> np.ndarray:
    """Converts a JSON value to an array of the signature's dtype, with a clear error if it can't."""
    try:
        if dtype_enum == types_pb2.DT_STRING:
            return np.asarray(decode_strings(value, alias), dtype=object)
        array = np.asarray(value)
    except RecursionError:
        raise invalid_argument(f"input '{alias}' is nested too deeply") from None
    except ValueError as e:
        if "maximum number of dimension" in str(e):
            raise invalid_argument(f"input '{alias}' is nested more than {MAX_DIMS} lists deep: a tensor "
                                   f"has at most {MAX_DIMS} dimensions") from None
        raise invalid_argument(f"input '{alias}' is a ragged list: every element must have the same shape") from None
    dtype = np.dtype(tf.dtypes.as_dtype(dtype_enum).as_numpy_dtype)
    if array.dtype == object:
        raise invalid_argument(f"input '{alias}' is a ragged list or mixes types: every element must be a "
                               f"number of the same shape ({tf.dtypes.as_dtype(dtype_enum).name})")
    if array.dtype.kind in "US":
        raise invalid_argument(f"input '{alias}' has string values but the signature expects "
                               f"{tf.dtypes.as_dtype(dtype_enum).name} numbers")
    if dtype.kind in "iub" and array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise invalid_argument(f"input '{alias}' has NaN or Infinity but the signature expects "
                                   f"{tf.dtypes.as_dtype(dtype_enum).name}")
        if np.any(array != np.round(array)):
            raise invalid_argument(f"input '{alias}' has fractional values but the signature expects "
                                   f"{tf.dtypes.as_dtype(dtype_enum).name}")
    return array.astype(dtype, copy=False)


def decode_strings(value, alias: str):
    if isinstance(value, list):
        return [decode_strings(v, alias) for v in value]
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise invalid_argument(f"input '{alias}': a binary value must be {{\"b64\": \"<base64>\"}}")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except binascii.Error:
            raise invalid_argument(f"input '{alias}': {{\"b64\": ...}} is not valid standard base64 "
                                   "(URL-safe '-' and '_' are not accepted; use '+' and '/')") from None
    if isinstance(value, str):
        return value.encode()
    raise invalid_argument(f"input '{alias}' expects strings; got {type(value).__name__}")


def ndarray_to_json(array: np.ndarray, alias: str):
    """The JSON value TF Serving writes for an output tensor."""
    if array.dtype == object or array.dtype.kind in "SU":
        encode = (lambda b: {"b64": base64.b64encode(b).decode()}) if alias.endswith("_bytes") else \
            (lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b))
        return np.vectorize(encode, otypes=[object])(array).tolist() if array.size else array.tolist()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return orjson.Fragment(json.dumps(array.tolist()).encode())  # writes NaN / Infinity
    if array.dtype.kind in "biuf" and array.dtype.itemsize <= 8:
        # serialized by dumps() without Python lists; a 0-d row value as a numpy scalar
        return np.ascontiguousarray(array) if array.ndim else array[()]
    return array.tolist()
