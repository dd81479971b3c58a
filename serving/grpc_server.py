"""gRPC adapter: TF Serving's PredictionService and ModelService over the DataPlane.

Each method decodes the request, calls the core, encodes the response; ServingError becomes the
status code and message in one place (`_map_errors`). Health (grpc.health.v1) reports the
models' real state; reflection lets grpcurl list and call the services.
"""

from __future__ import annotations

import functools
import logging
from concurrent import futures

import grpc
from google.protobuf import any_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
    status_pb2,
)

from serving.core import DataPlane
from serving.errors import ServingError
from serving.tensors import ndarray_to_proto, proto_to_ndarray

log = logging.getLogger(__name__)
HEALTH_SERVICES = ("", "ModelService", "PredictionService",
                   "tensorflow.serving.ModelService", "tensorflow.serving.PredictionService")


def _map_errors(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ServingError as e:
            context.abort(e.code, e.message)
        except Exception as e:  # noqa: BLE001 - a server bug must not kill the connection
            log.exception("internal error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
    return wrapper


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: DataPlane):
        self.core = core

    @_map_errors
    def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        inputs = {alias: proto_to_ndarray(t, alias) for alias, t in request.inputs.items()}
        remaining = context.time_remaining()
        resolved, outputs = self.core.predict(request.model_spec, inputs, request.output_filter,
                                              timeout=remaining)
        response = predict_pb2.PredictResponse(model_spec=resolved.model_spec())
        for alias, value in outputs.items():
            response.outputs[alias].CopyFrom(ndarray_to_proto(value))
        return response

    @_map_errors
    def Classify(self, request, context) -> classification_pb2.ClassificationResponse:
        resolved, result = self.core.classify(request.model_spec, request.input)
        return classification_pb2.ClassificationResponse(model_spec=resolved.model_spec(), result=result)

    @_map_errors
    def Regress(self, request, context) -> regression_pb2.RegressionResponse:
        resolved, result = self.core.regress(request.model_spec, request.input)
        return regression_pb2.RegressionResponse(model_spec=resolved.model_spec(), result=result)

    @_map_errors
    def MultiInference(self, request, context):
        return self.core.multi_inference(request)

    @_map_errors
    def GetModelMetadata(self, request, context) -> get_model_metadata_pb2.GetModelMetadataResponse:
        servable, signature_map = self.core.metadata(request.model_spec, list(request.metadata_field))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        packed = any_pb2.Any()
        packed.Pack(signature_map)
        response.metadata["signature_def"].CopyFrom(packed)
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core: DataPlane):
        self.core = core

    @_map_errors
    def GetModelStatus(self, request, context) -> get_model_status_pb2.GetModelStatusResponse:
        return status_response(self.core.status(request.model_spec))

    @_map_errors
    def HandleReloadConfigRequest(self, request, context) -> model_management_pb2.ReloadConfigResponse:
        response = model_management_pb2.ReloadConfigResponse()
        try:
            self.core.manager.reload(request.config)
        except ServingError as e:
            response.status.error_code = e.code.value[0]
            response.status.error_message = e.message
        return response


def status_response(states) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatusResponse for the manager's VersionStates (shared with REST)."""
    response = get_model_status_pb2.GetModelStatusResponse()
    for state in states:
        entry = response.model_version_status.add(version=state.version, state=state.state)
        entry.status.CopyFrom(status_pb2.StatusProto(
            error_code=state.error.code.value[0] if state.error else 0,
            error_message=state.error.message if state.error else ""))
    return response


class HealthReporter:
    """Feeds grpc.health.v1 from the model manager: SERVING only once the models are AVAILABLE."""

    def __init__(self, servicer: health.HealthServicer, core: DataPlane):
        self.servicer, self.core = servicer, core

    def update(self, *_event) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if self.core.manager.ready()
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in HEALTH_SERVICES:
            self.servicer.set(service, status)

    def shutdown(self) -> None:
        self.servicer.enter_graceful_shutdown()


def build_grpc_server(core: DataPlane, addresses: list[str], options: list[tuple], workers: int,
                      enable_health: bool, credentials: grpc.ServerCredentials | None = None
                      ) -> tuple[grpc.Server, HealthReporter | None, list[int]]:
    """A gRPC server with both TF Serving services, health and reflection, bound to `addresses`."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                         options=options)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(core), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(core), server)
    names = [prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
             model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name]
    reporter = None
    if enable_health:
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        reporter = HealthReporter(servicer, core)
        reporter.update()
        names.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    ports = []
    for address in addresses:
        secure = credentials is not None and not address.startswith("unix:")
        try:
            bound = server.add_secure_port(address, credentials) if secure else server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise OSError(f"cannot bind gRPC to {address}: in use or not permitted")
        ports.append(bound)
    return server, reporter, ports
