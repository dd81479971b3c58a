"""The gRPC front end and the protocol core against hostile or careless clients.

Unit: TensorProto decoding checks sizes before it allocates. Component: an in-process GrpcServer
(threaded and grpc.aio) answers client mistakes with INVALID_ARGUMENT/FAILED_PRECONDITION, never
INTERNAL or UNKNOWN, and cuts long messages as TF Serving does. End to end (slow): a seeded fuzz
of every method against a real server process, with and without --enable_batching; ports and
sockets in use; TLS on the unix socket; SIGTERM with a call in flight.
"""

from __future__ import annotations

import collections
import json
import random
import re
import shutil
import signal
import time
import tracemalloc
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    input_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

import aekit_cli
from serving import config_files
from serving.batching import BatchingOptions, BatchScheduler
from serving.core import DataPlane
from serving.errors import MESSAGE_LIMIT, ServingError, invalid_argument
from serving.grpc_server import GrpcServer
from serving.manager import ModelManager
from serving.tensors import BROADCAST_LIMIT_BYTES, proto_to_ndarray
from tests.model_fixtures import write_tf2
from tests.server_process import running_server, self_signed_tls
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
    (tensor(dims=[0, 2**62, 2**62]), "not a valid TensorProto"),  # empty, yet too big for numpy
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
            assert "not a valid tensorflow.serving." in info.value.details()


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


# ---- a real server process: fuzz, ports, socket, TLS, SIGTERM -------------------------------
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
FUZZ_REQUESTS = 4000
LIMIT_BYTES = 1 << 20  # --max_request_bytes of the fuzzed server


def serve_config(root, extra: str = "") -> str:
    return (f'model_config_list {{ config {{ name: "half" base_path: "{root / "half"}" model_platform: "tensorflow" }}\n'
            f'config {{ name: "float_inputs" base_path: "{root / "float_inputs"}" model_platform: "tensorflow" }}\n'
            f'{extra} }}\n')


@pytest.fixture(scope="module", params=["threaded", "batching"])
def fuzz_server(request, model_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    config = folder / "models.config"
    config.write_text(serve_config(model_root))
    flags = [f"--model_config_file={config}", f"--max_request_bytes={LIMIT_BYTES}",
             f"--grpc_socket_path={folder / 'grpc.sock'}", "--enable_grpc_healthcheck_service"]
    if request.param == "batching":
        batching = folder / "batching.config"
        batching.write_text("max_batch_size { value: 16 }\nbatch_timeout_micros { value: 2000 }\n"
                            "max_enqueued_batches { value: 1000 }\n")
        flags += ["--enable_batching", f"--batching_parameters_file={batching}"]
    with running_server(flags, folder / "server.log", ["half", "float_inputs"]) as server:
        server.socket_path, server.kind = folder / "grpc.sock", request.param
        yield server


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident memory (VmHWM): catches a transient 1 GB allocation too."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


class Fuzzer:
    """Seeded mixes of valid and malformed calls to every TF Serving method."""

    DIMS = [0, 1, 1, 2, 3, 7, 28, 2**31, 2**40, 2**62, -1, -7]
    DTYPES = [types_pb2.DT_FLOAT] * 6 + list(range(-3, 30)) + [101, 120, 999]
    NAMES = ["half", "half", "float_inputs", "", "nope", "h" * 100_000, "half\x00", "\u00e9"]
    SIGNATURES = ["", "serving_default", "__saved_model_init_op", "classify_x_to_y", "regress_x_to_y",
                  "regress_x2_to_y3", "nope", "s" * 5000]

    def __init__(self, seed: int):
        self.random = random.Random(seed)

    def pick(self, items):
        return items[self.random.randrange(len(items))]

    def spec(self) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=self.pick(self.NAMES), signature_name=self.pick(self.SIGNATURES))
        kind = self.random.random()
        if kind < 0.15:
            spec.version.value = self.pick([1, 0, -1, 2**63 - 1, -(2**63), 7])
        elif kind < 0.25:
            spec.version_label = self.pick(["stable", "", "x" * 3000])
        return spec

    def tensor(self) -> tensor_pb2.TensorProto:
        if self.random.random() < 0.5:  # a valid x
            rows = self.random.randint(1, 8)
            return typed_proto(np.full((rows, 1), self.random.random(), np.float32)) \
                if self.random.random() < 0.5 else tf.make_tensor_proto(np.ones((rows, 1), np.float32))
        proto = tensor(self.pick(self.DTYPES), [self.pick(self.DIMS) for _ in range(self.random.randint(0, 4))])
        if self.random.random() < 0.1:
            proto.tensor_shape.unknown_rank = True
        choice = self.random.random()
        if choice < 0.4:
            proto.tensor_content = self.random.randbytes(self.pick([0, 1, 4, 8, 12, 4096]))
        elif choice < 0.7:
            proto.float_val.extend([self.random.random()] * self.pick([0, 1, 2, 3, 100]))
        elif choice < 0.8:
            proto.string_val.extend([self.random.randbytes(5)] * self.pick([0, 1, 2]))
        elif choice < 0.9:
            proto.int64_val.extend([2**62, -1])
        return proto

    def predict(self) -> predict_pb2.PredictRequest:
        request = predict_pb2.PredictRequest(model_spec=self.spec())
        if self.random.random() < 0.7:
            request.model_spec.name, request.model_spec.signature_name = "half", self.pick(["", "serving_default"])
        for _ in range(self.pick([1, 1, 1, 0, 2])):
            request.inputs[self.pick(["x", "x", "x", "inputs", "y", ""])].CopyFrom(self.tensor())
        if self.random.random() < 0.1:
            request.output_filter.append(self.pick(["y", "nope", ""]))
        return request

    def examples_input(self) -> input_pb2.Input:
        message = input_pb2.Input()
        if self.random.random() < 0.1:
            return message
        examples = message.example_list.examples if self.random.random() < 0.7 else \
            message.example_list_with_context.examples
        for _ in range(self.random.randint(0, 3)):
            features = examples.add().features.feature
            kind = self.random.random()
            if kind < 0.6:
                features["x"].float_list.value.append(self.random.random())
            elif kind < 0.8:
                features["x"].bytes_list.value.append(b"not a float")
            else:
                features[self.pick(["x2", "other"])].int64_list.value.extend([1, 2])
        return message

    def call(self) -> tuple[str, bytes, type]:
        """(method path, request bytes, response class) for one call."""
        kind = self.random.random()
        if kind < 0.45:
            return PREDICT, self.predict().SerializeToString(), predict_pb2.PredictResponse
        if kind < 0.6:
            body = self.predict().SerializeToString()
            mangled = self.pick([self.random.randbytes(self.random.randint(1, 64)), body[: len(body) // 2],
                                 bytes(b ^ 0xFF if self.random.random() < 0.05 else b for b in body)])
            return self.pick([PREDICT, CLASSIFY, REGRESS, METADATA, STATUS, RELOAD]), mangled, None
        if kind < 0.72:
            request = classification_pb2.ClassificationRequest(model_spec=self.spec(), input=self.examples_input())
            return CLASSIFY, request.SerializeToString(), None
        if kind < 0.84:
            request = regression_pb2.RegressionRequest(model_spec=self.spec(), input=self.examples_input())
            return REGRESS, request.SerializeToString(), None
        if kind < 0.9:
            request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=self.spec())
            request.metadata_field.extend(self.pick([["signature_def"], [], ["nope"]]))
            return METADATA, request.SerializeToString(), None
        if kind < 0.95:
            return STATUS, get_model_status_pb2.GetModelStatusRequest(model_spec=self.spec()).SerializeToString(), None
        request = inference_pb2.MultiInferenceRequest(input=self.examples_input())
        for _ in range(self.random.randint(0, 3)):
            request.tasks.add(model_spec=self.spec(), method_name=self.pick(
                ["tensorflow/serving/classify", "tensorflow/serving/regress", "nope"]))
        return MULTI, request.SerializeToString(), None

    def bad_reload(self) -> bytes:
        """A reload that must fail and leave the model set as it is."""
        request = model_management_pb2.ReloadConfigRequest()
        models = request.config.model_config_list.config
        choice = self.random.random()
        if choice < 0.5:
            models.add(name="half", base_path="/x")
            models.add(name="half", base_path="/y")  # duplicate
        else:
            models.add(name="half")  # no base_path
        return request.SerializeToString()


CLASSIFY = "/tensorflow.serving.PredictionService/Classify"
REGRESS = "/tensorflow.serving.PredictionService/Regress"
METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
MULTI = "/tensorflow.serving.PredictionService/MultiInference"
STATUS = "/tensorflow.serving.ModelService/GetModelStatus"
RELOAD = "/tensorflow.serving.ModelService/HandleReloadConfigRequest"


def valid_predict_bytes() -> bytes:
    return predict_request(x=tf.make_tensor_proto(np.array([[2.0], [3.0]], np.float32))).SerializeToString()


@pytest.mark.slow
def test_fuzzed_grpc_calls_never_answer_internal_and_leave_the_server_as_it_was(fuzz_server):
    fuzzer = Fuzzer(seed=13)
    with grpc.insecure_channel(fuzz_server.grpc_address, options=[("grpc.max_send_message_length", 2**31 - 1)]) \
            as channel:
        before = call_raw(channel, PREDICT, valid_predict_bytes())
        for _ in range(50):  # warm the model and the allocator before the memory baseline
            call_raw(channel, PREDICT, valid_predict_bytes())
        baseline = peak_rss_kib(fuzz_server.proc.pid)
        calls = [fuzzer.call() for _ in range(FUZZ_REQUESTS)]
        calls[::100] = [(RELOAD, fuzzer.bad_reload(), None)] * len(calls[::100])

        def send(call):
            method, body, _ = call
            try:
                reply = call_raw(channel, method, body)
            except grpc.RpcError as e:
                return e.code(), method, e.details()[:200]
            if method == RELOAD:
                status = model_management_pb2.ReloadConfigResponse.FromString(reply).status
                return ("reload refused" if status.error_code else "reload applied"), method, status.error_message
            return grpc.StatusCode.OK, method, ""

        started = time.monotonic()
        with futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(send, calls))
        elapsed = time.monotonic() - started
        after = call_raw(channel, PREDICT, valid_predict_bytes())
    bad = [r for r in results if r[0] in FORBIDDEN or r[0] == "reload applied"]
    codes = collections.Counter(str(r[0]) for r in results)
    assert not bad, (bad[:5], codes)
    assert codes["StatusCode.OK"] > FUZZ_REQUESTS // 20 and codes["StatusCode.INVALID_ARGUMENT"] > FUZZ_REQUESTS // 10
    assert after == before  # same model set, same answer, byte for byte
    assert fuzz_server.proc.poll() is None
    growth_mib = (peak_rss_kib(fuzz_server.proc.pid) - baseline) / 1024
    print(f"{FUZZ_REQUESTS} calls in {elapsed:.1f}s, peak RSS +{growth_mib:.0f} MiB, codes {dict(codes)}")
    assert growth_mib < 300  # one amplified request (1 GB) would break it


@pytest.mark.slow
def test_a_second_server_on_a_port_or_socket_in_use_fails_at_start_in_one_line(fuzz_server, model_root, tmp_path,
                                                                                capsys):
    if fuzz_server.kind != "threaded":
        pytest.skip("binding is the same for both servers")
    config = tmp_path / "models.config"
    config.write_text(serve_config(model_root))
    for flags, words in [([f"--port={fuzz_server.grpc_port}"], "the port is in use"),
                         (["--port=0", f"--grpc_socket_path={fuzz_server.socket_path}"], "in use by another server"),
                         (["--port=70000"], "--port=70000 is not a TCP port"),
                         (["--port=0", f"--grpc_socket_path={tmp_path / 'no' / 'such.sock'}"], "does not exist")]:
        last = refused_start([f"--model_config_file={config}", *flags], capsys)
        assert last.startswith("aekit serve: ") and words in last
    with grpc.insecure_channel(fuzz_server.grpc_address) as channel:  # the first server still answers all
        assert call_raw(channel, PREDICT, valid_predict_bytes())


def refused_start(args: list[str], capsys) -> str:
    """Runs `aekit serve ARGS` (its main, in this process: no second TensorFlow start-up) that
    must refuse to start; returns its one line of error."""
    assert aekit_cli.main(["serve", "--engine=embedded", *args]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def status_of(channel, name: str) -> list[int]:
    request = get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name=name))
    try:
        reply = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=10)
    except grpc.RpcError:
        return []
    return [s.state for s in reply.model_version_status]


@pytest.mark.slow
def test_load_retries_and_sigterm_with_a_call_in_flight(model_root, tmp_path):
    late = tmp_path / "late"
    shutil.copytree(model_root / "half" / "1" / "variables", late / "1" / "variables")  # copy in progress
    config = tmp_path / "models.config"
    config.write_text(serve_config(model_root, f'config {{ name: "late" base_path: "{late}" }}'))
    batching = tmp_path / "batching.config"  # a lone request waits 3 s for company: a call in flight
    batching.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 3000000 }\n")
    flags = [f"--model_config_file={config}", "--enable_batching", f"--batching_parameters_file={batching}",
             "--rest_api_timeout_in_ms=60000", "--model_config_file_poll_wait_seconds=1", "--max_num_load_retries=1000", "--load_retry_interval_micros=300000", "--file_system_poll_wait_seconds=0"]
    with running_server(flags, tmp_path / "server.log", ["half"]) as server, \
            grpc.insecure_channel(server.grpc_address) as channel:
        # the server answers once "half" is up; "late" appears when its first load attempt starts
        deadline = time.monotonic() + 30
        while not status_of(channel, "late"):
            assert time.monotonic() < deadline, server.log_text()[-2000:]
            time.sleep(0.1)
        assert status_of(channel, "late") == [get_model_status_pb2.ModelVersionStatus.LOADING]  # retrying
        shutil.copy(model_root / "half" / "1" / "saved_model.pb", late / "1" / "saved_model.pb")
        deadline = time.monotonic() + 60
        while status_of(channel, "late") != [get_model_status_pb2.ModelVersionStatus.AVAILABLE]:
            assert time.monotonic() < deadline, server.log_text()[-2000:]
            time.sleep(0.2)

        # an edit whose labels cannot hold is not applied, not even in part, and is tried once
        config.write_text(f'model_config_list {{ config {{ name: "half" base_path: "{model_root / "half"}" '
                          'version_labels { key: "stable" value: 9 } } }')
        time.sleep(3.0)
        assert status_of(channel, "late") == [get_model_status_pb2.ModelVersionStatus.AVAILABLE]
        assert server.log_text().count("Not reloading") == 1

        in_flight = channel.unary_unary(PREDICT).future(valid_predict_bytes(), timeout=30)
        body = json.dumps({"instances": [[2.0]]}).encode()
        rest_call = urllib.request.Request(f"{server.rest_url}/v1/models/half:predict", data=body, method="POST")
        with futures.ThreadPoolExecutor(1) as pool:  # a REST call in flight too: gRPC must not wait for it
            rest_in_flight = pool.submit(lambda: json.load(urllib.request.urlopen(rest_call, timeout=30)))
            time.sleep(1.0)
            refused_while_draining(server, channel, in_flight)
            assert rest_in_flight.result() == {"predictions": [[3.0]]}
        assert server.proc.wait(30) == 0


def refused_while_draining(server, channel, in_flight) -> None:
    """SIGTERM: a new call is refused while the one in flight still runs, which then completes."""
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(grpc.RpcError) as info:
        call_raw(channel, PREDICT, valid_predict_bytes())
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not in_flight.done()  # refused while the call in flight is still running
    reply = predict_pb2.PredictResponse.FromString(in_flight.result())
    assert tf.make_ndarray(reply.outputs["y"]).tolist() == [[3.0], [3.5]]


@pytest.mark.slow
def test_the_unix_socket_uses_the_tls_credentials_and_bad_files_fail_in_one_line(model_root, tmp_path, capsys):
    key, cert, ssl_config = self_signed_tls(tmp_path)
    not_pem = tmp_path / "not_pem.config"
    not_pem.write_text('server_key: "garbage"\nserver_cert: "more garbage"\n')
    config = tmp_path / "models.config"
    config.write_text(serve_config(model_root))
    duplicate = tmp_path / "duplicate.config"
    duplicate.write_text(serve_config(model_root, f'config {{ name: "half" base_path: "{model_root / "half"}" }}'))
    no_base = tmp_path / "no_base.config"
    no_base.write_text('model_config_list { config { name: "half" } }')
    for flags, words in [([f"--model_config_file={config}", f"--ssl_config_file={not_pem}"], "matching PEM"),
                         ([f"--model_config_file={duplicate}"], "Illegal to list model half multiple times"),
                         ([f"--model_config_file={no_base}"], "has no base_path"),
                         ([f"--model_base_path={model_root / 'half'}", "--model_name="], "has no name")]:
        last = refused_start(["--port=0", *flags], capsys)
        assert last.startswith("aekit serve: ") and words in last

    socket_path = tmp_path / "grpc.sock"
    flags = [f"--model_config_file={config}", f"--ssl_config_file={ssl_config}", f"--grpc_socket_path={socket_path}"]
    with running_server(flags, tmp_path / "server.log", ["half"]):
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"unix:{socket_path}", credentials,
                                 options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
            assert call_raw(channel, PREDICT, valid_predict_bytes())
        with grpc.insecure_channel(f"unix:{socket_path}") as plain, pytest.raises(grpc.RpcError):
            call_raw(plain, PREDICT, valid_predict_bytes())
