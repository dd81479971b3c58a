"""Classify on a signature that keras.export.ExportArchive saved, with and without
--enable_signature_method_name_check, as tensorflow_model_server answers it."""

from __future__ import annotations

import logging

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow_serving.apis import input_pb2, model_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving import main as serving_main
from serving.core import CLASSIFY_METHOD, DataPlane
from serving.errors import ServingError
from serving.manager import ModelManager
from tests.model_fixtures import write_tf1

PREDICT_METHOD = "tensorflow/serving/predict"


def write_export_archive(version_dir) -> None:
    """An ExportArchive with a Classify-shaped endpoint: serialized tf.Examples with float `x` in,
    classes (string [N, 2]) and scores (float [N, 2]) out, like aekit's classify_examples."""
    archive = keras.export.ExportArchive()
    weight = tf.Variable(2.0)
    archive.track(weight)

    def classify_examples(inputs):
        x = tf.io.parse_example(inputs, {"x": tf.io.FixedLenFeature([], tf.float32)})["x"] * weight
        scores = tf.stack([tf.sigmoid(-x), tf.sigmoid(x)], axis=1)
        return {"classes": tf.tile(tf.constant([["neg", "pos"]]), [tf.shape(x)[0], 1]), "scores": scores}

    archive.add_endpoint("classify_examples", classify_examples,
                         input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    archive.write_out(str(version_dir))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("method_check")
    write_export_archive(root / "keras" / "1")
    write_tf1(root / "tf1" / "1")  # TF1's builder writes the real classify method name
    return root


def core_over(bases, method_name_check: bool) -> DataPlane:
    cfg = model_server_config_pb2.ModelServerConfig()
    for name in ("keras", "tf1"):
        cfg.model_config_list.config.add(name=name, base_path=str(bases / name), model_platform="tensorflow")
    manager = ModelManager()
    manager.reload(cfg)
    return DataPlane(manager, method_name_check=method_name_check)


def examples(key: str, values) -> input_pb2.Input:
    proto = input_pb2.Input()
    for v in values:
        proto.example_list.examples.add().CopyFrom(example_pb2.Example(features=feature_pb2.Features(
            feature={key: feature_pb2.Feature(float_list=feature_pb2.FloatList(value=[v]))})))
    return proto


def classify(core, model: str, signature: str, key: str):
    _, result = core.classify(model_pb2.ModelSpec(name=model, signature_name=signature), examples(key, [1.0, -1.0]))
    return [[(c.label, round(c.score, 4)) for c in row.classes] for row in result.classifications]


def test_export_archive_marks_the_signature_predict(bases):
    core = core_over(bases, False)
    assert core.resolve(model_pb2.ModelSpec(name="keras")).signature_defs["classify_examples"].method_name == \
        PREDICT_METHOD


def test_classify_on_a_predict_signature_is_served_without_the_check(bases):
    rows = classify(core_over(bases, False), "keras", "classify_examples", "x")
    assert [[label for label, _ in row] for row in rows] == [["neg", "pos"]] * 2
    assert rows[0][1][1] == pytest.approx(float(1 / (1 + np.exp(-2.0))), abs=1e-4)


def test_the_check_refuses_a_predict_signature_with_tf_servings_message(bases):
    core = core_over(bases, True)
    with pytest.raises(ServingError) as error:
        classify(core, "keras", "classify_examples", "x")
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (f"Expected classification signature method_name to be {CLASSIFY_METHOD}. Was: {PREDICT_METHOD}"
            in str(error.value))
    assert len(str(error.value).splitlines()) == 1
    # a TF1 export that carries the classify method name still classifies with the check on
    assert classify(core, "tf1", "classify_x_to_y", "x")[0][0][0] == ""


def test_the_flag_reaches_the_core_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="aekit.serve"):
        cfg = serving_main.parse_flags(["--model_base_path=/m", "--enable_signature_method_name_check=true"])
    assert cfg.enable_signature_method_name_check and not caplog.records
