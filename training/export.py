"""Export: a new numeric version of the SavedModel that TF Serving (or `aekit serve`) picks up.

    aekit export --workdir runs/ae --model-base-path models/autoencoder     # or gs://bucket/models/ae
    # -> models/autoencoder/<N+1>/ with signatures encode, decode, denoise, score, serving_default,
    #    compress and decompress (uint8 codes, one byte per latent dimension)
    aekit export --probe ...   # also classify (Predict) and classify_examples (TF Serving's Classify API)

The version is written under a hidden staging name beside the versions (TF Serving ignores
non-numeric children), checked by loading it back, then published so that a server polling the
folder never loads a half-written version:
  - local disk: the staging folder is renamed into place, atomically;
  - object stores (gs://, ...; no atomic rename): TF Serving takes any numeric child as a version
    as soon as one object under it exists (file_system_storage_path_source.cc,
    PollFileSystemForServable), and its SavedModel loader first looks for saved_model.pb
    (tensorflow/cc/saved_model/loader.cc, LoadSavedModel via MaybeSavedModelDirectory and
    ReadSavedModel). So the files are copied with saved_model.pb LAST: before it lands, a poll
    sees a version that fails to load (retried: --max_num_load_retries), never a partial model.
Re-exporting the same training step with the same weights returns the existing version (pass
force to publish a copy anyway). Staging folders left by a killed export are removed by the next
export once their process is gone (same host) or they are older than STALE_STAGING_SECONDS.
Signatures are written with keras.export.ExportArchive because tf.saved_model.save on a Keras 3
model renames inputs and outputs (to `inputs`/`output_0`), which breaks every client. The compress
and classify signatures, their checks and warmups are in training/endpoints.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
import socket
import time

import keras
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from storage import paths
from training import quantize, scoring
from training.config import ConfigError
from training.endpoints import (
    COMPRESSION_FILE,
    WARMUP_RECORDS_PER_SIGNATURE,
    add_classify_endpoints,
    add_compression_endpoints,
    classify_warmup,
    compression_metadata,
    compression_warmup,
    expected_classify,
    expected_compression,
)
from training.probe import LinearProbe
from training.scoring import ScoreStats

WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
IDENTITY_FILE = "assets.extra/aekit_export.json"  # training step and weights hash; servers ignore it
CHECK_TOLERANCE = 1e-4  # float32 reorderings between Keras and the traced graph stay far below this
STAGING_PREFIX = ".tmp-export-"
STALE_STAGING_SECONDS = 3600  # a staging folder untouched this long belongs to no live export (one takes seconds)


class ExportError(RuntimeError):
    """The written SavedModel does not behave like the Keras model; nothing was published."""

    exit_code = 1


def next_version(base: str) -> int:
    return max(paths.version_folders(base), default=0) + 1


@dataclasses.dataclass(frozen=True)
class Threshold:
    """The anomaly threshold and how it was chosen; the score signature returns both."""
    value: float  # an input whose served anomaly_score exceeds this is an anomaly
    fpr: float  # the fraction of held-out normal examples it flags (the target false-positive rate)
    examples: int  # how many held-out normal examples it was calibrated on
    score: str = "mse"  # which anomaly_score it is on: mse | combined (config.ANOMALY_SCORES)

    def describe(self) -> str:
        return (f"anomaly threshold {self.value:.6g} on the {self.score} score: flags {self.fpr:.2%} of "
                f"{self.examples} held-out normal examples")


def calibrate_threshold(errors: np.ndarray, fpr: float, score: str = "mse") -> Threshold:
    """The threshold that flags exactly floor(fpr * n) of the n held-out normal scores (fewer on ties).

    `errors` are the served anomaly_score of the held-out normal examples (`score` names which).
    An input is flagged when its score is strictly above the threshold, so the threshold lies
    between the order statistic just below the top floor(fpr * n) and the lowest of them: the
    largest false-positive rate on the calibration data that does not exceed `fpr`. np.quantile(errors, 1 - fpr) would interpolate
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
    kept = errors[len(errors) - flagged - 1]  # the highest score that must not be flagged
    # Halfway to the lowest flagged score (or a hair above the top one), never ON a calibration
    # score: the served graph recomputes scores with float32 rounding that differs from the eager
    # calibration in the last bits, and a threshold equal to one example's score flipped it.
    above = errors[len(errors) - flagged] if flagged else kept + 1e-6 * max(abs(kept), 1e-6)
    return Threshold(float((kept + above) / 2), fpr, len(errors), score)


def build_archive(encoder: keras.Model, decoder: keras.Model, threshold: Threshold,
                  probe: LinearProbe | None = None, ranges: quantize.Ranges | None = None, *,
                  stats: ScoreStats) -> keras.export.ExportArchive:
    """The serving signatures, with named inputs and outputs and a free batch dimension.

    score returns error (per-example MSE, the mean of error_map), error_map, latent_distance,
    blurred_error and anomaly_score (training.scoring.score_outputs, from `stats` stored as
    variables), is_anomaly (anomaly_score > threshold), and the threshold, its false-positive
    rate and anomaly_score_kind (mse | combined) as outputs because outputs are all a TF Serving
    client can see: GetModelMetadata answers only "signature_def"
    (tensorflow_serving/servables/tensorflow/get_model_metadata_impl.cc), and assets.extra is
    never sent to a client.
    """
    image_spec = tf.TensorSpec((None, *encoder.input_shape[1:]), tf.float32, name="images")
    latent_spec = tf.TensorSpec((None, decoder.input_shape[-1]), tf.float32, name="latent")
    threshold_var = tf.Variable(threshold.value, trainable=False, dtype=tf.float32, name="anomaly_threshold")
    fpr_var = tf.Variable(threshold.fpr, trainable=False, dtype=tf.float32, name="anomaly_threshold_fpr")
    stats_vars = {name: tf.Variable(value, trainable=False, name=name)
                  for name, value in scoring.stats_tensors(stats).items()}

    def encode(images):
        return {"latent": encoder(images, training=False)}

    def decode(latent):
        return {"reconstruction": decoder(latent, training=False)}

    def denoise(images):
        return {"reconstruction": decoder(encoder(images, training=False), training=False)}

    def score(images):
        codes = encoder(images, training=False)
        outputs = scoring.score_outputs(images, codes, decoder(codes, training=False), stats_vars, stats.kind)
        rows = tf.shape(outputs["error"])
        return {**outputs, "is_anomaly": outputs["anomaly_score"] > threshold_var,
                # per example, so REST row format ("predictions") can return them with the rest
                "threshold": tf.fill(rows, threshold_var), "threshold_fpr": tf.fill(rows, fpr_var),
                "anomaly_score_kind": tf.fill(rows, tf.constant(stats.kind))}

    archive = keras.export.ExportArchive()
    archive.track(encoder)
    archive.track(decoder)
    archive.track(threshold_var)
    archive.track(fpr_var)
    for variable in stats_vars.values():
        archive.track(variable)
    for name, fn, spec in [("encode", encode, image_spec), ("decode", decode, latent_spec),
                           ("denoise", denoise, image_spec), ("score", score, image_spec),
                           ("serving_default", denoise, image_spec)]:
        archive.add_endpoint(name, fn, input_signature=[spec])
    if probe is not None:
        add_classify_endpoints(archive, encoder, probe, image_spec)
    if ranges is not None:
        add_compression_endpoints(archive, encoder, decoder, ranges, image_spec)
    return archive


def write_warmup(version_dir: str, images: np.ndarray, latents: np.ndarray, classify: bool = False,
                 codes: np.ndarray | None = None) -> str:
    """assets.extra/tf_serving_warmup_requests: PredictionLog records that TF Serving replays
    before marking the version AVAILABLE, so the first real request is not the slow one."""
    path = paths.join(version_dir, WARMUP_FILE)
    paths.makedirs(posixpath.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
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
        if classify:
            for log in classify_warmup(images):
                writer.write(log.SerializeToString())
        if codes is not None:
            for log in compression_warmup(images, codes):
                writer.write(log.SerializeToString())
    return path



def verify_export(version_dir: str, encoder: keras.Model, decoder: keras.Model, threshold: Threshold,
                  images: np.ndarray, probe: LinearProbe | None = None,
                  ranges: quantize.Ranges | None = None, *, stats: ScoreStats) -> None:
    """Loads the SavedModel back and compares every signature with the Keras model on `images`
    (score: with training.scoring run eagerly on the Keras model's codes and reconstructions)."""
    loaded = tf.saved_model.load(str(version_dir))
    latent = encoder(images, training=False).numpy()
    reconstruction = decoder(latent, training=False).numpy()
    scores = {k: v.numpy() for k, v in scoring.score_outputs(
        tf.constant(images), tf.constant(latent), tf.constant(reconstruction), scoring.stats_tensors(stats),
        stats.kind).items()}
    error = scores["error"]
    expected = {
        "encode": ({"images": images}, {"latent": latent}),
        "decode": ({"latent": latent}, {"reconstruction": reconstruction}),
        "denoise": ({"images": images}, {"reconstruction": reconstruction}),
        "serving_default": ({"images": images}, {"reconstruction": reconstruction}),
        "score": ({"images": images}, {**scores, "is_anomaly": scores["anomaly_score"] > threshold.value,
                                       "threshold": np.full_like(error, threshold.value),
                                       "threshold_fpr": np.full_like(error, threshold.fpr),
                                       "anomaly_score_kind": np.full(len(error), stats.kind.encode(), object)}),
    }
    if probe is not None:
        expected.update(expected_classify(probe, latent, images))
    if ranges is not None:
        expected.update(expected_compression(encoder, decoder, ranges, images))
    for name, (inputs, outputs) in expected.items():
        if name not in loaded.signatures:
            raise ExportError(f"signature {name!r} is missing from {version_dir}")
        got = loaded.signatures[name](**{k: tf.constant(v) for k, v in inputs.items()})
        if set(got) != set(outputs):
            raise ExportError(f"signature {name!r} has outputs {sorted(got)}, expected {sorted(outputs)}")
        for key, want in outputs.items():
            if want.dtype == np.uint8:  # codes: a latent on a level's edge may round either way
                if got[key].dtype != tf.uint8 or np.max(np.abs(got[key].numpy().astype(int) - want)) > 1:
                    raise ExportError(f"signature {name!r} output {key!r} differs from numpy quantization")
            elif want.dtype == object or want.dtype.kind in "iu":  # labels: exactly equal
                if not np.array_equal(got[key].numpy().astype(want.dtype), want):
                    raise ExportError(f"signature {name!r} output {key!r} differs from the sklearn probe")
            elif not np.allclose(got[key].numpy(), want, atol=CHECK_TOLERANCE):
                diff = np.max(np.abs(got[key].numpy().astype(np.float64) - want))
                raise ExportError(f"signature {name!r} output {key!r} differs from the Keras model by {diff:g}")


def export_version(encoder: keras.Model, decoder: keras.Model, model_base_path: str,
                   threshold: Threshold, sample_images: np.ndarray, identity: dict | None = None,
                   force: bool = False, probe: LinearProbe | None = None,
                   ranges: quantize.Ranges | None = None, *, stats: ScoreStats) -> tuple[str, bool]:
    """Writes, checks and publishes the next version; returns (its folder, whether it is new).

    `ranges` are the quantization ranges of compress/decompress, calibrated on the training split's
    codes (export_trained); without them they are calibrated on `sample_images`.
    `identity` (training step, weights hash) is stored with the version; a version with the same
    identity is returned instead of publishing a duplicate, unless `force`. Leaves nothing on failure.
    """
    base = paths.makedirs(paths.check(model_base_path, "--model-base-path"))
    if identity and not force:
        existing = find_identical(base, identity)
        if existing:
            return existing, False
    remove_stale_staging(base)
    sample_images = np.asarray(sample_images, np.float32)
    sample_latents = encoder(sample_images, training=False).numpy()
    ranges = ranges or quantize.ranges_of([sample_latents])
    while True:
        version = next_version(base)
        # Hidden and non-numeric, so TF Serving's version scan ignores it while it is written.
        staging = paths.join(base, f"{STAGING_PREFIX}{version}-{socket.gethostname()}-{os.getpid()}")
        try:
            build_archive(encoder, decoder, threshold, probe, ranges, stats=stats).write_out(staging, verbose=False)
            write_warmup(staging, sample_images, sample_latents, probe is not None,
                         quantize.quantize_np(sample_latents, ranges))
            if identity:
                paths.write_text(paths.join(staging, IDENTITY_FILE), json.dumps(identity))
            paths.write_text(paths.join(staging, COMPRESSION_FILE), json.dumps(compression_metadata(decoder, ranges)))
            verify_export(staging, encoder, decoder, threshold, sample_images, probe, ranges, stats=stats)
            final = paths.join(base, str(version))
            try:
                paths.publish_tree(staging, final, last="saved_model.pb")
            except tf.errors.OpError:
                # Only a local rename fails because another exporter took this number. On object
                # stores the copy itself failed and `final` holds our partial copy: retrying would
                # publish a new partial version each round, forever.
                if paths.is_local(final) and paths.exists(final):
                    continue
                raise
            return final, True
        finally:
            paths.remove_tree(staging)


def find_identical(base: str, identity: dict) -> str | None:
    """The newest version exported from the same training step with the same weights."""
    for _, name in sorted(paths.version_folders(base).items(), reverse=True):
        marker = paths.join(base, name, IDENTITY_FILE)
        try:
            if json.loads(paths.read_text(marker)) == identity:
                return paths.join(base, name)
        except (tf.errors.NotFoundError, ValueError):
            continue  # not an aekit export, or one from before identities were recorded
    return None


def remove_stale_staging(base: str) -> list[str]:
    """Deletes staging folders of exports that died (killed mid-export); returns their names."""
    removed = []
    for name in paths.listdir(base):
        folder = paths.join(base, name)
        if name.startswith(STAGING_PREFIX) and _is_stale(folder, name):
            paths.remove_tree(folder)
            removed.append(name)
    return removed


def _is_stale(folder: str, name: str) -> bool:
    """Stale when its exporter (host, pid from the name) is gone from this host, or when nothing
    in it changed for STALE_STAGING_SECONDS (an exporter on another host, or a reused pid)."""
    _, _, owner = name[len(STAGING_PREFIX):].partition("-")
    host, _, pid = owner.rpartition("-")
    if pid.isdigit() and host in (socket.gethostname(), "") and paths.is_local(folder):
        if not _process_alive(int(pid)):
            return True
    newest = max((tf.io.gfile.stat(paths.join(d, n)).mtime_nsec for d, _, names in tf.io.gfile.walk(folder)
                  for n in names), default=0)
    return newest > 0 and time.time() - newest / 1e9 > STALE_STAGING_SECONDS


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
