"""The anomaly score that `score` serves: reconstruction MSE, or MSE of a blurred residual plus a
latent Mahalanobis distance, both fitted on the training split's codes and errors at export.

    stats = fit_on_split(encoder, decoder, source.train, kind="combined")   # at export
    outputs = score_outputs(images, codes, reconstruction, stats_variables)  # in the signature

combined = log(latent_distance / its training median) + log(blurred_error / its training median),
where blurred_error is the mean of the largest 1/20 of the squared blurred residual's values: an
anomaly is local (a stroke missing or out of place), and a mean over every pixel dilutes it. Each
term divided by its median so neither dominates by its units, logs so that a code far from
the training codes and a residual with strokes out of place both count as factors, not sums.
The same TF functions compute the served outputs and, eagerly, the scores the threshold is
calibrated on, so the two cannot disagree.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from training import data, models
from training.config import ANOMALY_SCORES

BLUR_SIGMA = 1.0  # pixels: forgives strokes a pixel off; 0.5/0.7/1.0 swept in benchmarks/bench_one_class.py
BLUR_TRUNCATE = 4.0  # kernel radius in sigmas, as scipy.ndimage.gaussian_filter
SHRINKAGE = 1e-4  # ridge on the codes' covariance, as a fraction of its mean variance (128 dims, ~400 codes);
#                   1e-4..1e-1 swept in benchmarks/bench_one_class.py, larger is worse
PEAK_SHARE = 20  # blurred_error averages the largest 1/20 of the values (pixels x channels, rounded up:
#                  40 of 784); 10/39/78 of 784 swept in benchmarks/bench_one_class.py (all better than the mean over all 784)
TINY = 1e-12  # floor under both terms before the log: a perfect reconstruction is not -inf


@dataclasses.dataclass(frozen=True)
class ScoreStats:
    """What the served anomaly score needs from the training split, stored as SavedModel variables."""
    kind: str  # which score is anomaly_score (and so what the threshold is on): mse | combined
    code_mean: np.ndarray  # [D] mean of the training codes
    code_precision: np.ndarray  # [D, D] inverse of (covariance + ridge * I), ridge = SHRINKAGE * mean variance
    blur_kernel: np.ndarray  # [K, K] normalised Gaussian the residual is blurred with
    median_distance: float  # median latent_distance over the training codes
    median_blurred: float  # median blurred_error over the training examples


def gaussian_kernel(sigma: float = BLUR_SIGMA) -> np.ndarray:
    """A [K, K] float32 Gaussian summing to 1, radius int(BLUR_TRUNCATE * sigma + 0.5) like scipy's."""
    radius = int(BLUR_TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    line = np.exp(-0.5 * (offsets / sigma) ** 2)
    line /= line.sum()
    return np.outer(line, line).astype(np.float32)


def regularised_precision(codes: np.ndarray, shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """(mean, inverse of covariance + ridge * I) of the codes, ridge = shrinkage * mean variance:
    a few hundred codes of 128 dimensions give a singular covariance, and a ridge relative to the
    codes' own scale means the same thing whatever the encoder's output scale."""
    codes = np.asarray(codes, np.float64)
    if len(codes) < 2:
        raise ValueError(f"the latent statistics need at least 2 training codes, got {len(codes)}")
    covariance = np.cov(codes, rowvar=False).reshape(codes.shape[1], codes.shape[1])
    ridge = shrinkage * max(float(np.trace(covariance)) / codes.shape[1], TINY)
    return codes.mean(axis=0), np.linalg.inv(covariance + ridge * np.eye(codes.shape[1]))


def fit_score_stats(codes: np.ndarray, blurred: np.ndarray, kind: str, kernel: np.ndarray,
                    shrinkage: float = SHRINKAGE) -> ScoreStats:
    """The statistics of the training split's codes [N, D] and blurred errors [N]."""
    if kind not in ANOMALY_SCORES:
        raise ValueError(f"anomaly score must be one of {', '.join(ANOMALY_SCORES)}, got {kind!r}")
    mean, precision = regularised_precision(codes, shrinkage)
    distances = latent_distance(tf.constant(codes, tf.float32), tf.constant(mean, tf.float32),
                                tf.constant(precision, tf.float32)).numpy()
    return ScoreStats(kind, mean.astype(np.float32), precision.astype(np.float32), kernel,
                      float(np.median(distances)), float(np.median(blurred)))


def latent_distance(codes: tf.Tensor, mean: tf.Tensor, precision: tf.Tensor) -> tf.Tensor:
    """Squared Mahalanobis distance [N] of each code from the training codes."""
    centred = codes - mean
    return tf.reduce_sum(tf.matmul(centred, precision) * centred, axis=1)


def blurred_error(images: tf.Tensor, reconstruction: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Per-example [N]: the residual blurred by `kernel` per channel (zero padding), squared, and
    the mean of its largest ceil(H x W x C / PEAK_SHARE) values (integer arithmetic, so numpy agrees)."""
    residual = reconstruction - images
    channels = tf.shape(images)[-1]
    filters = tf.tile(kernel[:, :, tf.newaxis, tf.newaxis], [1, 1, channels, 1])
    blurred = tf.nn.depthwise_conv2d(residual, filters, strides=[1, 1, 1, 1], padding="SAME")
    squares = tf.reshape(tf.square(blurred), [tf.shape(images)[0], -1])
    peak = (tf.shape(squares)[1] + PEAK_SHARE - 1) // PEAK_SHARE
    return tf.reduce_mean(tf.math.top_k(squares, k=peak, sorted=False).values, axis=1)


def combined_score(distance: tf.Tensor, blurred: tf.Tensor, median_distance, median_blurred) -> tf.Tensor:
    return (tf.math.log(tf.maximum(distance, TINY) / median_distance)
            + tf.math.log(tf.maximum(blurred, TINY) / median_blurred))


def stats_tensors(stats: ScoreStats) -> dict[str, tf.Tensor]:
    """The statistics as float32 tensors, keyed as score_outputs reads them (export makes them variables)."""
    return {"code_mean": tf.constant(stats.code_mean), "code_precision": tf.constant(stats.code_precision),
            "blur_kernel": tf.constant(stats.blur_kernel),
            "median_distance": tf.constant(stats.median_distance, tf.float32),
            "median_blurred": tf.constant(stats.median_blurred, tf.float32)}


def score_outputs(images: tf.Tensor, codes: tf.Tensor, reconstruction: tf.Tensor, tensors: dict,
                  kind: str) -> dict[str, tf.Tensor]:
    """error (per-example MSE, the mean of error_map), error_map, latent_distance, blurred_error and
    anomaly_score (error for kind mse, the combined score for combined): what `score` serves."""
    error = models.reconstruction_error(images, reconstruction)
    distance = latent_distance(codes, tensors["code_mean"], tensors["code_precision"])
    blurred = blurred_error(images, reconstruction, tensors["blur_kernel"])
    anomaly = error if kind == "mse" else combined_score(distance, blurred, tensors["median_distance"],
                                                         tensors["median_blurred"])
    return {"error": error, "error_map": tf.square(reconstruction - images), "latent_distance": distance,
            "blurred_error": blurred, "anomaly_score": anomaly}


def codes_and_blurred(encoder, decoder, split: data.Split | np.ndarray, kernel: np.ndarray,
                      batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The codes [N, D] and blurred errors [N] of a split's clean images, in batches (streamed or not)."""
    codes, blurred, kernel = [], [], tf.constant(kernel)
    for _, clean in data.eval_dataset(split, batch_size):
        code = encoder(clean, training=False)
        codes.append(code.numpy())
        blurred.append(blurred_error(clean, decoder(code, training=False), kernel).numpy())
    return np.concatenate(codes), np.concatenate(blurred)


def fit_on_split(encoder, decoder, split: data.Split | np.ndarray, kind: str, sigma: float = BLUR_SIGMA,
                 shrinkage: float = SHRINKAGE) -> ScoreStats:
    """The score statistics of a (training) split."""
    kernel = gaussian_kernel(sigma)
    codes, blurred = codes_and_blurred(encoder, decoder, split, kernel)
    return fit_score_stats(codes, blurred, kind, kernel, shrinkage)


def anomaly_scores(encoder, decoder, split: data.Split | np.ndarray, stats: ScoreStats,
                   batch_size: int = 256) -> np.ndarray:
    """The served anomaly_score [N] of a split's clean images, computed eagerly by score_outputs:
    what the threshold is calibrated on."""
    tensors, scores = stats_tensors(stats), []
    for _, clean in data.eval_dataset(split, batch_size):
        code = encoder(clean, training=False)
        outputs = score_outputs(clean, code, decoder(code, training=False), tensors, stats.kind)
        scores.append(outputs["anomaly_score"].numpy())
    return np.concatenate(scores)
