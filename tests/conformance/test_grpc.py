"""TF Serving's gRPC API: every method and the errors of SERVING_SPEC.md, on any server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    input_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)

from tests.conformance.conftest import MODELS


def spec(name="half_plus_two", version=None, label=None, signature=""):
    s = model_pb2.ModelSpec(name=name, signature_name=signature)
    if version is not None:
        s.version.value = version
    if label is not None:
        s.version_label = label
    return s


def predict_request(values, **kwargs) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(model_spec=spec(**kwargs))
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.asarray(values, np.float32)))
    return request


def examples(*values, key="x") -> input_pb2.Input:
    proto = input_pb2.Input()
    for v in values:
        proto.example_list.examples.add().features.feature[key].float_list.value.append(v)
    return proto


def code_and_message(call, request):
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value.code(), info.value.details()


@pytest.mark.parametrize("model", ["half_plus_two", "half_plus_two_tf1"])
def test_predict_outputs_in_typed_fields(target, model):
    # ServerCore's default predict_response_tensor_serialization_option is kAsProtoField
    y = target.predict.Predict(predict_request([[1.0], [2.0], [3.0]], name=model), timeout=30).outputs["y"]
    assert list(y.float_val) == [2.5, 3.0, 3.5] and not y.tensor_content
    assert (y.dtype, [d.size for d in y.tensor_shape.dim]) == (tf.float32.as_datatype_enum, [3, 1])


def test_tf_serving_end_to_end_check_of_float_val(target):
    # tensorflow_model_server_test.py's _VerifyModelSpec pattern: one value in, one float_val out
    response = target.predict.Predict(predict_request([2.0]), timeout=30)
    assert len(response.outputs["y"].float_val) == 1 and response.outputs["y"].float_val[0] == 3.0


@pytest.mark.slow
def test_predict_outputs_in_tensor_content_with_the_flag(tensor_content_target):
    response = tensor_content_target.Predict(predict_request([[1.0], [2.0]]), timeout=30)
    y = response.outputs["y"]
    assert not y.float_val and np.frombuffer(y.tensor_content, np.float32).tolist() == [2.5, 3.0]
    assert tf.make_ndarray(y).tolist() == [[2.5], [3.0]]


@pytest.mark.parametrize("model", ["half_plus_two", "half_plus_two_tf1"])
def test_predict_tensor_content_echoes_resolved_spec(target, model):
    response = target.predict.Predict(predict_request([[1.0], [2.0], [3.0]], name=model), timeout=30)
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [[2.5], [3.0], [3.5]]
    assert (response.model_spec.name, response.model_spec.version.value,
            response.model_spec.signature_name) == (model, 123, "serving_default")


def test_predict_typed_float_val_and_trailing_one_leniency(target):
    request = predict_pb2.PredictRequest(model_spec=spec())
    request.inputs["x"].dtype = tf.float32.as_datatype_enum
    request.inputs["x"].tensor_shape.dim.add(size=3)
    request.inputs["x"].float_val.extend([2.0, 3.0, 4.0])
    response = target.predict.Predict(request, timeout=30)
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [3.0, 3.5, 4.0]


def test_versions_and_labels(target):
    def y(**kwargs):
        response = target.predict.Predict(predict_request([[2.0]], name="two_versions", **kwargs), timeout=30)
        return tf.make_ndarray(response.outputs["y"]).item(), response.model_spec.version.value

    assert y() == (4.0, 124)  # latest
    assert y(version=123) == (3.0, 123)
    assert y(label="stable") == (3.0, 123)
    assert y(label="canary") == (4.0, 124)


def test_output_filter(target):
    request = predict_request([[1.0]])
    request.output_filter.append("y")
    assert list(target.predict.Predict(request, timeout=30).outputs) == ["y"]
    request.output_filter[:] = ["foo"]
    assert code_and_message(target.predict.Predict, request) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "output tensor alias not found in signature: foo Outputs expected to be in the set {y}.")


@pytest.mark.parametrize("model", ["half_plus_two", "half_plus_two_tf1"])
def test_classify_and_regress(target, model):
    request = classification_pb2.ClassificationRequest(model_spec=spec(model, signature="classify_x_to_y"),
                                                       input=examples(2.0, 4.0))
    response = target.predict.Classify(request, timeout=30)
    assert [[c.score for c in row.classes] for row in response.result.classifications] == [[3.0], [4.0]]
    assert response.model_spec.signature_name == "classify_x_to_y"
    request = regression_pb2.RegressionRequest(model_spec=spec(model, signature="regress_x_to_y2"),
                                               input=examples(2.0))
    assert [r.value for r in target.predict.Regress(request, timeout=30).result.regressions] == [4.0]


def test_multi_inference(target):
    request = inference_pb2.MultiInferenceRequest(input=examples(2.0))
    request.tasks.add(model_spec=spec(signature="regress_x_to_y"), method_name="tensorflow/serving/regress")
    request.tasks.add(model_spec=spec(signature="classify_x_to_y"), method_name="tensorflow/serving/classify")
    results = target.predict.MultiInference(request, timeout=30).results
    assert results[0].regression_result.regressions[0].value == 3.0
    assert results[1].classification_result.classifications[0].classes[0].score == 3.0


def test_model_metadata(target):
    request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec("half_plus_two_tf1"),
                                                             metadata_field=["signature_def"])
    response = target.predict.GetModelMetadata(request, timeout=30)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    signature = signature_map.signature_def["serving_default"]
    assert (list(signature.inputs), list(signature.outputs)) == (["x"], ["y"])
    assert signature.inputs["x"].dtype == tf.float32.as_datatype_enum
    assert response.model_spec.version.value == 123
    assert {"classify_x_to_y", "regress_x_to_y", "regress_x2_to_y3"} <= set(signature_map.signature_def)


def test_model_status(target):
    response = target.models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(
        model_spec=spec("two_versions")), timeout=30)
    states = {s.version: (s.state, s.status.error_code) for s in response.model_version_status}
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert states == {123: (available, 0), 124: (available, 0)}


def test_health_reports_serving_per_service(target):
    stub = health_pb2_grpc.HealthStub(target.channel)
    for service in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_health_list_is_implemented(target, embedded_only):
    # reflection lists grpc.health.v1.Health, so every method of it must answer
    stub = health_pb2_grpc.HealthStub(target.channel)
    statuses = stub.List(health_pb2.HealthListRequest(), timeout=10).statuses
    assert statuses[""].status == health_pb2.HealthCheckResponse.SERVING


ERRORS = [
    ("unknown model", lambda: predict_request([[1.0]], name="foo"),
     grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(foo)"),
    ("unknown version", lambda: predict_request([[1.0]], version=99),
     grpc.StatusCode.NOT_FOUND, "Servable not found for request: Specific(half_plus_two, 99)"),
    ("unknown label", lambda: predict_request([[1.0]], name="two_versions", label="nope"),
     grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: nope"),
    ("empty name", lambda: predict_request([[1.0]], name=""),
     grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified."),
    ("unknown signature", lambda: predict_request([[1.0]], signature="nope"),
     grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "nope" not found.'),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_predict_errors(target, case):
    _, make, code, message = case
    assert code_and_message(target.predict.Predict, make()) == (code, message)


def test_wrong_alias(target):
    request = predict_pb2.PredictRequest(model_spec=spec())
    request.inputs["foo"].CopyFrom(tf.make_tensor_proto(np.ones((1, 1), np.float32)))
    assert code_and_message(target.predict.Predict, request) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "input tensor alias not found in signature: foo. Inputs expected to be in the set {x}.")


@pytest.mark.parametrize("value", [np.ones((1, 1), np.int64), np.ones((2, 3), np.float32), np.ones((1, 1, 1), np.float32)],
                         ids=["dtype", "shape", "rank"])
def test_wrong_dtype_or_shape_is_invalid_argument_naming_the_input(target, embedded_only, value):
    request = predict_pb2.PredictRequest(model_spec=spec())
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(value))
    code, message = code_and_message(target.predict.Predict, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'x'" in message and "expects" in message


def test_status_and_metadata_errors(target):
    code, message = code_and_message(target.models.GetModelStatus,
                                     get_model_status_pb2.GetModelStatusRequest(model_spec=spec("foo")))
    assert (code, message) == (grpc.StatusCode.NOT_FOUND, "Could not find any versions of model foo")
    code, message = code_and_message(target.predict.GetModelMetadata,
                                     get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec()))
    assert (code, message) == (grpc.StatusCode.INVALID_ARGUMENT,
                               "GetModelMetadataRequest must specify at least one metadata_field")


def test_all_models_listed(target):
    for name in MODELS:
        target.models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec=spec(name)), timeout=30)
