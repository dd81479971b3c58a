"""gRPC adapter: TF Serving's PredictionService and ModelService over the DataPlane.

Each method decodes the request, calls the core, encodes the response; ServingError becomes the
status code and message in one place (`_map_errors`). Health (grpc.health.v1) reports the
models' real state; reflection lets grpcurl list and call the services.

With batching on, the server is grpc.aio and Predict a coroutine: a request waiting for its
batch holds a future, not a thread, which is what lets batches fill (2x the throughput of the
threaded server on the serving benchmark). Without batching, the threaded grpc.server answers a
single request with one thread hop less (0.2 ms lower p50). The servicers are the same.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

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
from serving.errors import ServingError, StartupError, invalid_argument, truncated
from serving.tensors import ndarray_to_proto, proto_to_ndarray

log = logging.getLogger(__name__)
HEALTH_SERVICES = ("", "ModelService", "PredictionService",
                   "tensorflow.serving.ModelService", "tensorflow.serving.PredictionService")
TF_SERVING_METHODS = ("/tensorflow.serving.PredictionService/", "/tensorflow.serving.ModelService/")


def _status_of(error: Exception, method_name: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, ServingError):
        return error.code, error.message
    log.error("internal error in %s", method_name, exc_info=error)  # a server bug, not the client's
    return grpc.StatusCode.INTERNAL, truncated(f"internal error: {type(error).__name__}: {error}")


class _Undecodable:
    """Stands in for a request whose bytes do not parse, so that `_map_errors` answers it."""

    def __init__(self, message_name: str, error: Exception):
        self.message_name, self.error = message_name, error


def _checked_request(request, method_name: str):
    if isinstance(request, _Undecodable):
        # grpc-python answers INTERNAL ("Exception deserializing request!"; UNKNOWN on grpc.aio),
        # and so does TF Serving's grpc++ (GenericDeserialize in grpcpp proto_utils.h): bytes that
        # are not the method's message are the client's mistake, so INVALID_ARGUMENT here.
        raise invalid_argument(f"{method_name}: the request bytes are not a valid {request.message_name}: "
                               f"{request.error}")
    return request


def _map_errors(method):
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def async_wrapper(self, request, context):
            try:
                return await method(self, _checked_request(request, _rpc_name(method)), context)
            except Exception as e:  # noqa: BLE001 - mapped to a status, never a dropped call
                if isinstance(e, grpc.aio.AbortError):
                    raise
                await context.abort(*_status_of(e, method.__name__))
        return async_wrapper

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, _checked_request(request, _rpc_name(method)), context)
        except Exception as e:  # noqa: BLE001 - mapped to a status, never a dropped call
            context.abort(*_status_of(e, method.__name__))
    return wrapper


def _recorded(api: str):
    """Counts and times the call as TF Serving's PredictionServiceImpl does for Predict, Classify
    and Regress (model_servers/prediction_service_impl.cc; GetModelMetadata and MultiInference
    are not recorded there either)."""
    def decorate(method):
        if inspect.iscoroutinefunction(method):
            @functools.wraps(method)
            async def async_wrapper(self, request, context):
                with self.core.recording(api, "GRPC", request.model_spec.name):
                    return await method(self, request, context)
            return async_wrapper

        @functools.wraps(method)
        def wrapper(self, request, context):
            with self.core.recording(api, "GRPC", request.model_spec.name):
                return method(self, request, context)
        return wrapper
    return decorate


def _rpc_name(method) -> str:
    """'Predict' for _predict_sync/_predict_async, else the method's own name."""
    return "Predict" if method.__name__.startswith("_predict") else method.__name__


def _tolerant(handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler | None:
    """TF Serving's unary methods with a deserializer that hands undecodable bytes on as
    _Undecodable instead of failing inside grpc (see _checked_request)."""
    if handler is None or not method.startswith(TF_SERVING_METHODS) or handler.request_streaming:
        return handler
    parse = handler.request_deserializer  # the generated stubs pass SomeRequest.FromString
    message_name = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    message_name = message_name.full_name if message_name else "request message"

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or worse: the client's bytes
            return _Undecodable(message_name, e)
    return handler._replace(request_deserializer=deserialize)


class _TolerantDeserialization(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        return _tolerant(continuation(handler_call_details), handler_call_details.method)


class _AioTolerantDeserialization(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        return _tolerant(await continuation(handler_call_details), handler_call_details.method)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: DataPlane, executor: futures.Executor | None = None, max_request_bytes: int | None = None):
        self.core, self.executor, self.max_request_bytes = core, executor, max_request_bytes
        # With batching, a request waiting for its batch holds a future (the coroutine), not a
        # thread. Without, the plain function runs in the thread pool: one hop less, lower latency.
        self.Predict = self._predict_async if core.batcher is not None else self._predict_sync

    @_map_errors
    @_recorded("Predict")
    async def _predict_async(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        inputs = _decoded_inputs(request, self.max_request_bytes)
        resolved, outputs = await self.core.predict_async(request.model_spec, inputs, request.output_filter,
                                                          context.time_remaining(), self.executor)
        return _predict_response(resolved, outputs, self.core.response_tensor_content)

    @_map_errors
    @_recorded("Predict")
    def _predict_sync(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        inputs = _decoded_inputs(request, self.max_request_bytes)
        resolved, outputs = self.core.predict(request.model_spec, inputs, request.output_filter,
                                              timeout=context.time_remaining())
        return _predict_response(resolved, outputs, self.core.response_tensor_content)

    @_map_errors
    @_recorded("Classify")
    def Classify(self, request, context) -> classification_pb2.ClassificationResponse:
        resolved, result = self.core.classify(request.model_spec, request.input)
        return classification_pb2.ClassificationResponse(model_spec=resolved.model_spec(), result=result)

    @_map_errors
    @_recorded("Regress")
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


def _decoded_inputs(request: predict_pb2.PredictRequest, max_bytes: int | None) -> dict:
    """The request's tensors as arrays, together at most `max_bytes` once decoded (checked
    before each is allocated)."""
    inputs = {}
    for alias, tensor in request.inputs.items():
        inputs[alias] = proto_to_ndarray(tensor, alias, max_bytes)
        if max_bytes is not None:
            max_bytes -= inputs[alias].nbytes
    return inputs


def _predict_response(resolved, outputs, tensor_content: bool) -> predict_pb2.PredictResponse:
    response = predict_pb2.PredictResponse(model_spec=resolved.model_spec())
    for alias, value in outputs.items():
        ndarray_to_proto(value, out=response.outputs[alias], tensor_content=tensor_content)
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


class ListingHealthServicer(health.HealthServicer):
    """grpcio-health-checking's servicer with grpc.health.v1.Health/List, which its newest release
    (1.85) leaves UNIMPLEMENTED though the service (and so reflection) lists it. List answers
    each service Check would, from the servicer's own state."""

    def __init__(self):
        super().__init__()
        self._names: set[str] = set()

    def set(self, service: str, status) -> None:
        super().set(service, status)
        self._names.add(service)

    def List(self, request, context) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for service in sorted(self._names):
            response.statuses[service].CopyFrom(self.Check(health_pb2.HealthCheckRequest(service=service), context))
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


def _add_services(server, core: DataPlane, pool: futures.Executor, enable_health: bool,
                  max_request_bytes: int | None) -> HealthReporter | None:
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(core, pool, max_request_bytes), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(core), server)
    names = [prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
             model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name]
    reporter = None
    if enable_health:
        servicer = ListingHealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        reporter = HealthReporter(servicer, core)
        reporter.update()
        names.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    return reporter


def _bind(server, addresses: list[str], credentials: grpc.ServerCredentials | None) -> list[int]:
    """Binds every address, TLS on all of them when `credentials` are given (TF Serving uses the
    same credentials for --grpc_socket_path as for --port)."""
    ports = []
    for address in addresses:
        if address.startswith("unix:"):
            check_socket_path(address.removeprefix("unix:"))
        try:
            bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise StartupError(f"cannot bind gRPC to {address}: the port is in use (another server?) or not "
                               "permitted")
        ports.append(bound)
    return ports


UNIX_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes, the last a NUL


def check_socket_path(path: str) -> None:
    """Refuses a socket path that cannot work, or that another server is listening on: gRPC
    removes an existing socket file before binding, which would silently steal it."""
    target = Path(path)
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise StartupError(f"--grpc_socket_path {path} is {len(os.fsencode(path))} bytes long; a unix socket "
                           f"path holds at most {UNIX_PATH_MAX}")
    if not target.parent.is_dir():
        raise StartupError(f"--grpc_socket_path {path}: the folder {target.parent} does not exist")
    if target.exists() and not target.is_socket():
        raise StartupError(f"--grpc_socket_path {path} exists and is not a socket; remove it or choose another path")
    if target.is_socket() and _is_listening(path):
        raise StartupError(f"--grpc_socket_path {path} is in use by another server")


def _is_listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:  # a stale socket file left by a server that died
            return False
    return True


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """libuv's event loop where uvloop installs (Linux, macOS): ~8 % more batched requests per
    second than asyncio's own loop on the serving benchmark; gRPC's aio stack runs on either."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class GrpcServer:
    """TF Serving's services, health and reflection on `addresses`: grpc.aio on its own event loop
    thread when the core batches, the threaded grpc.server otherwise (see module doc)."""

    def __init__(self, core: DataPlane, addresses: list[str], options: list[tuple], workers: int,
                 enable_health: bool, credentials: grpc.ServerCredentials | None = None):
        pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc")
        # grpc-python sets SO_REUSEPORT by default: a second server on a port in use would start
        # and the kernel would split connections between the two. A port in use must fail.
        options = [("grpc.so_reuseport", 0), *options]
        max_request_bytes = dict(options).get("grpc.max_receive_message_length")
        self.loop = None
        if core.batcher is None:
            self.server = grpc.server(pool, options=options, interceptors=[_TolerantDeserialization()])
            self.health = _add_services(self.server, core, pool, enable_health, max_request_bytes)
            self.ports = _bind(self.server, addresses, credentials)
            return
        self.loop = _new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()

        async def build():  # an aio server belongs to the loop it is created in
            server = grpc.aio.server(migration_thread_pool=pool, options=options,
                                     interceptors=[_AioTolerantDeserialization()])
            return (server, _add_services(server, core, pool, enable_health, max_request_bytes),
                    _bind(server, addresses, credentials))

        self.server, self.health, self.ports = self._on_loop(build())

    def _on_loop(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def start(self) -> None:
        if self.loop is None:
            self.server.start()
        else:
            self._on_loop(self.server.start())

    def stop(self, grace: float) -> None:
        """Refuses new calls, lets calls in flight finish within `grace` seconds."""
        self.begin_stop(grace)()

    def begin_stop(self, grace: float) -> Callable[[], None]:
        """Refuses new calls from now on (grpc sends GOAWAY; a new call on an open connection
        gets UNAVAILABLE) and returns the wait for the calls in flight (at most `grace` s)."""
        if self.loop is None:
            stopped = self.server.stop(grace)
            return lambda: stopped.wait()
        stopping = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop)

        def wait() -> None:
            stopping.result()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        return wait
