"""What the gRPC and REST clients share: signatures from metadata, chunking, and the autoencoder methods.

A transport subclass provides `_fetch_signatures` and `_predict_chunk`; everything else,
including splitting big inputs into chunks sent concurrently, lives here once.
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent import futures

import numpy as np

from clients.errors import ClientError

DTYPES = {"DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_INT32": np.int32, "DT_INT64": np.int64,
          "DT_UINT8": np.uint8, "DT_BOOL": np.bool_, "DT_STRING": object, "DT_HALF": np.float16}
DEFAULT_CHUNK_BYTES = 3 * 1024 * 1024  # under the 4 MiB that default gRPC peers accept
LOAD_BALANCING_POLICIES = ("pick_first", "round_robin")  # gRPC's built-in policies


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: type
    shape: tuple[int, ...]  # -1 for a free dimension


@dataclasses.dataclass(frozen=True)
class Signature:
    name: str
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]

    @property
    def input_alias(self) -> str:
        if len(self.inputs) != 1:
            raise ClientError(f"signature {self.name} has inputs {sorted(self.inputs)}; pass a dict to predict()",
                              "INVALID_ARGUMENT")
        return next(iter(self.inputs))


def signatures_from_json(signature_map: dict) -> dict[str, Signature]:
    """Parses a SignatureDefMap in JSON form (REST metadata, or a gRPC proto via MessageToDict)."""
    def tensors(entries):
        return {alias: TensorInfo(DTYPES.get(info.get("dtype"), np.float32),
                                  tuple(int(d.get("size", -1)) for d in info.get("tensor_shape", {}).get("dim", [])))
                for alias, info in entries.items()}

    return {name: Signature(name, tensors(sig.get("inputs", {})), tensors(sig.get("outputs", {})))
            for name, sig in signature_map.get("signature_def", {}).items()}


class ModelRef:
    """Which model a call goes to: name plus optional version or label."""

    def __init__(self, name: str, version: int | None = None, label: str | None = None):
        if version is not None and label is not None:
            raise ClientError("give a version or a label, not both", "INVALID_ARGUMENT")
        self.name, self.version, self.label = name, version, label

    def key(self) -> tuple:
        return (self.name, self.version, self.label)


class BaseClient:
    def __init__(self, model: str, version: int | None = None, label: str | None = None,
                 timeout: float = 30.0, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_concurrency: int = 4):
        self.default = ModelRef(model, version, label)
        self.timeout, self.max_chunk_bytes, self.max_concurrency = timeout, max_chunk_bytes, max_concurrency
        self._signatures: dict[tuple, dict[str, Signature]] = {}

    # ---- transport hooks ----------------------------------------------------------------
    def _fetch_signatures(self, ref: ModelRef) -> dict[str, Signature]:
        raise NotImplementedError

    def _predict_chunk(self, ref: ModelRef, signature: Signature, inputs: dict[str, np.ndarray]
                       ) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def status(self, model: str | None = None, version: int | None = None, label: str | None = None) -> list[dict]:
        raise NotImplementedError

    # ---- shared logic -------------------------------------------------------------------
    def _ref(self, model=None, version=None, label=None) -> ModelRef:
        if model is None and version is None and label is None:
            return self.default
        return ModelRef(model or self.default.name, version, label)

    def signatures(self, model: str | None = None, version: int | None = None, label: str | None = None
                   ) -> dict[str, Signature]:
        """The model's signatures, read from its metadata once per model/version/label."""
        ref = self._ref(model, version, label)
        if ref.key() not in self._signatures:
            self._signatures[ref.key()] = self._fetch_signatures(ref)
        return self._signatures[ref.key()]

    def wait_until_available(self, timeout: float = 120.0, **which) -> int:
        """Blocks until the model has an AVAILABLE version (a server may still be loading it)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ready = [s["version"] for s in self.status(**which) if s["state"] == "AVAILABLE"]
                if ready:
                    return max(ready)
            except ClientError as e:
                if e.code not in ("NOT_FOUND", "UNAVAILABLE"):
                    raise
            if time.monotonic() > deadline:
                raise ClientError(f"DEADLINE_EXCEEDED: model {self._ref(**which).name} has no AVAILABLE "
                                  f"version after {timeout:.0f}s", "DEADLINE_EXCEEDED")
            time.sleep(0.2)

    def metadata(self, **which) -> dict[str, Signature]:
        return self.signatures(**which)

    def predict(self, signature_name: str, inputs, *, model=None, version=None, label=None) -> dict[str, np.ndarray]:
        """Runs a signature on a batch (array or {alias: array}), in concurrent chunks if it is big."""
        ref = self._ref(model, version, label)
        signatures = self.signatures(ref.name, ref.version, ref.label)
        if signature_name not in signatures:
            raise ClientError(f"model {ref.name} has no signature {signature_name!r} "
                              f"(it has {sorted(s for s in signatures if not s.startswith('__'))})", "INVALID_ARGUMENT")
        signature = signatures[signature_name]
        if not isinstance(inputs, dict):
            inputs = {signature.input_alias: inputs}
        inputs = {alias: _checked_input(signature, alias, value) for alias, value in inputs.items()}
        chunks = _chunk_slices(inputs, self.max_chunk_bytes)
        if len(chunks) == 1:
            return self._predict_chunk(ref, signature, inputs)
        with futures.ThreadPoolExecutor(min(self.max_concurrency, len(chunks))) as pool:
            parts = list(pool.map(lambda s: self._predict_chunk(ref, signature, {k: v[s] for k, v in inputs.items()}),
                                  chunks))
        return {alias: np.concatenate([p[alias] for p in parts]) for alias in parts[0]}

    def _single_output(self, signature_name: str, inputs, **which) -> np.ndarray:
        outputs = self.predict(signature_name, inputs, **which)
        if len(outputs) != 1:
            raise ClientError(f"signature {signature_name} has outputs {sorted(outputs)}; use predict()")
        return next(iter(outputs.values()))

    def encode(self, images, **which) -> np.ndarray:
        """images (N, H, W, C) float32 in [0, 1] -> latent codes (N, D)."""
        return self._single_output("encode", images, **which)

    def decode(self, latent, **which) -> np.ndarray:
        """latent codes (N, D) -> images (N, H, W, C)."""
        return self._single_output("decode", latent, **which)

    def denoise(self, images, **which) -> np.ndarray:
        """images -> their reconstructions (noise removed if the model was trained with noise)."""
        return self._single_output("denoise", images, **which)

    def score(self, images, **which) -> dict[str, np.ndarray]:
        """images -> {"error": per-image MSE (the mean of error_map), "anomaly_score": what the threshold
        is on, "anomaly_score_kind": mse | combined, "latent_distance", "blurred_error", "is_anomaly":
        anomaly_score > threshold, "threshold": the model's threshold, "threshold_fpr": the held-out
        false-positive rate it was set to, "error_map": per-pixel squared error, the input's shape}
        (outputs other than error, is_anomaly and threshold only from models exported since they were added)."""
        return self.predict("score", images, **which)

    def classify(self, images, **which) -> dict[str, np.ndarray]:
        """images -> {"classes": int64 predicted label per image, "scores": float32 (N, K), one
        probability per class} (models exported with --probe)."""
        return self.predict("classify", images, **which)

    def compress(self, images, **which) -> np.ndarray:
        """images -> codes (N, D) uint8, one byte per latent dimension (the `compress` signature)."""
        return self._single_output("compress", images, **which)

    def decompress(self, codes, **which) -> np.ndarray:
        """uint8 codes (N, D) from `compress` -> images (N, H, W, C) float32 in [0, 1]."""
        return self._single_output("decompress", codes, **which)

    def input_shape(self, signature_name: str = "denoise", **which) -> tuple[int, ...]:
        signature = self.signatures(**which)[signature_name]
        return signature.inputs[signature.input_alias].shape


def _checked_input(signature: Signature, alias: str, value) -> np.ndarray:
    if alias not in signature.inputs:
        raise ClientError(f"signature {signature.name} has no input {alias!r} (inputs: {sorted(signature.inputs)})",
                          "INVALID_ARGUMENT")
    info = signature.inputs[alias]
    array = np.asarray(value)
    if info.dtype is not object:
        array = array.astype(info.dtype, copy=False)
    if info.shape and (array.ndim != len(info.shape) or
                       any(want not in (-1, got) for want, got in zip(info.shape, array.shape))):
        want = "(" + ", ".join("N" if d == -1 else str(d) for d in info.shape) + ")"
        raise ClientError(f"input {alias!r} of signature {signature.name} must have shape {want}; got {array.shape}",
                          "INVALID_ARGUMENT")
    return array


def _chunk_slices(inputs: dict[str, np.ndarray], max_bytes: int) -> list[slice]:
    rows = len(next(iter(inputs.values())))
    row_bytes = sum(v[0:1].nbytes if v.dtype != object else 1024 for v in inputs.values()) or 1
    per_chunk = max(1, max_bytes // row_bytes)
    count = max(1, math.ceil(rows / per_chunk))
    return [slice(i * per_chunk, min(rows, (i + 1) * per_chunk)) for i in range(count)]
