"""Test SavedModels built by code, equivalent to TF Serving's own half_plus_two test models.

    python -m tests.model_fixtures OUT_DIR   # writes the models and a models.config for a real TF Serving

Both compute y = a*x + b (a=0.5, b=2 by default) under TF Serving's signature names:
serving_default (x -> y), classify_x_to_y, regress_x_to_y, regress_x_to_y2 (0.5x+3) and
regress_x2_to_y3. One is a TF2 tf.Module, one a TF1 graph written with saved_model.Builder
(served through the TF1 Session path, as TF Serving's C++ loader does). write_tf1_shapeless is
the TF1 export whose signature declares no shapes, like TF Serving's saved_model_half_plus_three.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2


def _parse(serialized, key):
    return tf.io.parse_example(serialized, {key: tf.io.FixedLenFeature([1], tf.float32)})[key]


class HalfPlusTwo(tf.Module):
    def __init__(self, b: float):
        super().__init__()
        self.a, self.b, self.c = tf.Variable(0.5), tf.Variable(b), tf.Variable(3.0)

    @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="x")])
    def predict(self, x):
        return {"y": self.a * x + self.b}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify_x_to_y(self, inputs):
        return {"scores": self.a * _parse(inputs, "x") + self.b}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress_x_to_y(self, inputs):
        return {"outputs": self.a * _parse(inputs, "x") + self.b}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress_x_to_y2(self, inputs):
        return {"outputs": self.a * _parse(inputs, "x") + self.c}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress_x2_to_y3(self, inputs):
        return {"outputs": self.a * _parse(inputs, "x2") + self.c}


def write_tf2(version_dir: str | Path, b: float = 2.0) -> Path:
    module = HalfPlusTwo(b)
    signatures = {"serving_default": module.predict, "classify_x_to_y": module.classify_x_to_y,
                  "regress_x_to_y": module.regress_x_to_y, "regress_x_to_y2": module.regress_x_to_y2,
                  "regress_x2_to_y3": module.regress_x2_to_y3}
    tf.saved_model.save(module, str(version_dir), signatures=signatures)
    return Path(version_dir)


def write_tf1(version_dir: str | Path, b: float = 2.0) -> Path:
    utils = tf.compat.v1.saved_model
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        a = tf.compat.v1.Variable(0.5, name="a")
        bias = tf.compat.v1.Variable(b, name="b")
        c = tf.compat.v1.Variable(3.0, name="c")
        serialized = tf.compat.v1.placeholder(tf.string, [None], name="tf_example")
        features = tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([1], tf.float32),
                                                    "x2": tf.io.FixedLenFeature([1], tf.float32, [0.0])})
        x = tf.identity(features["x"], name="x")
        x2 = tf.identity(features["x2"], name="x2")
        y = tf.add(a * x, bias, name="y")
        y2 = tf.add(a * x, c, name="y2")
        y3 = tf.add(a * x2, c, name="y3")
        session.run(tf.compat.v1.global_variables_initializer())
        info = utils.build_tensor_info
        signatures = {
            "serving_default": utils.predict_signature_def({"x": x}, {"y": y}),
            "classify_x_to_y": utils.classification_signature_def(serialized, None, y),
            "regress_x_to_y": utils.regression_signature_def(serialized, y),
            "regress_x_to_y2": utils.regression_signature_def(serialized, y2),
            "regress_x2_to_y3": tf.compat.v1.saved_model.build_signature_def(
                {"inputs": info(x2)}, {"outputs": info(y3)}, "tensorflow/serving/regress"),
        }
        builder = utils.Builder(str(version_dir))
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map=signatures)
        builder.save()
    return Path(version_dir)


def write_tf1_shapeless(version_dir: str | Path, b: float = 3.0) -> Path:
    """A TF1 graph like TF Serving's saved_model_half_plus_three: y = 0.5*x + b, whose signature
    TensorInfos carry NO tensor_shape while the graph has x and y as [?, 1] (serving_default).
    More signatures: `any_rank` (x of unknown rank in the graph too: anything goes), `vector` (the
    graph itself insists on rank 1, so other shapes fail inside the Session run) and `misdeclared`
    (declares x as [-1] though the graph takes [?, 1]: the Session's own feed check refuses [N])."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        a = tf.compat.v1.Variable(0.5, name="a")
        bias = tf.compat.v1.Variable(b, name="b")
        x = tf.compat.v1.placeholder(tf.float32, [None, 1], name="x")
        y = tf.add(a * x, bias, name="y")
        x_any = tf.compat.v1.placeholder(tf.float32, None, name="x_any")
        y_any = tf.add(a * x_any, bias, name="y_any")
        y_vector = tf.add(a * tf.ensure_shape(x_any, [None]), bias, name="y_vector")
        session.run(tf.compat.v1.global_variables_initializer())

        def shapeless(tensor):  # what old TF1 exporters wrote: a name and a dtype, no shape
            return meta_graph_pb2.TensorInfo(name=tensor.name, dtype=tensor.dtype.as_datatype_enum)

        def predict(inputs, outputs):
            return tf.compat.v1.saved_model.build_signature_def(
                {k: shapeless(v) for k, v in inputs.items()}, {k: shapeless(v) for k, v in outputs.items()},
                "tensorflow/serving/predict")

        signatures = {"serving_default": predict({"x": x}, {"y": y}),
                      "any_rank": predict({"x": x_any}, {"y": y_any}),
                      "vector": predict({"x": x_any}, {"y": y_vector}),
                      "misdeclared": predict({"x": x}, {"y": y})}
        signatures["misdeclared"].inputs["x"].tensor_shape.dim.add(size=-1)
        builder = tf.compat.v1.saved_model.Builder(str(version_dir))
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map=signatures)
        builder.save()
    return Path(version_dir)


def write_corrupt(version_dir: str | Path) -> Path:
    """A version folder whose saved_model.pb is garbage: must never be served."""
    path = Path(version_dir)
    path.mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"\x08\x01this is not a SavedModel")
    return path


def write_conformance_models(root: str | Path) -> Path:
    """The models the conformance suite expects, and models.config naming them. Returns the config."""
    root = Path(root).resolve()
    write_tf2(root / "half_plus_two" / "00000123")
    write_tf1(root / "half_plus_two_tf1" / "00000123")
    write_tf1_shapeless(root / "half_plus_three" / "00000123")
    write_tf2(root / "two_versions" / "00000123", b=2.0)
    write_tf2(root / "two_versions" / "00000124", b=3.0)
    config = root / "models.config"
    config.write_text(f"""model_config_list {{
  config {{ name: "half_plus_two" base_path: "{root / 'half_plus_two'}" model_platform: "tensorflow" }}
  config {{ name: "half_plus_two_tf1" base_path: "{root / 'half_plus_two_tf1'}" model_platform: "tensorflow" }}
  config {{ name: "half_plus_three" base_path: "{root / 'half_plus_three'}" model_platform: "tensorflow" }}
  config {{
    name: "two_versions" base_path: "{root / 'two_versions'}" model_platform: "tensorflow"
    model_version_policy {{ all {{}} }}
    version_labels {{ key: "stable" value: 123 }}
    version_labels {{ key: "canary" value: 124 }}
  }}
}}
""")
    return config


if __name__ == "__main__":
    out = write_conformance_models(sys.argv[1] if len(sys.argv) > 1 else "conformance-models")
    print(f"wrote {out}; start TF Serving with --model_config_file={out}")
