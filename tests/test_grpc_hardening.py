"""The gRPC front end and the protocol core against hostile or careless clients.

Unit: TensorProto decoding checks sizes before it allocates. Component: an in-process GrpcServer
(threaded and grpc.aio) answers client mistakes with INVALID_ARGUMENT/FAILED_PRECONDITION, never
INTERNAL or UNKNOWN, and cuts long messages as TF Serving does.
"""

from __future__ import annotations

import tracemalloc

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    input_pb2,
    model_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from serving import config_files
from serving.batching import BatchingOptions, BatchScheduler
from serving.core import DataPlane
from serving.errors import MESSAGE_LIMIT, ServingError, invalid_argument
from serving.grpc_server import GrpcServer
from serving.manager import ModelManager
from serving.tensors import BROADCAST_LIMIT_BYTES, proto_to_ndarray
from tests.model_fixtures import write_tf2
from training.multiworker import free_ports

PREDICT = "/tensorflow.serving.PredictionService/Predict"


def tensor(dtype=types_pb2.DT_FLOAT, dims=(1,), **fields) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype, **fields)
    for d in dims:
        proto.tensor_shape.dim.add(size=d)
    return proto


@pytest.mark.parametrize("proto, words", [
    (tensor(dims=[250_000_000], float_val=[1.0]), "sends 1"),  # the 35-byte request
    (tensor(dims=[8000, 28, 28, 1], float_val=[1.0]), "sends 1"),
    (tensor(dims=[2**40], float_val=[1.0]), "sends 1"),
    (tensor(dims=[2**40], tensor_content=b"abcd"), "sends 4 bytes of tensor_content"),
    (tensor(dims=[3], tensor_content=b"abcd"), "12 bytes"),
    (tensor(dims=[2], float_val=[1.0, 2.0, 3.0]), "sends 3 values"),
    (tensor(dims=[-1], float_val=[1.0]), "unknown dimension"),
    (tensor(dtype=types_pb2.DT_RESOURCE), "DT_RESOURCE"),
    (tensor(dtype=types_pb2.DT_VARIANT), "DT_VARIANT"),
    (tensor(dtype=types_pb2.DT_FLOAT_REF), "DT_FLOAT_REF"),
    (tensor(dtype=999), "enum value 999"),
    (tensor(dtype=types_pb2.DT_INVALID), "DT_INVALID"),
    (tensor(dtype=types_pb2.DT_STRING, dims=[1], tensor_content=b"ab"), "string_val"),
    (tensor(dims=[1] * 100, float_val=[1.0]), "rank 100"),
])
def test_malformed_tensors_are_invalid_argument_naming_the_input_without_allocating(proto, words):
    tracemalloc.start()
    try:
        with pytest.raises(ServingError) as info:
            proto_to_ndarray(proto, "x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x'" in info.value.message and words in info.value.message
    assert peak < 1 << 20


def test_declared_size_over_the_request_limit_is_refused_before_decoding():
    proto = tensor(dims=[1000], float_val=[1.0] * 1000)
    assert proto_to_ndarray(proto, "x", max_bytes=4000).shape == (1000,)
    with pytest.raises(ServingError, match="over the server's request limit of 3999 bytes"):
        proto_to_ndarray(proto, "x", max_bytes=3999)


def typed_proto(value: np.ndarray) -> tensor_pb2.TensorProto:
    """`value` in its typed *_val field (what TF Serving's clients send), not tensor_content."""
    proto = tf.make_tensor_proto(value)
    if not proto.tensor_content:
        return proto
    proto.ClearField("tensor_content")
    flat = value.ravel()
    if value.dtype == np.float16:
        proto.half_val.extend(flat.view(np.uint16).tolist())
    elif value.dtype.kind == "c":
        proto.scomplex_val.extend(np.stack([flat.real, flat.imag], 1).ravel().tolist())
    else:
        field = {"f": "float_val" if value.dtype == np.float32 else "double_val", "b": "bool_val"}.get(
            value.dtype.kind) or {np.int64: "int64_val", np.uint32: "uint32_val", np.uint64: "uint64_val"}.get(
            value.dtype.type, "int_val")
        getattr(proto, field).extend(flat.tolist())
    return proto


def test_typed_fields_decode_as_tensorflow_does():
    cases = [np.array([[1.5, -2.0]], np.float32), np.array([1e300], np.float64), np.array([-3, 7], np.int32),
             np.array([-3], np.int16), np.array([-3], np.int8), np.array([250], np.uint8), np.array([65535], np.uint16),
             np.array([2**40], np.int64), np.array([2**32 - 1], np.uint32), np.array([2**64 - 1], np.uint64),
             np.array([True, False]), np.array([1.5, -2.0], np.float16), np.array([1 + 2j], np.complex64),
             np.array([[b"a", b"bc"]], dtype=object), np.array(4.0, np.float32)]
    for value in cases:
        proto = typed_proto(value)
        decoded = proto_to_ndarray(proto, "x")
        assert decoded.dtype == tf.make_ndarray(proto).dtype and decoded.shape == value.shape
        assert decoded.tolist() == tf.make_ndarray(proto).tolist() == value.tolist()


def test_a_small_broadcast_fills_with_the_last_value_as_tensorflow_does():
    filled = tf.make_tensor_proto(0.5, shape=[2, 3])  # one float_val, shape [2, 3]
    assert proto_to_ndarray(filled).tolist() == [[0.5] * 3] * 2
    limit = BROADCAST_LIMIT_BYTES // 4
    assert proto_to_ndarray(tensor(dims=[limit], float_val=[1.0, 2.0]))[-1] == 2.0
    with pytest.raises(ServingError, match="sends 2"):
        proto_to_ndarray(tensor(dims=[limit + 1], float_val=[1.0, 2.0]))


def test_status_messages_are_cut_at_1024_characters_like_tf_serving():
    assert invalid_argument("x" * MESSAGE_LIMIT).message == "x" * MESSAGE_LIMIT
    assert invalid_argument("y" * 100_000).message == "y" * MESSAGE_LIMIT + "...TRUNCATED"


# ---- in-process gRPC server ----------------------------------------------------------------
class FloatInputs(tf.Module):
    """A signature whose input is named `inputs` but is float: not a Regress signature."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="inputs")])
    def regress(self, inputs):
        return {"outputs": inputs * 2.0}


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    write_tf2(root / "half" / "1")
    module = FloatInputs()
    tf.saved_model.save(module, str(root / "float_inputs" / "1"), signatures={"serving_default": module.regress})
    return root


@pytest.fixture(scope="module", params=["threaded", "aio"])
def grpc_address(request, model_root):
    """A GrpcServer on the fixture models: the threaded server, and grpc.aio as with --enable_batching."""
    config = config_files.single_model_config("half", str(model_root / "half"))
    config.model_config_list.config.add(name="float_inputs", base_path=str(model_root / "float_inputs"))
    manager = ModelManager()
    manager.reload(config)
    batcher = BatchScheduler(BatchingOptions(max_batch_size=8, batch_timeout_micros=1000)) \
        if request.param == "aio" else None
    core = DataPlane(manager, batcher=batcher)
    (port,) = free_ports(1)
    server = GrpcServer(core, [f"127.0.0.1:{port}"], [("grpc.max_receive_message_length", 1 << 20)], 4, True)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)
    if batcher:
        batcher.stop()


def call_raw(channel, method: str, body: bytes):
    """Sends `body` as the request bytes, whatever they are (a generic stub, no serializer)."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)(body, timeout=30)


@pytest.mark.parametrize("body", [b"\xff\xff\xff\xff", b"\x0a\x05abc", b"\x12\x80\x80\x80\x80\x10"])
def test_undecodable_request_bytes_are_invalid_argument(grpc_address, body):
    with grpc.insecure_channel(grpc_address) as channel:
        for method in (PREDICT, "/tensorflow.serving.PredictionService/GetModelMetadata",
                       "/tensorflow.serving.ModelService/GetModelStatus"):
            with pytest.raises(grpc.RpcError) as info:
                call_raw(channel, method, body)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value.details())
            assert "not a valid" in info.value.details()


def predict_request(name="half", signature="", **inputs) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=name, signature_name=signature))
    for alias, proto in inputs.items():
        request.inputs[alias].CopyFrom(proto)
    return request


def test_client_mistakes_are_never_internal_or_unknown(grpc_address):
    regress = regression_pb2.RegressionRequest(model_spec=model_pb2.ModelSpec(name="float_inputs"))
    regress.input.CopyFrom(input_pb2.Input())
    regress.input.example_list.examples.add()
    with grpc.insecure_channel(grpc_address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        cases = [
            (stub.Predict, predict_request(x=tensor(dims=[250_000_000], float_val=[1.0])),
             grpc.StatusCode.INVALID_ARGUMENT, "input 'x'"),
            (stub.Predict, predict_request(x=tensor(dtype=types_pb2.DT_VARIANT)), grpc.StatusCode.INVALID_ARGUMENT,
             "DT_VARIANT"),
            (stub.Predict, predict_request(x=tensor(dims=[2**19], float_val=[1.0])),  # 2 MiB declared
             grpc.StatusCode.INVALID_ARGUMENT, "request limit of 1048576 bytes"),
            (stub.Predict, predict_request(signature="__saved_model_init_op"), grpc.StatusCode.FAILED_PRECONDITION,
             "initializer"),
            (stub.Regress, regress, grpc.StatusCode.INVALID_ARGUMENT, "call it with Predict"),
        ]
        for method, request, code, words in cases:
            with pytest.raises(grpc.RpcError) as info:
                method(request, timeout=30)
            assert info.value.code() == code and words in info.value.details(), info.value.details()


def test_a_huge_name_comes_back_truncated(grpc_address):
    name = "n" * 100_000
    with grpc.insecure_channel(grpc_address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(predict_request(name=name, x=tensor(float_val=[1.0])), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details().endswith("...TRUNCATED") and len(info.value.details()) == MESSAGE_LIMIT + 12
