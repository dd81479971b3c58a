"""`aekit serve` as a real process: flags, polling, reload, limits, socket, TLS, reflection, SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tensorflow_serving.apis import (
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving import config_files
from serving.tensors import ndarray_to_proto, proto_to_ndarray
from tests.model_fixtures import write_tf2
from tests.server_process import running_server, self_signed_tls

pytestmark = pytest.mark.slow


def predict(channel, x, name="default", timeout=30):
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=name))
    request.inputs["x"].CopyFrom(ndarray_to_proto(np.asarray(x, np.float32)))
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=timeout)
    return proto_to_ndarray(response.outputs["y"]), response.model_spec.version.value


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def run_serve(args, timeout=120):
    return subprocess.run([sys.executable, "-m", "aekit_cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_server_process_end_to_end(tmp_path):
    base = tmp_path / "model"
    write_tf2(base / "1", b=2.0)
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 32 }\nbatch_timeout_micros { value: 2000 }\n"
                        "num_batch_threads { value: 2 }\n")
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true path: "/metrics" }\n')
    socket_path = tmp_path / "grpc.sock"
    flags = [f"--model_base_path={base}", "--file_system_poll_wait_seconds=1", "--enable_batching",
             f"--batching_parameters_file={batching}", f"--monitoring_config_file={monitoring}",
             f"--grpc_socket_path={socket_path}", "--max_request_bytes=65536", "--enable_grpc_healthcheck_service"]
    with running_server(flags, tmp_path / "server.log", ["default"]) as server:
        channel = grpc.insecure_channel(server.grpc_address)

        # batching: concurrent callers each get their own answer
        xs = np.arange(64, dtype=np.float32)
        with futures.ThreadPoolExecutor(16) as pool:
            ys = list(pool.map(lambda x: predict(channel, [[x]])[0].item(), xs))
        assert ys == (0.5 * xs + 2).tolist()
        import urllib.request
        metrics = urllib.request.urlopen(server.rest_url + "/metrics", timeout=10).read().decode()
        assert ":tensorflow:serving:batching_session:input_batch_size_count" in metrics

        # health on the batching (grpc.aio) server
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        # a new version is picked up by polling
        write_tf2(tmp_path / "staging", b=3.0)
        shutil.move(tmp_path / "staging", base / "2")
        assert wait_for(lambda: predict(channel, [[2.0]])[1] == 2)
        assert predict(channel, [[2.0]])[0].item() == 4.0

        # the unix socket serves the same API
        with grpc.insecure_channel(f"unix:{socket_path}") as unix_channel:
            assert predict(unix_channel, [[2.0]])[0].item() == 4.0

        # requests over --max_request_bytes: RESOURCE_EXHAUSTED on gRPC, 413 on REST
        with pytest.raises(grpc.RpcError) as info:
            predict(channel, np.ones((20000, 1)))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        body = json.dumps({"instances": [[1.0]] * 20000}).encode()
        request = urllib.request.Request(server.rest_url + "/v1/models/default:predict", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as http_info:
            urllib.request.urlopen(request, timeout=10)
        assert http_info.value.code == 413 and "error" in json.loads(http_info.value.read())

        # reflection lists the services, so grpcurl can call them
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"} <= names

        # HandleReloadConfigRequest replaces the model set
        reload = model_management_pb2.ReloadConfigRequest(config=config_files.single_model_config("renamed", str(base)))
        reply = model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(reload, timeout=60)
        assert reply.status.error_code == 0
        assert predict(channel, [[2.0]], name="renamed")[0].item() == 4.0
        with pytest.raises(grpc.RpcError) as info:
            predict(channel, [[2.0]])
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        channel.close()

        # SIGTERM drains and exits cleanly
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        assert "Shutting down" in server.log_text()


def test_config_file_errors_exit_non_zero_with_tf_serving_message(tmp_path):
    bad = tmp_path / "bad.config"
    bad.write_text("improperly formatted file")
    result = run_serve([f"--model_config_file={bad}", "--port=0"])
    assert result.returncode != 0
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig" in result.stderr
    result = run_serve(["--port=0"])
    assert result.returncode != 0 and "model_base_path" in result.stderr
    result = run_serve(["--model_base_path=/x", "--no_such_flag=1"])
    assert result.returncode != 0 and "no_such_flag" in result.stderr


def test_base_path_without_versions_says_so_then_loads_one(tmp_path):
    base = tmp_path / "empty"
    base.mkdir()
    with running_server([f"--model_base_path={base}", "--file_system_poll_wait_seconds=1"],
                        tmp_path / "server.log", rest=False) as server:
        assert wait_for(lambda: "No versions of servable default found under base path" in server.log_text(), 60)
        write_tf2(base / "7")
        with grpc.insecure_channel(server.grpc_address) as channel:
            assert wait_for(lambda: _try_predict(channel) == 7, 60)


def _try_predict(channel):
    try:
        return predict(channel, [[1.0]], timeout=5)[1]
    except grpc.RpcError:
        return None


def test_tls_with_ssl_config_file(tmp_path):
    key, cert, ssl_config = self_signed_tls(tmp_path)
    base = tmp_path / "model"
    write_tf2(base / "1")
    with running_server([f"--model_base_path={base}", f"--ssl_config_file={ssl_config}"],
                        tmp_path / "server.log", ["default"]) as server:
        from clients import AutoencoderClient

        client = AutoencoderClient(f"localhost:{server.grpc_port}", "default", tls=True,
                                   root_certificates=cert.read_bytes())
        assert client.predict("serving_default", [[2.0]])["y"].tolist() == [[3.0]]
        with grpc.insecure_channel(server.grpc_address) as plain, pytest.raises(grpc.RpcError):
            predict(plain, [[2.0]], timeout=5)


def test_engine_auto_execs_a_real_tensorflow_model_server_with_the_same_flags(tmp_path):
    fake = tmp_path / "bin" / "tensorflow_model_server"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / 'argv.txt'}\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}")
    flags = ["--port=8500", "--model_name=m", "--model_base_path=/models/m", "--engine=auto", "--host=127.0.0.1"]
    result = subprocess.run([sys.executable, "-m", "aekit_cli", "serve", *flags], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "argv.txt").read_text().split() == ["--port=8500", "--model_name=m", "--model_base_path=/models/m"]
    result = run_serve(["--model_base_path=/models/m", "--engine=tfserving"])
    assert result.returncode != 0 and "tensorflow_model_server is not on PATH" in result.stderr


def test_model_config_file_is_polled_and_reloaded(tmp_path):
    write_tf2(tmp_path / "a" / "1", b=2.0)
    write_tf2(tmp_path / "b" / "1", b=3.0)
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "a" base_path: "{tmp_path / "a"}" model_platform: "tensorflow" }} }}')
    with running_server([f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=1"],
                        tmp_path / "server.log", ["a"]) as server, grpc.insecure_channel(server.grpc_address) as channel:
        config.write_text("this does not parse")
        time.sleep(2.5)
        assert predict(channel, [[2.0]], name="a")[0].item() == 3.0  # a bad edit keeps the old set
        assert "Not reloading" in server.log_text()
        config.write_text(f'model_config_list {{ config {{ name: "b" base_path: "{tmp_path / "b"}" model_platform: "tensorflow" }} }}')
        assert wait_for(lambda: _try_predict_model(channel, "b") == 4.0, 60)
        assert _try_predict_model(channel, "a") is None


def _try_predict_model(channel, name):
    try:
        return predict(channel, [[2.0]], name=name, timeout=5)[0].item()
    except grpc.RpcError:
        return None
