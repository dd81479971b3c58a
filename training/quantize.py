"""One byte per latent dimension: the quantizer behind the `compress` and `decompress` signatures.

Each latent dimension d gets a range [low_d, high_d], the min and max of that dimension over the
training split's codes (calibrated at export). A code value is mapped to the nearest of LEVELS
evenly spaced levels spanning the range (values outside it clip to the ends), stored as uint8:

    q = clip(round((z - low) / (high - low) * 255), 0, 255)        z' = low + q / 255 * (high - low)

The same formulas exist in TensorFlow (traced into the SavedModel) and numpy (what verify_export
and the tests compare against). Rounding is half-to-even in both (tf.round, np.round).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable

import keras
import numpy as np
import tensorflow as tf

LEVELS = 256  # one byte per dimension
MIN_SPAN = 1e-6  # a dimension constant on the training split still gets a range (and no division by 0)


@dataclasses.dataclass(frozen=True)
class Ranges:
    """Per-dimension quantization ranges, float32 [D] each."""
    low: np.ndarray
    high: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.low.shape[0])


def ranges_of(codes: Iterable[np.ndarray]) -> Ranges:
    """The per-dimension min and max over batches of codes [N, D], streamed (one batch in memory)."""
    low = high = None
    for batch in codes:
        batch = np.asarray(batch, np.float32)
        low = batch.min(0) if low is None else np.minimum(low, batch.min(0))
        high = batch.max(0) if high is None else np.maximum(high, batch.max(0))
    if low is None:
        raise ValueError("cannot calibrate quantization ranges on no codes")
    return Ranges(low.astype(np.float32), np.maximum(high, low + MIN_SPAN).astype(np.float32))


def quantize(latent: tf.Tensor, low: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
    """float codes [N, D] -> uint8 [N, D] (TensorFlow; goes in the graph)."""
    scaled = (latent - low) / (high - low) * (LEVELS - 1)
    return tf.cast(tf.clip_by_value(tf.round(scaled), 0.0, LEVELS - 1), tf.uint8)


def dequantize(codes: tf.Tensor, low: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
    """uint8 [N, D] -> float32 [N, D] at the levels' values (TensorFlow)."""
    return low + tf.cast(codes, tf.float32) / (LEVELS - 1) * (high - low)


def quantize_np(latent: np.ndarray, ranges: Ranges) -> np.ndarray:
    """numpy twin of `quantize`, in float32 like the graph."""
    latent = np.asarray(latent, np.float32)
    scaled = (latent - ranges.low) / (ranges.high - ranges.low) * np.float32(LEVELS - 1)
    return np.clip(np.round(scaled), 0, LEVELS - 1).astype(np.uint8)


def dequantize_np(codes: np.ndarray, ranges: Ranges) -> np.ndarray:
    """numpy twin of `dequantize`."""
    span = ranges.high - ranges.low
    return (ranges.low + np.asarray(codes).astype(np.float32) / np.float32(LEVELS - 1) * span).astype(np.float32)


def fingerprint(decoder: keras.Model, ranges: Ranges) -> str:
    """sha256 of the decoder's weights and the ranges: what a code file must match to be decoded."""
    digest = hashlib.sha256()
    for weight in decoder.weights:
        digest.update(np.ascontiguousarray(np.asarray(weight.numpy(), np.float32)).tobytes())
    digest.update(ranges.low.astype("<f4").tobytes())
    digest.update(ranges.high.astype("<f4").tobytes())
    return digest.hexdigest()
