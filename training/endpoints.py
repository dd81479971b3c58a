"""Optional signatures of an export: compress/decompress (uint8 codes) and classify/classify_examples (a probe).

    aekit export --workdir runs/ae --model-base-path models/autoencoder            # compress, decompress
    aekit export --workdir runs/ae --model-base-path models/autoencoder --probe    # also classify, classify_examples

Each family keeps together what must agree: the endpoints added to the archive, what the loaded-back
SavedModel must return, the warmup requests that exercise them, and the files or inputs a client
needs to call them (COMPRESSION_FILE, read by training/compress.py; image_examples, the tf.Examples
classify_examples parses). training/export.py builds, checks and publishes the version and calls
these; nothing here imports it, so the endpoint code sits below the export in the import graph.
"""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    input_pb2,
    model_pb2,
    predict_pb2,
    prediction_log_pb2,
)

from storage import paths
from training import quantize
from training.probe import LinearProbe

COMPRESSION_FILE = "assets.extra/aekit_compression.json"  # decoder fingerprint and quantization ranges
EXAMPLE_FEATURE = "images"  # classify_examples: the tf.Example float feature holding an image's H*W*C values
WARMUP_RECORDS_PER_SIGNATURE = 2  # warmup records per signature; training/export.py's write_warmup uses it too


def add_compression_endpoints(archive: keras.export.ExportArchive, encoder: keras.Model, decoder: keras.Model,
                              ranges: quantize.Ranges, image_spec: tf.TensorSpec) -> None:
    """compress: images -> codes (uint8 [N, D], one byte per latent dimension); decompress: codes ->
    images (float32 in [0, 1]). The ranges are variables of the model (training/quantize.py)."""
    low = tf.Variable(ranges.low, trainable=False, name="quantize_low")
    high = tf.Variable(ranges.high, trainable=False, name="quantize_high")
    archive.track(low)
    archive.track(high)

    def compress(images):
        return {"codes": quantize.quantize(encoder(images, training=False), low, high)}

    def decompress(codes):
        images = decoder(quantize.dequantize(codes, low, high), training=False)
        return {"images": tf.clip_by_value(images, 0.0, 1.0)}  # a linear-output decoder can overshoot

    archive.add_endpoint("compress", compress, input_signature=[image_spec])
    archive.add_endpoint("decompress", decompress,
                         input_signature=[tf.TensorSpec((None, ranges.dim), tf.uint8, name="codes")])


def compression_metadata(decoder: keras.Model, ranges: quantize.Ranges) -> dict:
    """What COMPRESSION_FILE holds: a code file's reader checks `fingerprint` before decoding."""
    return {"fingerprint": quantize.fingerprint(decoder, ranges), "latent_dim": ranges.dim,
            "image_shape": list(decoder.output_shape[1:]), "levels": quantize.LEVELS,
            "low": ranges.low.tolist(), "high": ranges.high.tolist()}


def read_compression_metadata(version_dir: str) -> dict | None:
    """COMPRESSION_FILE of a version, or None for exports from before compression was added."""
    path = paths.join(version_dir, COMPRESSION_FILE)
    return json.loads(paths.read_text(path)) if paths.exists(path) else None


def expected_compression(encoder: keras.Model, decoder: keras.Model, ranges: quantize.Ranges,
                         images: np.ndarray) -> dict:
    """What compress and decompress must return: numpy quantization of the Keras model's codes."""
    codes = quantize.quantize_np(encoder(images, training=False).numpy(), ranges)
    decoded = np.clip(decoder(quantize.dequantize_np(codes, ranges), training=False).numpy(), 0.0, 1.0)
    return {"compress": ({"images": images}, {"codes": codes}),
            "decompress": ({"codes": codes}, {"images": decoded})}

def compression_warmup(images: np.ndarray, codes: np.ndarray) -> list[prediction_log_pb2.PredictionLog]:
    """Predicts of `compress` and `decompress` (uint8 codes) per warmup image."""
    logs = []
    for signature, alias, values in [("compress", "images", images), ("decompress", "codes", codes)]:
        for i in range(WARMUP_RECORDS_PER_SIGNATURE):
            request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name=signature))
            request.inputs[alias].CopyFrom(tf.make_tensor_proto(values[i: i + 1]))
            logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs

def add_classify_endpoints(archive: keras.export.ExportArchive, encoder: keras.Model, probe: LinearProbe,
                           image_spec: tf.TensorSpec) -> None:
    """classify: images -> classes (int64 [N], the predicted label) and scores (float32 [N, K], one
    probability per class, column j for probe.class_ids[j]), for Predict. classify_examples: the same
    for TF Serving's Classify API, which feeds serialized tf.Examples as the one string input
    `inputs` and reads `classes` as DT_STRING and `scores` as DT_FLOAT, both [batch, num_classes]
    and zipped column by column (tensorflow_serving/servables/tensorflow/classifier.cc,
    PreProcessClassification and PostProcessClassificationResult)."""
    names = ("probe_mean", "probe_scale", "probe_weights", "probe_bias", "probe_class_ids")
    mean, scale, weights, bias, class_ids = (
        tf.Variable(value, trainable=False, name=name) for name, value in
        zip(names, (probe.mean, probe.scale, probe.weights, probe.bias, probe.class_ids)))
    for variable in (mean, scale, weights, bias, class_ids):
        archive.track(variable)
    shape = tuple(image_spec.shape[1:])

    def scores_of(images):
        codes = (encoder(images, training=False) - mean) / scale
        return tf.nn.softmax(tf.matmul(codes, weights) + bias)

    def classify(images):
        scores = scores_of(images)
        return {"classes": tf.gather(class_ids, tf.argmax(scores, axis=1)), "scores": scores}

    def classify_examples(inputs):
        feature = {EXAMPLE_FEATURE: tf.io.FixedLenFeature([math.prod(shape)], tf.float32)}
        images = tf.reshape(tf.io.parse_example(inputs, feature)[EXAMPLE_FEATURE], [-1, *shape])
        scores = scores_of(images)
        labels = tf.tile(tf.strings.as_string(class_ids)[tf.newaxis], [tf.shape(scores)[0], 1])
        return {"classes": labels, "scores": scores}

    archive.add_endpoint("classify", classify, input_signature=[image_spec])
    archive.add_endpoint("classify_examples", classify_examples,
                         input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])


def image_examples(images: np.ndarray) -> list[bytes]:
    """Serialized tf.Examples with each image's values as the float feature classify_examples parses."""
    return [tf.train.Example(features=tf.train.Features(feature={EXAMPLE_FEATURE: tf.train.Feature(
        float_list=tf.train.FloatList(value=np.asarray(image, np.float32).ravel()))})).SerializeToString()
            for image in images]

def expected_classify(probe: LinearProbe, latent: np.ndarray, images: np.ndarray) -> dict:
    """What classify and classify_examples must return: the sklearn probe's predict_proba and predict."""
    scores = probe.classifier.predict_proba(latent).astype(np.float32)
    classes = probe.classifier.predict(latent).astype(np.int64)
    labels = np.tile(np.array([str(c).encode() for c in probe.class_ids], object), (len(latent), 1))
    return {"classify": ({"images": images}, {"classes": classes, "scores": scores}),
            "classify_examples": ({"inputs": np.array(image_examples(images), object)},
                                  {"classes": labels, "scores": scores})}

def classify_warmup(images: np.ndarray) -> list[prediction_log_pb2.PredictionLog]:
    """A Predict of `classify` and a Classify of `classify_examples` per warmup image."""
    logs = []
    for i in range(WARMUP_RECORDS_PER_SIGNATURE):
        request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name="classify"))
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images[i: i + 1]))
        logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
        examples = [tf.train.Example.FromString(e) for e in image_examples(images[i: i + 1])]
        classify = classification_pb2.ClassificationRequest(
            model_spec=model_pb2.ModelSpec(signature_name="classify_examples"),
            input=input_pb2.Input(example_list=input_pb2.ExampleList(examples=examples)))
        logs.append(prediction_log_pb2.PredictionLog(classify_log=prediction_log_pb2.ClassifyLog(request=classify)))
    return logs
