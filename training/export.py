"""Export: a new numeric version of the SavedModel that TF Serving (or `aekit serve`) picks up.

    aekit export --workdir runs/ae --model-base-path models/autoencoder
    # -> models/autoencoder/<N+1>/ with signatures encode, decode, denoise, score, serving_default

The version is written under a hidden temporary name beside the versions, checked by loading it
back, and renamed into place: a server polling the folder never sees a half-written version.
Signatures are written with keras.export.ExportArchive because tf.saved_model.save on a Keras 3
model renames inputs and outputs (to `inputs`/`output_0`), which breaks every client.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from training import models
from training.config import ConfigError

WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
WARMUP_RECORDS_PER_SIGNATURE = 2
CHECK_TOLERANCE = 1e-4  # float32 reorderings between Keras and the traced graph stay far below this


class ExportError(RuntimeError):
    """The written SavedModel does not behave like the Keras model; nothing was published."""

    exit_code = 1


def next_version(base: Path) -> int:
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


@dataclasses.dataclass(frozen=True)
class Threshold:
    """The anomaly threshold and how it was chosen; the score signature returns both."""
    value: float  # an input whose reconstruction error exceeds this is an anomaly
    fpr: float  # the fraction of held-out normal examples it flags (the target false-positive rate)
    examples: int  # how many held-out normal examples it was calibrated on

    def describe(self) -> str:
        return (f"anomaly threshold {self.value:.6g}: flags {self.fpr:.2%} of {self.examples} "
                "held-out normal examples")


def calibrate_threshold(errors: np.ndarray, fpr: float) -> Threshold:
    """The threshold that flags exactly floor(fpr * n) of the n held-out normal errors (fewer on ties).

    An input is flagged when its error is strictly above the threshold, so the threshold is the
    order statistic just below the top floor(fpr * n): the largest false-positive rate on the
    calibration data that does not exceed `fpr`. np.quantile(errors, 1 - fpr) would interpolate
    between two errors and flag the same examples.
    """
    errors = np.sort(np.asarray(errors, np.float64).ravel())
    if len(errors) == 0:
        raise ConfigError("cannot calibrate the anomaly threshold on an empty held-out set")
    if not 0.0 < fpr < 1.0:
        raise ConfigError(f"the threshold's false-positive rate must be in (0, 1), got {fpr}")
    flagged = int(math.floor(fpr * len(errors) + 1e-9))  # 1e-9: 0.01 * 1000 is 9.999... in floats
    if flagged >= len(errors):
        flagged = len(errors) - 1
    return Threshold(float(errors[len(errors) - flagged - 1]), fpr, len(errors))


def build_archive(encoder: keras.Model, decoder: keras.Model, threshold: Threshold) -> keras.export.ExportArchive:
    """The serving signatures, with named inputs and outputs and a free batch dimension.

    score returns the threshold and its false-positive rate as outputs because outputs are all a
    TF Serving client can see: GetModelMetadata answers only "signature_def"
    (tensorflow_serving/servables/tensorflow/get_model_metadata_impl.cc), and assets.extra is
    never sent to a client.
    """
    image_spec = tf.TensorSpec((None, *encoder.input_shape[1:]), tf.float32, name="images")
    latent_spec = tf.TensorSpec((None, decoder.input_shape[-1]), tf.float32, name="latent")
    threshold_var = tf.Variable(threshold.value, trainable=False, dtype=tf.float32, name="anomaly_threshold")
    fpr_var = tf.Variable(threshold.fpr, trainable=False, dtype=tf.float32, name="anomaly_threshold_fpr")

    def encode(images):
        return {"latent": encoder(images, training=False)}

    def decode(latent):
        return {"reconstruction": decoder(latent, training=False)}

    def denoise(images):
        return {"reconstruction": decoder(encoder(images, training=False), training=False)}

    def score(images):
        reconstruction = denoise(images)["reconstruction"]
        error = models.reconstruction_error(images, reconstruction)
        error_map = tf.square(reconstruction - images)  # where the input is anomalous; its mean is error
        return {"error": error, "is_anomaly": error > threshold_var, "error_map": error_map,
                # per example, so REST row format ("predictions") can return them with the rest
                "threshold": tf.fill(tf.shape(error), threshold_var),
                "threshold_fpr": tf.fill(tf.shape(error), fpr_var)}

    archive = keras.export.ExportArchive()
    archive.track(encoder)
    archive.track(decoder)
    archive.track(threshold_var)
    archive.track(fpr_var)
    for name, fn, spec in [("encode", encode, image_spec), ("decode", decode, latent_spec),
                           ("denoise", denoise, image_spec), ("score", score, image_spec),
                           ("serving_default", denoise, image_spec)]:
        archive.add_endpoint(name, fn, input_signature=[spec])
    return archive


def write_warmup(version_dir: Path, images: np.ndarray, latents: np.ndarray) -> Path:
    """assets.extra/tf_serving_warmup_requests: PredictionLog records that TF Serving replays
    before marking the version AVAILABLE, so the first real request is not the slow one."""
    path = version_dir / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, alias, values in [("encode", "images", images), ("decode", "latent", latents),
                                         ("denoise", "images", images), ("score", "images", images),
                                         ("serving_default", "images", images)]:
            for i in range(WARMUP_RECORDS_PER_SIGNATURE):
                request = predict_pb2.PredictRequest(
                    model_spec=model_pb2.ModelSpec(signature_name=signature))
                request.inputs[alias].CopyFrom(tf.make_tensor_proto(values[i: i + 1]))
                log = prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=request))
                writer.write(log.SerializeToString())
    return path


def verify_export(version_dir: Path, encoder: keras.Model, decoder: keras.Model, threshold: Threshold,
                  images: np.ndarray) -> None:
    """Loads the SavedModel back and compares every signature with the Keras model on `images`."""
    loaded = tf.saved_model.load(str(version_dir))
    latent = encoder(images, training=False).numpy()
    reconstruction = decoder(latent, training=False).numpy()
    error = models.reconstruction_error(images, reconstruction).numpy()
    expected = {
        "encode": ({"images": images}, {"latent": latent}),
        "decode": ({"latent": latent}, {"reconstruction": reconstruction}),
        "denoise": ({"images": images}, {"reconstruction": reconstruction}),
        "serving_default": ({"images": images}, {"reconstruction": reconstruction}),
        "score": ({"images": images}, {"error": error, "is_anomaly": error > threshold.value,
                                       "error_map": np.square(reconstruction - images),
                                       "threshold": np.full_like(error, threshold.value),
                                       "threshold_fpr": np.full_like(error, threshold.fpr)}),
    }
    for name, (inputs, outputs) in expected.items():
        if name not in loaded.signatures:
            raise ExportError(f"signature {name!r} is missing from {version_dir}")
        got = loaded.signatures[name](**{k: tf.constant(v) for k, v in inputs.items()})
        if set(got) != set(outputs):
            raise ExportError(f"signature {name!r} has outputs {sorted(got)}, expected {sorted(outputs)}")
        for key, want in outputs.items():
            if not np.allclose(got[key].numpy(), want, atol=CHECK_TOLERANCE):
                diff = np.max(np.abs(got[key].numpy().astype(np.float64) - want))
                raise ExportError(f"signature {name!r} output {key!r} differs from the Keras model by {diff:g}")


def export_version(encoder: keras.Model, decoder: keras.Model, model_base_path: str | Path,
                   threshold: Threshold, sample_images: np.ndarray) -> Path:
    """Writes, checks and publishes the next version; returns its folder. Leaves nothing on failure."""
    base = Path(model_base_path)
    base.mkdir(parents=True, exist_ok=True)
    sample_images = np.asarray(sample_images, np.float32)
    while True:
        version = next_version(base)
        # Hidden and non-numeric, so TF Serving's version scan ignores it while it is written.
        staging = base / f".tmp-export-{version}-{os.getpid()}"
        try:
            build_archive(encoder, decoder, threshold).write_out(str(staging), verbose=False)
            write_warmup(staging, sample_images, encoder(sample_images, training=False).numpy())
            verify_export(staging, encoder, decoder, threshold, sample_images)
            final = base / str(version)
            try:
                os.rename(staging, final)  # atomic on one filesystem
            except OSError:
                if final.exists():  # another exporter took this number: take the next one
                    continue
                raise
            return final
        finally:
            shutil.rmtree(staging, ignore_errors=True)
