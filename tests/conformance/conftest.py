"""The conformance target: the embedded server on fixture models, or any server you point it at.

To check a real TensorFlow Serving with the same suite, see README.md beside this file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import urllib.error
import urllib.request

import grpc
import pytest
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from tests.model_fixtures import write_conformance_models, write_tf2
from tests.server_process import running_server

MODELS = ["half_plus_two", "half_plus_two_tf1", "half_plus_three", "two_versions"]


@dataclasses.dataclass
class Target:
    grpc_address: str
    rest_url: str
    channel: grpc.Channel
    embedded: bool

    @property
    def predict(self) -> prediction_service_pb2_grpc.PredictionServiceStub:
        return prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    @property
    def models(self) -> model_service_pb2_grpc.ModelServiceStub:
        return model_service_pb2_grpc.ModelServiceStub(self.channel)

    def rest(self, method: str, path: str, body=None) -> tuple[int, dict | str]:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        request = urllib.request.Request(self.rest_url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text


@pytest.fixture(scope="session")
def target(tmp_path_factory):
    grpc_address, rest_url = os.environ.get("AEKIT_CONFORMANCE_GRPC"), os.environ.get("AEKIT_CONFORMANCE_REST")
    if grpc_address and rest_url:
        with grpc.insecure_channel(grpc_address) as channel:
            yield Target(grpc_address, rest_url, channel, embedded=False)
        return
    root = tmp_path_factory.mktemp("conformance")
    config = write_conformance_models(root / "models")
    monitoring = root / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }\n')
    flags = [f"--model_config_file={config}", "--enable_grpc_healthcheck_service",
             f"--monitoring_config_file={monitoring}", "--file_system_poll_wait_seconds=1"]
    with running_server(flags, root / "server.log", MODELS) as server:
        with grpc.insecure_channel(server.grpc_address) as channel:
            yield Target(server.grpc_address, server.rest_url, channel, embedded=True)


@pytest.fixture(scope="session")
def tensor_content_target(tmp_path_factory) -> prediction_service_pb2_grpc.PredictionServiceStub:
    """A PredictionService started with --enable_serialization_as_tensor_content: a second embedded
    server, or the one AEKIT_CONFORMANCE_GRPC_TENSOR_CONTENT names (serving half_plus_two)."""
    address = os.environ.get("AEKIT_CONFORMANCE_GRPC_TENSOR_CONTENT")
    if address:
        with grpc.insecure_channel(address) as channel:
            yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return
    if os.environ.get("AEKIT_CONFORMANCE_GRPC"):
        pytest.skip("set AEKIT_CONFORMANCE_GRPC_TENSOR_CONTENT to a server started with "
                    "--enable_serialization_as_tensor_content")
    root = tmp_path_factory.mktemp("tensor_content")
    write_tf2(root / "half_plus_two" / "00000123")
    flags = [f"--model_base_path={root / 'half_plus_two'}", "--model_name=half_plus_two",
             "--enable_serialization_as_tensor_content"]
    with running_server(flags, root / "server.log", ["half_plus_two"]) as server:
        with grpc.insecure_channel(server.grpc_address) as channel:
            yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture
def embedded_only(target):
    if not target.embedded:
        pytest.skip("checks the embedded server's own behaviour")
