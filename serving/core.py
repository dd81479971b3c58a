"""The protocol-neutral core: every API of the server, on numpy arrays and protos.

The gRPC and REST adapters only decode a request, call one method here and encode the answer;
validation, model resolution, batching, warmup and metrics live here once. Errors are
ServingError (a gRPC code and TF Serving's message), mapped to HTTP by the REST adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import posixpath
import time

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    input_pb2,
    model_pb2,
    prediction_log_pb2,
    regression_pb2,
)

from serving.batching import BatchScheduler
from serving.errors import ServingError, invalid_argument
from serving.manager import ModelManager
from serving.metrics import ServerMetrics
from serving.servable import (
    DEFAULT_SIGNATURE,
    LoadError,
    Servable,
    check_inputs,
    squeeze_lenient_outputs,
)
from serving.tensors import proto_to_ndarray

CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # as TF Serving


@dataclasses.dataclass
class Resolved:
    """What a response echoes: the model, the version actually used and the signature."""
    servable: Servable
    signature_name: str

    def model_spec(self, with_signature: bool = True) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=self.servable.name)
        spec.version.value = self.servable.version
        if with_signature:
            spec.signature_name = self.signature_name
        return spec


def spec_version(spec: model_pb2.ModelSpec) -> tuple[int | None, str | None]:
    choice = spec.WhichOneof("version_choice")
    return (spec.version.value if choice == "version" else None,
            spec.version_label if choice == "version_label" else None)


class DataPlane:
    def __init__(self, manager: ModelManager, metrics: ServerMetrics | None = None,
                 batcher: BatchScheduler | None = None, response_tensor_content: bool = False,
                 method_name_check: bool = False):
        self.manager, self.metrics, self.batcher = manager, metrics or ServerMetrics(), batcher
        # --enable_signature_method_name_check (off by default, as in tensorflow_model_server):
        # Classify/Regress then need a signature whose method_name is classify/regress.
        self.method_name_check = method_name_check
        # TF Serving's ServerCore::Options::predict_response_tensor_serialization_option: Predict
        # outputs in the typed *_val fields (kAsProtoField, the default) or in tensor_content
        # (--enable_serialization_as_tensor_content).
        self.response_tensor_content = response_tensor_content

    # ---- resolution -------------------------------------------------------------------
    def resolve(self, spec: model_pb2.ModelSpec) -> Servable:
        version, label = spec_version(spec)
        return self.manager.resolve(spec.name, version, label)

    @contextlib.contextmanager
    def recording(self, api: str, entrypoint: str, model_name: str):
        """Counts and times one client request, as TF Serving's API layer does: the adapters wrap
        each Predict/Classify/Regress (gRPC, REST) and REST status/metadata call in it, so a
        request for an unknown model or with a body that does not parse is counted too."""
        started, status = time.perf_counter(), "OK"
        try:
            yield
        except ServingError as e:
            status = e.code.name
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self.metrics.observe_request(model_name, api, entrypoint, status, time.perf_counter() - started)

    @contextlib.contextmanager
    def timing_runtime(self, model_name: str, api: str):
        """Times the model run alone (TF Serving's runtime_latency)."""
        started = time.perf_counter()
        yield
        self.metrics.observe_runtime(model_name, api, time.perf_counter() - started)

    # ---- Predict ------------------------------------------------------------------------
    def predict(self, spec: model_pb2.ModelSpec, inputs: dict[str, np.ndarray],
                output_filter=(), servable: Servable | None = None, timeout: float | None = None
                ) -> tuple[Resolved, dict[str, np.ndarray]]:
        servable = servable or self.resolve(spec)
        resolved = Resolved(servable, spec.signature_name or DEFAULT_SIGNATURE)
        return resolved, self.run_predict(servable, resolved.signature_name, inputs, output_filter, timeout)

    def run_predict(self, servable: Servable, signature_name: str, inputs: dict[str, np.ndarray],
                    output_filter=(), timeout: float | None = None) -> dict[str, np.ndarray]:
        plan = _PredictPlan.of(servable, signature_name, inputs, output_filter)
        with self.timing_runtime(servable.name, "Predict"):  # with batching, as TF Serving: the wait too
            if self.batcher is None or not plan.inputs:
                outputs = plan.run(plan.inputs)
            else:
                outputs = self.batcher.run(plan.batch_key, plan.inputs, plan.run, timeout)
        return plan.finish(outputs)

    async def predict_async(self, spec: model_pb2.ModelSpec, inputs: dict[str, np.ndarray], output_filter=(),
                            timeout: float | None = None, executor=None) -> tuple[Resolved, dict[str, np.ndarray]]:
        """`predict` for the asyncio gRPC server: batched requests wait on a future, not a thread;
        unbatched ones run the model in `executor`."""
        servable = self.resolve(spec)
        resolved = Resolved(servable, spec.signature_name or DEFAULT_SIGNATURE)
        plan = _PredictPlan.of(servable, resolved.signature_name, inputs, output_filter)
        with self.timing_runtime(servable.name, "Predict"):
            if self.batcher is None or not plan.inputs:
                outputs = await asyncio.get_running_loop().run_in_executor(executor, plan.run, plan.inputs)
            else:
                outputs = await self.batcher.run_async(plan.batch_key, plan.inputs, plan.run, timeout)
        return resolved, plan.finish(outputs)

    # ---- Classify / Regress / MultiInference ---------------------------------------------
    def classify(self, spec: model_pb2.ModelSpec, input_proto: input_pb2.Input
                 ) -> tuple[Resolved, classification_pb2.ClassificationResult]:
        servable = self.resolve(spec)
        resolved, result = self._classify_on(servable, spec.signature_name or DEFAULT_SIGNATURE, input_proto)
        self.metrics.observe_examples(servable.name, len(result.classifications))
        return resolved, result

    def _classify_on(self, servable: Servable, signature_name: str, input_proto: input_pb2.Input):
        signature = self._method_signature(servable, signature_name, CLASSIFY_METHOD, "classification")
        outputs = self._run_on_examples(servable, signature_name, signature, input_proto, "Classify")
        classes, scores = outputs.get("classes"), outputs.get("scores")
        count = len(classes if classes is not None else scores)
        if scores is not None and scores.ndim == 1:
            scores = scores.reshape(count, 1)
        if classes is not None and classes.ndim == 1:
            classes = classes.reshape(count, 1)
        result = classification_pb2.ClassificationResult()
        for i in range(count):
            row = result.classifications.add()
            width = (classes if classes is not None else scores).shape[1]
            for j in range(width):
                cls = row.classes.add()
                if classes is not None:
                    cls.label = classes[i, j].decode() if isinstance(classes[i, j], bytes) else str(classes[i, j])
                if scores is not None:
                    cls.score = float(scores[i, j])
        return Resolved(servable, signature_name), result

    def regress(self, spec: model_pb2.ModelSpec, input_proto: input_pb2.Input
                ) -> tuple[Resolved, regression_pb2.RegressionResult]:
        servable = self.resolve(spec)
        resolved, result = self._regress_on(servable, spec.signature_name or DEFAULT_SIGNATURE, input_proto)
        self.metrics.observe_examples(servable.name, len(result.regressions))
        return resolved, result

    def _regress_on(self, servable: Servable, signature_name: str, input_proto: input_pb2.Input):
        signature = self._method_signature(servable, signature_name, REGRESS_METHOD, "regression")
        outputs = self._run_on_examples(servable, signature_name, signature, input_proto, "Regress")
        values = outputs["outputs"].reshape(-1)
        result = regression_pb2.RegressionResult()
        for v in values:
            result.regressions.add(value=float(v))
        return Resolved(servable, signature_name), result

    def multi_inference(self, request: inference_pb2.MultiInferenceRequest) -> inference_pb2.MultiInferenceResponse:
        if not request.tasks:
            raise invalid_argument("Inference request should have at least one task.")
        first = request.tasks[0].model_spec
        if any(t.model_spec.name != first.name for t in request.tasks):
            raise invalid_argument("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        if len({t.model_spec.signature_name for t in request.tasks}) != len(request.tasks):
            raise invalid_argument("Duplicate evaluation of signature")
        servable = self.resolve(first)
        response = inference_pb2.MultiInferenceResponse()
        for task in request.tasks:
            name = task.model_spec.signature_name or DEFAULT_SIGNATURE
            if task.method_name == CLASSIFY_METHOD:
                resolved, result = self._classify_on(servable, name, request.input)
                response.results.add(model_spec=resolved.model_spec(), classification_result=result)
            elif task.method_name == REGRESS_METHOD:
                resolved, result = self._regress_on(servable, name, request.input)
                response.results.add(model_spec=resolved.model_spec(), regression_result=result)
            else:
                raise invalid_argument(f"Unsupported signature method_name: {task.method_name}")
        self.metrics.observe_examples(servable.name, len(serialize_examples(request.input)))
        return response

    def _method_signature(self, servable: Servable, name: str, method: str, what: str
                          ) -> meta_graph_pb2.SignatureDef:
        """The signature for Classify/Regress, checked by shape of inputs and outputs.

        As TF Serving's GetClassificationSignatureDef / PreProcessClassification
        (tensorflow_serving/servables/tensorflow/classifier.cc; regressor.cc alike): the
        signature's method_name must be classify (regress) only when the server runs with
        --enable_signature_method_name_check (util.cc GetSignatureMethodNameCheckFeature; the
        flag in model_servers/main.cc defaults to false). Off, a signature that keras.export.
        ExportArchive or tf.saved_model.save wrote (every method_name "tensorflow/serving/predict")
        is accepted when its inputs and outputs fit; on, it is INVALID_ARGUMENT with TF Serving's
        message.
        """
        if name not in servable.signature_defs:
            raise invalid_argument(f"No signature was found with the name: {name}")
        signature = servable.signature_defs[name]
        if self.method_name_check and signature.method_name != method:
            raise invalid_argument(f"Expected {what} signature method_name to be {method}. Was: "
                                   f"{signature.method_name} (the server runs with "
                                   "--enable_signature_method_name_check; TF2 exports mark every signature "
                                   "predict: start it without that flag)")
        if len(signature.inputs) != 1 or "inputs" not in signature.inputs:
            raise invalid_argument(f"Expected one input Tensor named \"inputs\" in {what} signature {name}; "
                                   f"found {sorted(signature.inputs)}")
        if signature.inputs["inputs"].dtype != types_pb2.DT_STRING:
            raise invalid_argument(f"{what.capitalize()} signature {name} takes "
                                   f"{tf.dtypes.as_dtype(signature.inputs['inputs'].dtype).name} \"inputs\", not "
                                   "serialized tf.Examples (string); call it with Predict")
        wanted = {"classes", "scores"} if method == CLASSIFY_METHOD else {"outputs"}
        if not wanted & set(signature.outputs):
            raise invalid_argument(f"Expected {what} signature outputs to contain "
                                   f"{' or '.join(sorted(wanted))}. Signature {name} has {sorted(signature.outputs)}")
        return signature

    def _run_on_examples(self, servable, signature_name, signature, input_proto, api: str) -> dict[str, np.ndarray]:
        keys = [k for k in ("classes", "scores", "outputs") if k in signature.outputs]
        examples = serialize_examples(input_proto)
        with self.timing_runtime(servable.name, api):
            return servable.run(signature_name, {"inputs": examples}, keys)

    # ---- Metadata / status / reload ----------------------------------------------------
    def metadata(self, spec: model_pb2.ModelSpec, fields) -> tuple[Servable, meta_graph_pb2.SignatureDef]:
        if not fields:
            raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in fields:
            if field != "signature_def":
                raise invalid_argument(f"Metadata field {field} is not supported")
        servable = self.resolve(spec)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, value in sorted(servable.signature_defs.items()):
            signature_map.signature_def[key].CopyFrom(value)
        return servable, signature_map

    def status(self, spec: model_pb2.ModelSpec):
        version, label = spec_version(spec)
        return self.manager.status(spec.name, version, label)

    # ---- Warmup -----------------------------------------------------------------------
    def warmup(self, servable: Servable) -> int:
        """Replays assets.extra/tf_serving_warmup_requests on a version before it is served."""
        path = posixpath.join(servable.path, WARMUP_FILE)  # a gfile path (gs://, ram://): never pathlib
        if not tf.io.gfile.exists(path):
            return 0
        count, started, status = 0, time.perf_counter(), "INTERNAL"
        try:
            for record in tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS):
                log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
                self._replay(servable, log)
                count += 1
            status = "OK"
        except tf.errors.DataLossError as e:
            status = f"DATA_LOSS: {e.message}"
            raise LoadError(f"warmup file {path} is corrupt: {e.message}") from None
        except ServingError as e:
            status = f"{e.code.name}: {e.message}"
            raise LoadError(f"warmup record {count} in {path} failed: {e.message}") from None
        finally:  # labelled as saved_model_warmup_util.cc does: export dir, absl::Status::ToString()
            self.metrics.observe_warmup(str(servable.path), status, time.perf_counter() - started)
        return count

    def _replay(self, servable: Servable, log: prediction_log_pb2.PredictionLog) -> None:
        kind = log.WhichOneof("log_type")
        if kind == "predict_log":
            request = log.predict_log.request
            inputs = {k: proto_to_ndarray(v, k) for k, v in request.inputs.items()}
            self.run_predict(servable, request.model_spec.signature_name or DEFAULT_SIGNATURE, inputs,
                             request.output_filter)
        elif kind == "classify_log":
            request = log.classify_log.request
            self._classify_on(servable, request.model_spec.signature_name or DEFAULT_SIGNATURE, request.input)
        elif kind == "regress_log":
            request = log.regress_log.request
            self._regress_on(servable, request.model_spec.signature_name or DEFAULT_SIGNATURE, request.input)
        else:
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Unsupported log_type for warmup: {kind}")


@dataclasses.dataclass
class _PredictPlan:
    """One Predict on one servable, checked: what to run, how batches key it, how to finish it."""
    servable: Servable
    signature_name: str
    signature: meta_graph_pb2.SignatureDef
    inputs: dict[str, np.ndarray]  # checked against the signature
    output_keys: list[str]
    lenient: bool  # an input gained a trailing 1 that the outputs must lose again

    @classmethod
    def of(cls, servable: Servable, signature_name: str, inputs, output_filter) -> _PredictPlan:
        signature = servable.signature(signature_name)
        checked, lenient = check_inputs(signature, inputs)
        return cls(servable, signature_name, signature, checked, _output_keys(signature, output_filter), lenient)

    @property
    def batch_key(self) -> tuple:
        return id(self.servable), self.signature_name, tuple(self.output_keys)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.servable.run(self.signature_name, inputs, self.output_keys)

    def finish(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return squeeze_lenient_outputs(self.signature, outputs) if self.lenient else outputs


def _output_keys(signature: meta_graph_pb2.SignatureDef, output_filter) -> list[str]:
    if not output_filter:
        return sorted(signature.outputs)
    for alias in output_filter:
        if alias not in signature.outputs:
            raise invalid_argument(f"output tensor alias not found in signature: {alias} Outputs expected "
                                   f"to be in the set {{{','.join(sorted(signature.outputs))}}}.")
    return list(dict.fromkeys(output_filter))


def serialize_examples(input_proto: input_pb2.Input) -> np.ndarray:
    """tf.Examples (with an optional shared context merged in) as a DT_STRING [N] array."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        examples = list(input_proto.example_list.examples)
    elif kind == "example_list_with_context":
        context = input_proto.example_list_with_context.context
        examples = []
        for example in input_proto.example_list_with_context.examples:
            merged = type(example)()
            merged.CopyFrom(context)
            merged.MergeFrom(example)
            examples.append(merged)
    else:
        raise invalid_argument("Input is empty.")
    if not examples:
        raise invalid_argument("Input is empty.")
    return np.array([e.SerializeToString() for e in examples], dtype=object)
