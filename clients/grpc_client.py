"""gRPC client for TensorFlow Serving (and `aekit serve`), on the tensorflow-serving-api stubs.

    from clients import AutoencoderClient
    client = AutoencoderClient("localhost:8500", model="autoencoder")
    codes = client.encode(images)            # images: (N, 28, 28, 1) float32 in [0, 1]
    clean = client.denoise(noisy, label="stable")
    spread = AutoencoderClient("dns:///aekit-serving-grpc:8500", load_balancing="round_robin")

Every call has a deadline; UNAVAILABLE (server starting, restarting, overloaded) is retried
with exponential backoff; big batches go in concurrent chunks under the message size limit,
and the channel accepts replies far above gRPC's 4 MiB default. Any gRPC target works:
HOST:PORT, dns:///HOST:PORT (every address the name resolves to, e.g. a headless Service) or
ipv4:IP:PORT,IP:PORT; with load_balancing="round_robin" calls take turns over those addresses
instead of all going to the first that answers (gRPC's default, pick_first).
"""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from clients.base import (
    LOAD_BALANCING_POLICIES,
    BaseClient,
    ModelRef,
    Signature,
    signatures_from_json,
)
from clients.errors import ClientError
from serving.tensors import ndarray_to_proto, proto_to_ndarray

MAX_MESSAGE_BYTES = 2**31 - 1  # what TF Serving itself allows
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE,)
STATE_NAMES = {v: k for k, v in get_model_status_pb2.ModelVersionStatus.State.items()}


def channel_options(load_balancing: str = "pick_first") -> list[tuple]:
    """Channel options for a model server: no message size cap, and the load-balancing policy
    over the addresses the target resolves to (gRPC service config, loadBalancingConfig)."""
    if load_balancing not in LOAD_BALANCING_POLICIES:
        raise ClientError(f"load balancing {load_balancing!r}: expected one of {', '.join(LOAD_BALANCING_POLICIES)}",
                          "INVALID_ARGUMENT")
    service_config = {"loadBalancingConfig": [{load_balancing: {}}]}
    return [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.service_config", json.dumps(service_config))]


class AutoencoderClient(BaseClient):
    def __init__(self, address: str, model: str = "autoencoder", *, version: int | None = None,
                 label: str | None = None, timeout: float = 30.0, retries: int = 5, backoff: float = 0.2,
                 tls: bool = False, root_certificates: bytes | None = None, load_balancing: str = "pick_first",
                 **kwargs):
        super().__init__(model, version, label, timeout, **kwargs)
        self.address, self.retries, self.backoff = address, retries, backoff
        options = channel_options(load_balancing)
        if tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method, request):
        """One RPC with a deadline, retrying UNAVAILABLE with exponential backoff."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as e:
                if e.code() in RETRY_CODES and attempt < self.retries:
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                raise ClientError(_describe(e, self.address), e.code().name) from None

    @staticmethod
    def _spec(ref: ModelRef, signature_name: str = "") -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=ref.name, signature_name=signature_name)
        if ref.version is not None:
            spec.version.value = ref.version
        elif ref.label is not None:
            spec.version_label = ref.label
        return spec

    def _fetch_signatures(self, ref: ModelRef) -> dict[str, Signature]:
        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=self._spec(ref),
                                                                 metadata_field=["signature_def"])
        response = self._call(self.prediction.GetModelMetadata, request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return signatures_from_json(json_format.MessageToDict(signature_map, preserving_proto_field_name=True))

    def _predict_chunk(self, ref: ModelRef, signature: Signature, inputs: dict[str, np.ndarray]
                       ) -> dict[str, np.ndarray]:
        request = predict_pb2.PredictRequest(model_spec=self._spec(ref, signature.name))
        for alias, value in inputs.items():
            # tensor_content, as tf.make_tensor_proto writes requests; replies come either way
            ndarray_to_proto(value, out=request.inputs[alias], tensor_content=True)
        response = self._call(self.prediction.Predict, request)
        return {alias: proto_to_ndarray(t, alias) for alias, t in response.outputs.items()}

    def status(self, model: str | None = None, version: int | None = None, label: str | None = None) -> list[dict]:
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=self._spec(self._ref(model, version, label)))
        response = self._call(self.models.GetModelStatus, request)
        return [{"version": s.version, "state": STATE_NAMES.get(s.state, str(s.state)),
                 "error_code": grpc.StatusCode.OK.name if s.status.error_code == 0 else code_name(s.status.error_code),
                 "error_message": s.status.error_message} for s in response.model_version_status]


def code_name(value: int) -> str:
    return next((c.name for c in grpc.StatusCode if c.value[0] == value), str(value))


def _describe(error: grpc.RpcError, address: str) -> str:
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        return f"UNAVAILABLE: cannot reach a model server at {address} ({error.details()})"
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"DEADLINE_EXCEEDED: {address} did not answer in time; raise --timeout or send smaller batches"
    return f"{error.code().name}: {error.details()}"
