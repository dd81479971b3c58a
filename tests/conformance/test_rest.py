"""TF Serving's REST API: JSON shapes, status codes and error bodies, on any server."""

from __future__ import annotations

import pytest
import tensorflow as tf
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import model_pb2, predict_pb2


def test_status_json(target):
    assert target.rest("GET", "/v1/models/half_plus_two") == (200, {"model_version_status": [
        {"version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
    status, body = target.rest("GET", "/v1/models/two_versions/labels/canary")
    assert status == 200 and [s["version"] for s in body["model_version_status"]] == ["124"]
    status, body = target.rest("GET", "/v1/models/two_versions/versions/123")
    assert status == 200 and [s["version"] for s in body["model_version_status"]] == ["123"]


def test_metadata_json(target):
    status, body = target.rest("GET", "/v1/models/half_plus_two_tf1/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "half_plus_two_tf1", "signature_name": "", "version": "123"}
    x = body["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["x"]
    assert x["dtype"] == "DT_FLOAT"
    assert x["tensor_shape"] == {"dim": [{"size": "-1", "name": ""}, {"size": "1", "name": ""}], "unknown_rank": False}


@pytest.mark.parametrize("model", ["half_plus_two", "half_plus_two_tf1"])
def test_predict_row_and_columnar(target, model):
    assert target.rest("POST", f"/v1/models/{model}:predict", {"instances": [2.0, 3.0, 4.0]}) == \
        (200, {"predictions": [3.0, 3.5, 4.0]})
    assert target.rest("POST", f"/v1/models/{model}:predict", {"inputs": {"x": [[2.0], [4.0]]}}) == \
        (200, {"outputs": [[3.0], [4.0]]})
    assert target.rest("POST", f"/v1/models/{model}:predict", {"instances": [{"x": [1.0]}]}) == \
        (200, {"predictions": [[2.5]]})


def test_predict_version_label_and_nan(target):
    assert target.rest("POST", "/v1/models/two_versions/labels/stable:predict", {"instances": [[2.0]]}) == \
        (200, {"predictions": [[3.0]]})
    assert target.rest("POST", "/v1/models/two_versions/versions/124:predict", {"instances": [[2.0]]}) == \
        (200, {"predictions": [[4.0]]})
    status, body = target.rest("POST", "/v1/models/half_plus_two:predict", b'{"instances": [[NaN], [Infinity]]}')
    assert status == 200 and body["predictions"][1] == [float("inf")] and body["predictions"][0][0] != body["predictions"][0][0]


def test_classify_and_regress(target):
    assert target.rest("POST", "/v1/models/half_plus_two_tf1:classify",
                       {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]}) == \
        (200, {"results": [[["", 3.0]]]})
    assert target.rest("POST", "/v1/models/half_plus_two:regress",
                       {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}, {"x": 4.0}]}) == \
        (200, {"results": [3.0, 4.0]})


ERRORS = [
    ("GET", "/v1/models/foo", None, 404, "Could not find any versions of model foo"),
    ("POST", "/v1/models/foo:predict", {"instances": [1.0]}, 404, "Servable not found for request: Latest(foo)"),
    ("POST", "/v1/models/half_plus_two/versions/99:predict", {"instances": [1.0]}, 404,
     "Servable not found for request: Specific(half_plus_two, 99)"),
    ("POST", "/v1/models/two_versions/labels/nope:predict", {"instances": [1.0]}, 400,
     "Unrecognized servable version label: nope"),
    ("POST", "/v1/models/half_plus_two:predict", {"signature_name": "nope", "instances": [1.0]}, 400,
     'Serving signature name: "nope" not found in signature def'),
    ("POST", "/v1/models/half_plus_two:predict", {"inputs": {"foo": [1.0]}}, 400,
     "input tensor alias not found in signature: foo. Inputs expected to be in the set {x}."),
    ("GET", "/v1/models/half_plus_two/bogus", None, 400, "Malformed request: GET /v1/models/half_plus_two/bogus"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[f"{c[0]} {c[1]}" for c in ERRORS])
def test_errors(target, case):
    method, path, body, status, message = case
    assert target.rest(method, path, body) == (status, {"error": message})


@pytest.mark.parametrize("body", [b"{not json", b'{"instances": [1.0], "inputs": [1.0]}', b"{}",
                                  b'{"instances": [[1.0], [1.0, 2.0]]}', b'{"instances": ["a"]}'],
                         ids=["malformed", "both keys", "neither key", "ragged", "strings for floats"])
def test_bad_predict_bodies_are_400_with_error(target, body):
    status, reply = target.rest("POST", "/v1/models/half_plus_two:predict", body)
    assert status == 400 and isinstance(reply, dict) and set(reply) == {"error"} and reply["error"]


def test_rest_documentation_example_on_a_shapeless_signature(target):
    # TF Serving's REST API doc, on saved_model_half_plus_three (its signature declares no shapes)
    assert target.rest("POST", "/v1/models/half_plus_three:predict", {"instances": [1.0, 2.0, 5.0]}) == \
        (200, {"predictions": [3.5, 4.0, 5.5]})


def test_prometheus_metrics_have_tf_servings_names(target):
    # Series that TF Serving records for a gRPC Predict (prediction_service_impl.cc, predict_util.cc)
    predict = target.predict.Predict
    predict(predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="half_plus_two"),
                                       inputs={"x": tf.make_tensor_proto([[1.0]])}), timeout=30)
    status, text = target.rest("GET", "/monitoring/prometheus/metrics")
    assert status == 200
    page = {f.name: f for f in text_string_to_metric_families(text)}
    count = page[":tensorflow:serving:request_count"]
    assert count.type == "counter" and "# TYPE :tensorflow:serving:request_count counter" in text
    assert any(s.labels == {"model_name": "half_plus_two", "status": "OK"} for s in count.samples)
    latency = page[":tensorflow:serving:request_latency"]
    assert latency.type == "histogram"
    assert any(s.labels.get("API") == "Predict" and s.labels.get("entrypoint") == "GRPC"
               and s.labels.get("model_name") == "half_plus_two" for s in latency.samples)
    runtime = page[":tensorflow:serving:runtime_latency"]
    assert any(s.labels.get("runtime") == "TF1" for s in runtime.samples)
    assert "_created" not in text and ":tensorflow:serving:request_count_total" not in text
