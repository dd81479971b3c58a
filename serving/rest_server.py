"""REST adapter: TF Serving's JSON API (/v1/models/...) over the DataPlane.

    GET  /v1/models/NAME[/versions/N|/labels/L]            model status
    GET  /v1/models/NAME[/versions/N|/labels/L]/metadata   signature defs
    POST /v1/models/NAME[/versions/N|/labels/L]:predict    {"instances": [...]} or {"inputs": ...}
    POST ...:classify / ...:regress                        {"examples": [...]}
    GET  <prometheus path>                                 metrics, when monitoring is configured

Errors are {"error": "<message>"} with the HTTP status of the gRPC code (serving.errors).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow_serving.apis import input_pb2, model_pb2

from serving.core import DataPlane
from serving.errors import ServingError, invalid_argument
from serving.grpc_server import status_response
from serving.servable import DEFAULT_SIGNATURE
from serving.tensors import decode_strings, dumps, json_to_ndarray, loads, ndarray_to_json

log = logging.getLogger(__name__)

# The same patterns as TF Serving's http_rest_api_handler.cc.
PREDICT_RE = re.compile(r"(?i)/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify|regress|predict)")
GET_RE = re.compile(r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?")


def _spec(name: str, version: str | None, label: str | None, signature: str = "") -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=name, signature_name=signature)
    if version:
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
        self._in_flight = 0
        self._idle = threading.Condition()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        """Returns (status, content type, body) for one request; never raises."""
        with self._idle:
            self._in_flight += 1
        try:
            return self._handle(method, path, body)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _handle(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
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
    try:
        value = loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid_argument(f"JSON Parse error: {e}") from None
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
                                   f"{json.dumps(instance)[:200]} keys must be equal to the input names "
                                   f"{sorted(aliases)}")
    return {alias: json_to_ndarray([inst[alias] for inst in instances], signature.inputs[alias].dtype, alias)
            for alias in aliases}


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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving's HTTP server
    # Headers and body go out in separate writes: with Nagle on, the client's delayed ACK
    # would add ~40 ms to every response.
    disable_nagle_algorithm = True
    api: RestApi
    max_body_bytes: int

    def do_GET(self):
        self._serve("GET", b"")

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.max_body_bytes:
            self._send(429, "application/json", dumps(
                {"error": f"Request body of {length} bytes exceeds the limit of {self.max_body_bytes} "
                          "bytes; send smaller batches"}), close=True)
            return
        self._serve("POST", self.rfile.read(length))

    def _serve(self, method: str, body: bytes):
        status, content_type, payload = self.api.handle(method, self.path.split("?", 1)[0], body)
        self._send(status, content_type, payload)

    def _send(self, status: int, content_type: str, payload: bytes, close: bool = False):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, fmt, *args):  # access logs only at debug level
        log.debug("%s " + fmt, self.address_string(), *args)


class RestServer:
    def __init__(self, api: RestApi, host: str, port: int, max_body_bytes: int):
        self.api = api
        handler = type("Handler", (_Handler,), {"api": api, "max_body_bytes": max_body_bytes})
        ThreadingHTTPServer.request_queue_size = 1024  # listen backlog: many clients connect at once
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rest", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float) -> None:
        """Stops accepting, then waits up to `grace` seconds for requests in flight."""
        self.httpd.shutdown()
        self.api.wait_idle(grace)
        self.httpd.server_close()
