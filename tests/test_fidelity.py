"""What a client written for TensorFlow Serving sees (issue 12), on the in-process servers.

Typed Predict outputs (and tensor_content with the flag), TF1 signatures that declare no shape,
model errors as INVALID_ARGUMENT, TF Serving's Prometheus series, health List and the
tensorflow_model_server command line.
"""

from __future__ import annotations

import json
import logging

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from serving import main as serving_main
from serving.batching import BatchingOptions, BatchScheduler
from serving.core import DataPlane
from serving.errors import ServingError
from serving.grpc_server import HEALTH_SERVICES, GrpcServer
from serving.manager import ModelManager
from serving.metrics import LATENCY_BUCKETS_US, ServerMetrics
from serving.rest_server import RestApi
from serving.servable import LoadError, Servable
from serving.tensors import ndarray_to_proto, proto_to_ndarray
from tests.model_fixtures import write_corrupt, write_tf1_shapeless, write_tf2
from tests.test_serving_components import warmup_record, write_warmup
from training.multiworker import free_ports

METRICS_PATH = "/monitoring/prometheus/metrics"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    write_tf2(root / "half_plus_two" / "123")
    write_warmup(root / "half_plus_two" / "123", [warmup_record()] * 2)
    write_tf1_shapeless(root / "half_plus_three" / "123")
    config = model_server_config_pb2.ModelServerConfig()
    for name in ("half_plus_two", "half_plus_three"):
        config.model_config_list.config.add(name=name, base_path=str(root / name), model_platform="tensorflow")
    return root, config


def make_core(models, response_tensor_content=False, batching=None) -> DataPlane:
    _, config = models
    metrics = ServerMetrics()
    batcher = BatchScheduler(batching, metrics.observe_batch) if batching else None
    manager = ModelManager(loader=metrics.timed_loader(Servable))
    core = DataPlane(manager, metrics, batcher, response_tensor_content)
    manager.warmup = core.warmup
    manager.reload(config)
    return core


@pytest.fixture(scope="module")
def core(models):
    return make_core(models)


def grpc_server(core: DataPlane, health: bool = False) -> tuple[GrpcServer, str]:
    (port,) = free_ports(1)
    server = GrpcServer(core, [f"127.0.0.1:{port}"], [], 4, health)
    server.start()
    return server, f"127.0.0.1:{port}"


def tf_serving_predict(address: str, x, model="half_plus_two") -> predict_pb2.PredictResponse:
    """A Predict exactly as TF Serving's own tests and example clients build it."""
    with grpc.insecure_channel(address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(x, shape=np.shape(x), dtype=tf.float32))
        return stub.Predict(request, 30.0)


def rest(core: DataPlane, method: str, path: str, body=None) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    status, _, text = RestApi(core, METRICS_PATH, 30).handle(method, path, data)
    return status, (text.decode() if path == METRICS_PATH else json.loads(text))


# ---- Predict outputs: typed fields by default, tensor_content with the flag -----------------------
# The field Tensor::AsProtoField writes per dtype (tensorflow/core/framework/tensor.cc, ProtoHelper).
AS_PROTO_FIELD = {np.float32: "float_val", np.float64: "double_val", np.int32: "int_val", np.int16: "int_val",
                  np.int8: "int_val", np.uint8: "int_val", np.uint16: "int_val", np.int64: "int64_val",
                  np.uint32: "uint32_val", np.uint64: "uint64_val", np.bool_: "bool_val", np.float16: "half_val"}


@pytest.mark.parametrize("dtype", list(AS_PROTO_FIELD), ids=lambda d: np.dtype(d).name)
def test_outputs_are_written_in_the_typed_field_of_their_dtype(dtype):
    value = (np.arange(6).reshape(2, 3) % 4).astype(dtype)
    proto = ndarray_to_proto(value)
    assert [f.name for f, _ in proto.ListFields()] == ["dtype", "tensor_shape", AS_PROTO_FIELD[dtype]]
    assert tf.make_ndarray(proto).dtype == value.dtype and tf.make_ndarray(proto).tolist() == value.tolist()
    raw = ndarray_to_proto(value, tensor_content=True)
    assert raw.tensor_content == value.tobytes() and proto_to_ndarray(raw).tolist() == value.tolist()


def test_float_and_half_values_are_exact():
    value = np.array([[0.1, -2.5e-8, np.inf], [np.nan, 3.0e38, -0.0]], np.float32)
    proto = ndarray_to_proto(value)
    assert list(proto.float_val) == pytest.approx(value.ravel().tolist(), nan_ok=True)
    np.testing.assert_array_equal(tf.make_ndarray(proto), value)
    half = np.array([0.5, -1.25, 65504.0], np.float16)
    assert list(ndarray_to_proto(half).half_val) == half.view(np.uint16).tolist()
    np.testing.assert_array_equal(tf.make_ndarray(ndarray_to_proto(half)), half)
    assert ndarray_to_proto(np.array([b"a", b"bc"], dtype=object)).string_val == [b"a", b"bc"]


def test_tf_serving_clients_read_float_val_by_default_and_tensor_content_with_the_flag(models, core):
    server, address = grpc_server(core)
    try:
        result = tf_serving_predict(address, [2.0])  # tensorflow_model_server_test.py's check
        assert len(result.outputs["y"].float_val) == 1 and result.outputs["y"].float_val[0] == 3.0
        assert not result.outputs["y"].tensor_content
    finally:
        server.stop(0)
    server, address = grpc_server(make_core(models, response_tensor_content=True))
    try:
        result = tf_serving_predict(address, [[1.0], [2.0]])
        assert not result.outputs["y"].float_val
        assert np.frombuffer(result.outputs["y"].tensor_content, np.float32).tolist() == [2.5, 3.0]
        assert tf.make_ndarray(result.outputs["y"]).tolist() == [[2.5], [3.0]]
    finally:
        server.stop(0)


# ---- Signatures without shapes; errors the model raises -----------------------------------------
def test_rest_documentation_example_on_a_shapeless_tf1_signature(core):
    # TF Serving's REST API documentation, on saved_model_half_plus_three
    assert rest(core, "POST", "/v1/models/half_plus_three:predict", {"instances": [1.0, 2.0, 5.0]}) == \
        (200, {"predictions": [3.5, 4.0, 5.5]})
    assert rest(core, "POST", "/v1/models/half_plus_three:predict", {"inputs": [[1.0], [2.0]]}) == \
        (200, {"outputs": [[3.5], [4.0]]})


def test_unknown_rank_accepts_any_shape(core):
    spec = model_pb2.ModelSpec(name="half_plus_three", signature_name="any_rank")
    for x in (np.float32(2.0), np.ones((2, 3, 4), np.float32)):
        _, outputs = core.predict(spec, {"x": x})
        assert outputs["y"].shape == x.shape and np.all(outputs["y"] == 0.5 * x + 3)


@pytest.mark.parametrize("signature, x", [("serving_default", 2.0), ("serving_default", [[1.0, 2.0]]),
                                          ("vector", 2.0), ("vector", [[1.0]]), ("misdeclared", [1.0, 2.0])])
def test_shapes_the_model_refuses_are_invalid_argument(core, signature, x):
    spec = model_pb2.ModelSpec(name="half_plus_three", signature_name=signature)
    with pytest.raises(ServingError) as info:
        core.predict(spec, {"x": np.asarray(x, np.float32)})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "x" in info.value.message
    status, reply = rest(core, "POST", "/v1/models/half_plus_three:predict",
                         {"signature_name": signature, "inputs": x})
    assert status == 400 and set(reply) == {"error"}


class Strict(tf.Module):
    """A TF2 signature of unknown rank whose graph only takes three values."""

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="x")])
    def serve(self, x):
        return {"y": x + tf.constant([1.0, 2.0, 3.0])}


def test_tf2_graph_errors_are_invalid_argument(tmp_path):
    module = Strict()
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.serve})
    servable = Servable("strict", 1, tmp_path / "1")
    assert servable.run("serving_default", {"x": np.zeros(3, np.float32)}, ["y"])["y"].tolist() == [1, 2, 3]
    with pytest.raises(ServingError) as info:
        servable.run("serving_default", {"x": np.zeros(4, np.float32)}, ["y"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ---- Prometheus metrics ----------------------------------------------------------------------
def families(core: DataPlane) -> dict:
    status, text = rest(core, "GET", METRICS_PATH)
    assert status == 200
    assert "_created" not in text and ":tensorflow:serving:request_count_total" not in text
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, suffix="", **labels) -> list:
    return [s for s in family.samples if s.name == family.name + suffix and labels.items() <= s.labels.items()]


def test_request_count_and_latency_have_tf_servings_names_units_and_labels(models):
    core = make_core(models)
    server, address = grpc_server(core)
    try:
        tf_serving_predict(address, [[2.0]])
        with pytest.raises(grpc.RpcError):
            tf_serving_predict(address, [[2.0]], model="no_such_model")
    finally:
        server.stop(0)
    rest(core, "POST", "/v1/models/half_plus_two:predict", {"instances": [[1.0]]})
    rest(core, "POST", "/v1/models/half_plus_two:predict", b"{not json")
    rest(core, "GET", "/v1/models/half_plus_two")
    rest(core, "GET", "/v1/models/half_plus_two/metadata")
    rest(core, "GET", "/v1/models/no_such_model")
    page = families(core)

    count = page[":tensorflow:serving:request_count"]
    assert count.type == "counter"
    by_labels = {tuple(sorted(s.labels.items())): s.value for s in count.samples}
    assert by_labels == {(("model_name", "half_plus_two"), ("status", "OK")): 4.0,  # gRPC + REST predict, status, metadata
                         (("model_name", "half_plus_two"), ("status", "INVALID_ARGUMENT")): 1.0,
                         (("model_name", "no_such_model"), ("status", "NOT_FOUND")): 2.0}
    latency = page[":tensorflow:serving:request_latency"]
    assert latency.type == "histogram"
    grpc_predict = dict(model_name="half_plus_two", API="Predict", entrypoint="GRPC")
    buckets = [float(s.labels["le"]) for s in samples(latency, "_bucket", **grpc_predict)]
    assert buckets[:-1] == pytest.approx(LATENCY_BUCKETS_US) and buckets[-1] == float("inf")
    assert samples(latency, "_count", **grpc_predict)[0].value == 1
    assert samples(latency, "_sum", **grpc_predict)[0].value > 1  # microseconds: a model call is never 1 us
    assert samples(latency, "_count", model_name="half_plus_two", API="GetModelStatus", entrypoint="REST")
    assert not samples(latency, "_count", model_name="no_such_model")  # failures are counted, not timed
    runtime = page[":tensorflow:serving:runtime_latency"]
    assert samples(runtime, "_count", model_name="half_plus_two", API="Predict", runtime="TF1")[0].value >= 2


def test_example_warmup_and_load_metrics(models, tmp_path):
    core = make_core(models)
    rest(core, "POST", "/v1/models/half_plus_two:regress",
         {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]})
    loader = core.metrics.timed_loader(Servable)
    with pytest.raises(LoadError):
        loader("broken", 1, write_corrupt(tmp_path / "1"))
    page = families(core)
    assert samples(page[":tensorflow:serving:request_example_counts"], "_sum", model="half_plus_two")[0].value == 2
    # the parser files TF Serving's `..._count_total` counter under the name without _total
    assert samples(page[":tensorflow:serving:request_example_count"], "_total", model="half_plus_two")[0].value == 2
    version_dir = str(models[0] / "half_plus_two" / "123")
    warmup = page[":tensorflow:serving:model_warmup_latency"]
    assert samples(warmup, "_count", model_path=version_dir, status="OK")[0].value == 1
    attempts = page[":tensorflow:cc:saved_model:load_attempt_count"]
    assert attempts.type == "counter"
    assert samples(attempts, "_total", model_path=version_dir, status="success")[0].value == 1
    assert samples(attempts, "_total", model_path=str(tmp_path / "1"), status="fail")[0].value == 1
    assert samples(page[":tensorflow:cc:saved_model:load_latency"], "_total", model_path=version_dir)[0].value > 0


def test_batching_session_metrics(models):
    core = make_core(models, batching=BatchingOptions(max_batch_size=4, allowed_batch_sizes=[4],
                                                      num_batch_threads=1))
    core.predict(model_pb2.ModelSpec(name="half_plus_two"), {"x": np.ones((3, 1), np.float32)})
    page = families(core)
    prefix = ":tensorflow:serving:batching_session:"
    # two warmup records and this request: three batched runs of one, one and three rows, all padded to 4
    assert samples(page[prefix + "wrapped_run_count"], "_total")[0].value == 3
    assert samples(page[prefix + "input_batch_size"], "_sum")[0].value == 5
    assert samples(page[prefix + "processed_batch_size"], "_sum")[0].value == 12
    assert samples(page[prefix + "padding_size"], "_sum", execution_batch_size="4")[0].value == 7
    assert samples(page[prefix + "queuing_latency"], "_count", thread_pool_name="batch_threads")[0].value == 3
    core.batcher.stop()


# ---- gRPC health List -----------------------------------------------------------------------
def test_health_list_answers_what_check_answers(core):
    server, address = grpc_server(core, health=True)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            listed = stub.List(health_pb2.HealthListRequest(), timeout=10).statuses
            assert set(listed) == set(HEALTH_SERVICES)
            for service in HEALTH_SERVICES:
                check = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert listed[service].status == check.status
    finally:
        server.stop(0)


# ---- tensorflow_model_server's command line ----------------------------------------------------
# Every flag in tensorflow_serving/model_servers/main.cc's flag_list, with a value TF Serving takes.
TF_SERVING_COMMAND_LINE = [
    "--port=8500", "--grpc_socket_path=/tmp/s.sock", "--rest_api_port=8501", "--rest_api_num_threads=8",
    "--rest_api_timeout_in_ms=30000", "--rest_api_enable_cors_support=false", "--enable_batching=true",
    "--allow_version_labels_for_unavailable_models=false", "--batching_parameters_file=",
    "--enable_per_model_batching_parameters=false", "--model_config_file=", "--model_config_file_poll_wait_seconds=0",
    "--model_name=m", "--model_base_path=/models/m", "--num_load_threads=0", "--num_unload_threads=0",
    "--max_num_load_retries=5", "--load_retry_interval_micros=60000000", "--file_system_poll_wait_seconds=1",
    "--flush_filesystem_caches=true", "--tensorflow_session_parallelism=0", "--tensorflow_session_config_file=",
    "--tensorflow_intra_op_parallelism=0", "--tensorflow_inter_op_parallelism=0", "--use_alts_credentials=false",
    "--ssl_config_file=", "--platform_config_file=", "--per_process_gpu_memory_fraction=0",
    "--saved_model_tags=serve", "--grpc_channel_arguments=", "--grpc_max_threads=0", "--enable_model_warmup=true",
    "--num_request_iterations_for_warmup=1", "--monitoring_config_file=",
    "--remove_unused_fields_from_bundle_metagraph=true", "--prefer_tflite_model=false", "--num_tflite_pools=1",
    "--num_tflite_interpreters_per_pool=1", "--enable_signature_method_name_check=false",
    "--xla_cpu_compilation_enabled=false", "--xla_gpu_compilation_enabled=false", "--enable_profiler=true",
    "--thread_pool_factory_config_file=", "--mixed_precision=", "--skip_initialize_tpu=false",
    "--enable_grpc_healthcheck_service=true", "--enable_serialization_as_tensor_content=true",
]


def test_every_tensorflow_model_server_flag_parses_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="aekit.serve"):
        cfg = serving_main.parse_flags(TF_SERVING_COMMAND_LINE)
    assert cfg.enable_serialization_as_tensor_content and cfg.model_base_path == "/models/m"
    assert not caplog.records


def test_flags_with_no_effect_warn_once_each(caplog):
    with caplog.at_level(logging.WARNING, logger="aekit.serve"):
        serving_main.parse_flags(["--model_base_path=/m", "--prefer_tflite_model", "--num_load_threads=4"])
    assert [r.getMessage().split("=")[0] for r in caplog.records] == ["--num_load_threads", "--prefer_tflite_model"]


def test_session_parallelism_sets_both_thread_pools():
    cfg = serving_main.parse_flags(["--model_base_path=/m", "--tensorflow_session_parallelism=2",
                                    "--tensorflow_inter_op_parallelism=1"])
    assert (cfg.tensorflow_intra_op_parallelism, cfg.tensorflow_inter_op_parallelism) == (2, 1)


@pytest.mark.parametrize("flag", ["--use_alts_credentials", "--platform_config_file=/p.config",
                                  "--saved_model_tags=serve,tpu", "--no_such_flag=1", "--port=http"])
def test_refused_flags_are_one_line_naming_the_flag(capsys, flag):
    assert serving_main.main(["--model_base_path=/m", flag]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag.split("=")[0] in err and "usage:" not in err
