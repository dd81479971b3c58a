"""REST client for TensorFlow Serving's JSON API, with the same methods and results as the gRPC one.

    from clients import RestAutoencoderClient
    client = RestAutoencoderClient("localhost:8501", model="autoencoder")
    clean = client.denoise(noisy)

Requests use the columnar format ({"inputs": ...}), which carries outputs of any batch shape.
One keep-alive connection per thread; UNAVAILABLE (503) and refused connections are retried.
"""

from __future__ import annotations

import http.client
import threading
import time

import numpy as np

from clients.base import BaseClient, ModelRef, Signature, signatures_from_json
from clients.errors import HTTP_TO_CODE, ClientError
from serving.errors import ServingError
from serving.tensors import dumps, loads, ndarray_to_json


class RestAutoencoderClient(BaseClient):
    def __init__(self, address: str, model: str = "autoencoder", *, version: int | None = None,
                 label: str | None = None, timeout: float = 30.0, retries: int = 5, backoff: float = 0.2,
                 **kwargs):
        super().__init__(model, version, label, timeout, **kwargs)
        self.address = address.removeprefix("http://")
        self.retries, self.backoff = retries, backoff
        self._local = threading.local()

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()

    def _connection(self) -> http.client.HTTPConnection:
        if getattr(self._local, "connection", None) is None:
            host, _, port = self.address.rpartition(":")
            self._local.connection = http.client.HTTPConnection(host, int(port), timeout=self.timeout)
        return self._local.connection

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One JSON call with retries on 503 and on connection failures."""
        payload = None if body is None else dumps(body)
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                connection = self._connection()
                connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                status, text = response.status, response.read()
            except (ConnectionError, OSError, http.client.HTTPException) as e:
                self.close()
                self._local.connection = None
                if attempt < self.retries:
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                raise ClientError(f"UNAVAILABLE: cannot reach a model server at {self.address} ({e})",
                                  "UNAVAILABLE") from None
            if status == 503 and attempt < self.retries:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            return _decode(status, text)
        raise AssertionError("unreachable")

    @staticmethod
    def _path(ref: ModelRef) -> str:
        path = f"/v1/models/{ref.name}"
        if ref.version is not None:
            path += f"/versions/{ref.version}"
        elif ref.label is not None:
            path += f"/labels/{ref.label}"
        return path

    def _fetch_signatures(self, ref: ModelRef) -> dict[str, Signature]:
        reply = self.request("GET", self._path(ref) + "/metadata")
        return signatures_from_json(reply["metadata"]["signature_def"])

    def _predict_chunk(self, ref: ModelRef, signature: Signature, inputs: dict[str, np.ndarray]
                       ) -> dict[str, np.ndarray]:
        body = {"signature_name": signature.name,
                "inputs": {alias: ndarray_to_json(value, alias) for alias, value in inputs.items()}}
        outputs = self.request("POST", self._path(ref) + ":predict", body)["outputs"]
        if not isinstance(outputs, dict) or len(signature.outputs) == 1:
            outputs = {next(iter(signature.outputs)): outputs}
        return {alias: np.asarray(value, dtype=signature.outputs[alias].dtype) for alias, value in outputs.items()}

    def status(self, model: str | None = None, version: int | None = None, label: str | None = None) -> list[dict]:
        reply = self.request("GET", self._path(self._ref(model, version, label)))
        return [{"version": int(s["version"]), "state": s["state"], "error_code": s["status"]["error_code"],
                 "error_message": s["status"]["error_message"]} for s in reply["model_version_status"]]


def _decode(status: int, text: bytes) -> dict:
    try:
        body = loads(text)
    except ServingError:  # not JSON (e.g. a proxy's HTML page): show its start
        body = {"error": text.decode(errors="replace")[:200]}
    if status != 200:
        code = HTTP_TO_CODE.get(status, "UNKNOWN")
        raise ClientError(f"{code}: {body.get('error', body)} (HTTP {status})", code)
    return body
