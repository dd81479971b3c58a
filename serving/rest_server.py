"""REST adapter: TF Serving's JSON API (/v1/models/...) over the DataPlane.

    GET  /v1/models/NAME[/versions/N|/labels/L]            model status
    GET  /v1/models/NAME[/versions/N|/labels/L]/metadata   signature defs
    POST /v1/models/NAME[/versions/N|/labels/L]:predict    {"instances": [...]} or {"inputs": ...}
    POST ...:classify / ...:regress                        {"examples": [...]}
    GET  <prometheus path>                                 metrics, when monitoring is configured

Errors are {"error": "<message>"} with the HTTP status of the gRPC code (serving.errors); HTTP
protocol errors too (400, 408, 413, 414, 431). RestApi maps requests to the DataPlane; RestServer
only carries bytes, on aiohttp's HTTP/1.1 server (limits and timeouts below).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import reprlib
import resource
import socket
import threading
from concurrent import futures
from http import HTTPStatus

import grpc
import numpy as np
from aiohttp import http_exceptions, web
from google.protobuf import json_format
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow_serving.apis import input_pb2, model_pb2

from serving.core import DataPlane
from serving.errors import ServingError, invalid_argument
from serving.grpc_server import _new_event_loop, status_response
from serving.servable import DEFAULT_SIGNATURE
from serving.tensors import decode_strings, dumps, json_to_ndarray, loads, ndarray_to_json

log = logging.getLogger(__name__)

# The same patterns as TF Serving's http_rest_api_handler.cc.
PREDICT_RE = re.compile(r"(?i)/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify|regress|predict)")
GET_RE = re.compile(r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?")
INT64_MAX = 2**63 - 1


def _spec(name: str, version: str | None, label: str | None, signature: str = "") -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=name, signature_name=signature)
    if version:
        if int(version) > INT64_MAX:  # TF Serving's message (http_rest_api_handler.cc, SimpleAtoi)
            raise invalid_argument(f"Failed to convert version: {version} to numeric.")
        spec.version.value = int(version)
    elif label:
        spec.version_label = label
    return spec


def _proto_json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


class RestApi:
    """Protocol logic of the REST API, independent of the HTTP server that carries it."""

    def __init__(self, core: DataPlane, metrics_path: str | None, timeout_seconds: float):
        self.core, self.metrics_path, self.timeout = core, metrics_path, timeout_seconds

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        """Returns (status, content type, body) for one request of any method; never raises."""
        try:
            if method == "GET" and self.metrics_path and path == self.metrics_path:
                return 200, "text/plain; version=0.0.4", self.core.metrics.exposition()
            return 200, "application/json", dumps(self._route(method, path, body))
        except ServingError as e:
            return e.http_status, "application/json", dumps({"error": e.message})
        except Exception as e:  # noqa: BLE001 - a server bug is a 500, not a dropped connection
            log.exception("internal error on %s %s", method, path)
            return 500, "application/json", dumps({"error": f"internal error: {e}"})

    def _route(self, method: str, path: str, body: bytes):
        # Each model call is counted and timed (request_count, request_latency) under TF Serving's
        # API names, with entrypoint REST.
        if method == "POST" and (m := PREDICT_RE.fullmatch(path)):
            name, version, label, verb = m.groups()
            with self.core.recording(verb.lower().capitalize(), "REST", name):
                request = _parse_json(body)
                spec = _spec(name, version, label, str(request.get("signature_name", "")))
                if verb.lower() == "predict":
                    return self.predict(spec, request)
                return self.classify_or_regress(spec, request, verb.lower())
        if method == "GET" and (m := GET_RE.fullmatch(path)) and m.group(1):
            name, version, label, metadata = m.groups()
            with self.core.recording("GetModelMetadata" if metadata else "GetModelStatus", "REST", name):
                spec = _spec(name, version, label)
                if metadata:
                    return self.metadata(spec)
                return _proto_json(status_response(self.core.status(spec)))
        # Every method reaches here, as in TF Serving: its HTTP server hands any request under
        # /v1/ to HttpRestApiHandler::ProcessRequest (http_server.cc, RestApiRequestDispatcher),
        # which answers 400 "Malformed request" unless it is a POST :predict/... or a GET.
        if path.lower().startswith("/v1/"):
            raise invalid_argument(f"Malformed request: {method} {path}")
        raise ServingError(grpc.StatusCode.NOT_FOUND, f"Not found: {method} {path}")

    def predict(self, spec: model_pb2.ModelSpec, request: dict) -> dict:
        row = "instances" in request
        if row == ("inputs" in request):
            raise invalid_argument("Missing 'inputs' or 'instances' key" if not row
                                   else "Not both 'inputs' and 'instances' keys")
        servable = self.core.resolve(spec)
        signature_name = spec.signature_name or DEFAULT_SIGNATURE
        if signature_name not in servable.signature_defs:
            raise invalid_argument(f'Serving signature name: "{signature_name}" not found in signature def')
        signature = servable.signature_defs[signature_name]
        inputs = _row_inputs(request["instances"], signature) if row else _columnar_inputs(request["inputs"], signature)
        _, outputs = self.core.predict(spec, inputs, servable=servable, timeout=self.timeout)
        return {"predictions": _row_outputs(outputs)} if row else {"outputs": _columnar_outputs(outputs)}

    def classify_or_regress(self, spec: model_pb2.ModelSpec, request: dict, verb: str) -> dict:
        input_proto = _examples_input(request)
        if verb == "classify":
            _, result = self.core.classify(spec, input_proto)
            return {"results": [[[c.label, c.score] for c in row.classes] for row in result.classifications]}
        _, result = self.core.regress(spec, input_proto)
        return {"results": [r.value for r in result.regressions]}

    def metadata(self, spec: model_pb2.ModelSpec) -> dict:
        servable, signature_map = self.core.metadata(spec, ["signature_def"])
        return {"model_spec": {"name": servable.name, "signature_name": "", "version": str(servable.version)},
                "metadata": {"signature_def": _proto_json(signature_map)}}


def _parse_json(body: bytes) -> dict:
    value = loads(body or b"null")
    if not isinstance(value, dict):
        raise invalid_argument("JSON Value: the request body must be a JSON object")
    return value


def _row_inputs(instances, signature) -> dict[str, np.ndarray]:
    if not isinstance(instances, list) or not instances:
        raise invalid_argument("'instances' must be a non-empty list")
    aliases = list(signature.inputs)
    named = all(isinstance(i, dict) and "b64" not in i for i in instances)
    if len(aliases) > 1 and not named:
        raise invalid_argument(f"Expecting object with keys {sorted(aliases)} in each of 'instances' "
                               "(the signature has several inputs)")
    if not named:
        alias = aliases[0]
        return {alias: json_to_ndarray(instances, signature.inputs[alias].dtype, alias)}
    for i, instance in enumerate(instances):
        if set(instance) != set(aliases):
            raise invalid_argument(f"Failed to process element: {i} of 'instances' list. JSON object: "
                                   f"{_preview(instance)} keys must be equal to the input names "
                                   f"{sorted(aliases)}")
    return {alias: json_to_ndarray([inst[alias] for inst in instances], signature.inputs[alias].dtype, alias)
            for alias in aliases}


def _preview(value) -> str:
    """The start of `value` as JSON for an error message (a deeply nested one too)."""
    try:
        return json.dumps(value)[:200]
    except (RecursionError, ValueError):
        return reprlib.repr(value)


def _columnar_inputs(inputs, signature) -> dict[str, np.ndarray]:
    aliases = list(signature.inputs)
    if isinstance(inputs, dict) and "b64" not in inputs:
        # An unknown alias passes through as-is: the core's input check names it (one message).
        return {alias: json_to_ndarray(value, signature.inputs[alias].dtype, alias) if alias in signature.inputs
                else np.asarray(value, dtype=object) for alias, value in inputs.items()}
    if len(aliases) != 1:
        raise invalid_argument(f"'inputs' must be an object keyed by input name {sorted(aliases)}")
    return {aliases[0]: json_to_ndarray(inputs, signature.inputs[aliases[0]].dtype, aliases[0])}


def _row_outputs(outputs: dict[str, np.ndarray]) -> list:
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in outputs.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise invalid_argument(f"Tensors in 'predictions' must have the same 0th dimension; got {sizes}. "
                               "Use the columnar format ('inputs') for this signature.")
    if len(outputs) == 1:
        alias, value = next(iter(outputs.items()))
        return ndarray_to_json(value, alias)
    count = next(iter(sizes.values()))
    return [{k: ndarray_to_json(v[i], k) for k, v in outputs.items()} for i in range(count)]


def _columnar_outputs(outputs: dict[str, np.ndarray]):
    encoded = {k: ndarray_to_json(v, k) for k, v in outputs.items()}
    return next(iter(encoded.values())) if len(encoded) == 1 else encoded


def _examples_input(request: dict) -> input_pb2.Input:
    examples = request.get("examples")
    if not isinstance(examples, list) or not examples:
        raise invalid_argument("'examples' must be a non-empty list of objects")
    input_proto = input_pb2.Input()
    if "context" in request:
        target = input_proto.example_list_with_context
        target.context.CopyFrom(_example(request["context"]))
    else:
        target = input_proto.example_list
    for example in examples:
        target.examples.append(_example(example))
    return input_proto


def _example(features) -> example_pb2.Example:
    """A JSON object of feature name -> value(s) as a tf.Example (ints, floats, strings, b64)."""
    if not isinstance(features, dict):
        raise invalid_argument("each example must be a JSON object of feature name to value")
    example = example_pb2.Example()
    for name, value in features.items():
        values = value if isinstance(value, list) else [value]
        feature = example.features.feature[name]
        if all(isinstance(v, bool) or isinstance(v, int) for v in values):
            feature.int64_list.CopyFrom(feature_pb2.Int64List(value=[int(v) for v in values]))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            feature.float_list.CopyFrom(feature_pb2.FloatList(value=values))
        elif all(isinstance(v, (str, dict)) for v in values):
            feature.bytes_list.CopyFrom(feature_pb2.BytesList(value=decode_strings(values, name)))
        else:
            raise invalid_argument(f"feature '{name}' mixes types or is not a number, string or "
                                   "{\"b64\": ...}")
    return example



# ---- transport: aiohttp's HTTP/1.1 server carries the bytes, RestApi maps them -----------------
# Limits (README, "Operating it"). aiohttp parses HTTP/1.1 (llhttp): a body on any method and
# chunked bodies are read as part of their request, never as the next one.
IDLE_TIMEOUT_SECONDS = 30.0  # a connection without a request in progress closes after this,
#                              also one that never sends a request or sends its headers slowly
BODY_TIMEOUT_SECONDS = 30.0  # a request's body must arrive within this (else 408)
MAX_REQUEST_LINE_BYTES = 8190  # method, path and version (else 414); aiohttp's default
MAX_HEADER_BYTES = 8190  # one header line (else 431); aiohttp's default
LISTEN_BACKLOG = 1024  # many clients connect at once
LINGER_SECONDS = 2.0  # after an error with a body left unread, read and drop it this long so the
#                       client sees the error response before the close (aiohttp's default is 10)
SERVER_HEADER = "aekit"  # aiohttp's default names the Python and aiohttp versions


def default_max_connections() -> int:
    """Half the process's file limit: connections can never take the descriptors that model
    files, gRPC and the version poller need (1,100 idle clients under a 1,024 limit did)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(8, (soft if soft != resource.RLIM_INFINITY else 65536) // 2)


def _response(status: int, payload: bytes, content_type: str = "application/json",
              close: bool = False) -> web.Response:
    response = web.Response(status=status, body=payload, headers={"Content-Type": content_type,
                                                                  "Server": SERVER_HEADER})
    if close:
        response.force_close()  # sends Connection: close, then closes
    return response


def _error(status: int, message: str) -> web.Response:
    # A protocol error leaves the connection's state unknown (e.g. a body not read): close it.
    return _response(status, dumps({"error": message}), close=True)


def _protocol_error(status: int, exc: BaseException | None, message: str | None) -> tuple[int, str]:
    """The status and one-line message for a request aiohttp could not parse. A line too long is
    414 (the request line: its data is the path) or 431 (a header); aiohttp answers 400 for both."""
    if isinstance(exc, http_exceptions.LineTooLong):
        line, limit = exc.args[0], exc.args[1]
        if bytes(line[:1]) == b"/":
            return 414, f"The request line is longer than {limit} bytes"
        return 431, f"A request header is longer than {limit} bytes"
    first_line = (message or str(exc or "") or HTTPStatus(status).phrase).splitlines()[0].rstrip(":")
    return status, f"Malformed HTTP request: {first_line}"


class _ConnectionHandler(web.RequestHandler):
    """aiohttp's connection handler, with protocol errors as TF Serving's {"error": ...} JSON."""

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: a response has started, nothing to send
            raise ConnectionError("error after the response started")
        if status >= 500:
            log.error("REST transport error", exc_info=exc)
            return _error(status, f"internal error: {exc}")
        log.debug("bad HTTP request: %s", message or exc)
        return _error(*_protocol_error(status, exc, message))


class _CappedServer(web.Server):
    """aiohttp's low-level server with a connection cap: over it, the oldest idle connection is
    closed (the newcomer if every connection has a request in progress), so idle clients cannot
    starve real ones of descriptors."""

    def __init__(self, handler, max_connections: int, **kwargs):
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.busy: set[web.RequestHandler] = set()

    def __call__(self) -> web.RequestHandler:
        return _ConnectionHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: web.RequestHandler, transport) -> None:
        super().connection_made(handler, transport)
        # A closed connection stays listed until its task ends: count the open ones.
        connections = [c for c in self.connections if c.transport is not None]
        if len(connections) > self.max_connections:
            victim = next((c for c in connections if c not in self.busy), handler)
            log.debug("REST connection cap %d reached: closing an idle connection", self.max_connections)
            victim.force_close()


class RestServer:
    """RestApi over HTTP/1.1 on (host, port), on its own event loop thread; model calls run in a
    pool of `threads`. Bound at construction (OSError if the port is taken), served after start()."""

    def __init__(self, api: RestApi, host: str, port: int, max_body_bytes: int, threads: int,
                 idle_timeout: float = IDLE_TIMEOUT_SECONDS, body_timeout: float = BODY_TIMEOUT_SECONDS,
                 max_connections: int | None = None):
        self.api, self.max_body_bytes, self.body_timeout = api, max_body_bytes, body_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections or default_max_connections()
        self._socket = socket.create_server((host, port), backlog=LISTEN_BACKLOG)
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = self._socket.getsockname()[1]
        self._pool = futures.ThreadPoolExecutor(threads, thread_name_prefix="rest")
        self._loop = _new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rest", daemon=True)
        self._draining = False

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result()

    async def _serve(self) -> None:
        self._web = _CappedServer(
            self._handle, self.max_connections, loop=self._loop, request_factory=self._make_request,
            keepalive_timeout=self.idle_timeout, max_line_size=MAX_REQUEST_LINE_BYTES,
            max_field_size=MAX_HEADER_BYTES, lingering_time=LINGER_SECONDS, access_log=None)
        self._listener = await self._loop.create_server(self._web, sock=self._socket, backlog=LISTEN_BACKLOG)

    def _make_request(self, message, payload, protocol, writer, task) -> web.BaseRequest:
        return web.BaseRequest(message, payload, protocol, writer, task, self._loop,
                               client_max_size=self.max_body_bytes)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self._web.busy.add(request.protocol)
        try:
            body = await self._read_body(request)
            if isinstance(body, web.Response):
                return body
            path = request.raw_path.split("?", 1)[0]
            status, content_type, payload = await self._loop.run_in_executor(
                self._pool, self.api.handle, request.method, path, body)
            return _response(status, payload, content_type, close=self._draining)
        finally:
            self._web.busy.discard(request.protocol)

    async def _read_body(self, request: web.BaseRequest) -> bytes | web.Response:
        """The whole body (Content-Length or chunked), or the error response to send instead."""
        if (request.content_length or 0) > self.max_body_bytes:
            return self._too_large(request.content_length)
        try:
            return await asyncio.wait_for(request.read(), self.body_timeout)
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(None)
        except asyncio.TimeoutError:
            return _error(408, f"The request body did not arrive within {self.body_timeout:g} s")
        except http_exceptions.HttpProcessingError as e:  # e.g. bad chunked encoding
            return _error(400, f"Malformed HTTP request body: {e.message}")

    def _too_large(self, length: int | None) -> web.Response:
        size = f"of {length} bytes " if length is not None else ""
        return _error(413, f"Request body {size}exceeds the limit of {self.max_body_bytes} bytes "
                           "(--max_request_bytes); send smaller batches")

    def stop(self, grace: float) -> None:
        """Stops accepting, answers open keep-alive connections with `Connection: close`, lets the
        requests in flight finish (up to `grace` seconds), then closes."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._drain(grace), self._loop).result(grace + 5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._pool.shutdown(wait=False)
        self._socket.close()

    async def _drain(self, grace: float) -> None:
        # Not aiohttp's own pre_shutdown/shutdown: those stop reading at once, so a request whose
        # body is still arriving could never finish.
        self._draining = True  # every response from now on says Connection: close
        self._listener.close()
        for connection in self._web.connections:
            if connection not in self._web.busy:
                connection.force_close()  # idle: closes now (a request it had only begun is dropped)
        deadline = self._loop.time() + grace
        while self._web.busy and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self._web.shutdown(0.1)  # what is still running after the grace period is cancelled
