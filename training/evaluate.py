"""Held-out quality: reconstruction MSE and PSNR, and the denoising gain when noise is added.

    aekit evaluate --model-base-path models/autoencoder --dataset mnist-sample --noise-factor 0.4 --json

The same `reconstruction_metrics` scores the Keras model after each epoch and an exported
SavedModel, so the numbers in history.json and from `aekit evaluate` mean the same thing.
PSNR is over the whole split: 10*log10(1 / MSE) with pixels in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

from training import data
from training.config import ConfigError

EVAL_BATCH = 256
EVAL_NOISE_SEED = 7  # fixed: every evaluation of a model adds the same noise


def psnr_db(mse: float) -> float:
    return float("inf") if mse <= 0 else 10.0 * math.log10(1.0 / mse)


def reconstruction_metrics(reconstruct: Callable[[tf.Tensor], tf.Tensor], x_test: np.ndarray,
                           noise_factor: float = 0.0) -> dict[str, float]:
    """mse/psnr_db of clean reconstructions; with noise also noisy_psnr_db, denoised_psnr_db, gain."""
    sums = {"clean": 0.0, "noisy": 0.0, "denoised": 0.0}
    count = 0
    clean_ds = data.make_dataset(x_test, EVAL_BATCH, training=False)
    noisy_ds = data.make_dataset(x_test, EVAL_BATCH, noise_factor=noise_factor, seed=EVAL_NOISE_SEED,
                                 training=False)
    for (clean, _), (noisy, _) in zip(clean_ds, noisy_ds):
        size = float(tf.size(clean))
        sums["clean"] += float(tf.reduce_mean(tf.square(reconstruct(clean) - clean))) * size
        if noise_factor > 0:
            sums["noisy"] += float(tf.reduce_mean(tf.square(noisy - clean))) * size
            sums["denoised"] += float(tf.reduce_mean(tf.square(reconstruct(noisy) - clean))) * size
        count += size
    mse = sums["clean"] / count
    metrics = {"mse": mse, "psnr_db": psnr_db(mse)}
    if noise_factor > 0:
        noisy, denoised = psnr_db(sums["noisy"] / count), psnr_db(sums["denoised"] / count)
        metrics.update(noise_factor=noise_factor, noisy_psnr_db=noisy, denoised_psnr_db=denoised,
                       denoise_gain_db=denoised - noisy)
    return metrics


def latest_version_dir(model_base_path: str | Path) -> Path:
    """The highest numeric version folder under `model_base_path`."""
    base = Path(model_base_path)
    if not base.is_dir():
        raise ConfigError(f"model base path {base} does not exist; run `aekit train` or `aekit export` first")
    versions = sorted((int(p.name), p) for p in base.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise ConfigError(f"No versions of servable found under base path {base}")
    return versions[-1][1]


def load_latest_version(model_base_path: str | Path, needed: str):
    """(version, loaded SavedModel) of the latest exported version, which must have signature `needed`.

    Callers keep the loaded object: its signatures read variables that die with it."""
    version_dir = latest_version_dir(model_base_path)
    try:
        loaded = tf.saved_model.load(str(version_dir))
    except Exception as e:
        raise ConfigError(f"cannot load SavedModel {version_dir}: {str(e).splitlines()[0]}") from None
    if needed not in loaded.signatures:
        raise ConfigError(f"{version_dir} has no {needed!r} signature (found {sorted(loaded.signatures)}); "
                          "is it an aekit export?")
    return int(version_dir.name), loaded


def evaluate_saved_model(model_base_path: str, dataset: str, noise_factor: float = 0.0,
                         data_dir: str | None = None) -> dict[str, float]:
    """Scores the latest exported version's `denoise` signature on the dataset's test split."""
    version, loaded = load_latest_version(model_base_path, "denoise")
    denoise = loaded.signatures["denoise"]
    arrays = data.load_arrays(dataset, data_dir)
    expected = tuple(denoise.structured_input_signature[1]["images"].shape[1:])
    if arrays.input_shape != expected:
        raise ConfigError(f"dataset {dataset} has examples of shape {arrays.input_shape} but the model "
                          f"expects {expected}")
    metrics = reconstruction_metrics(lambda x: denoise(images=x)["reconstruction"], arrays.x_test,
                                     noise_factor)
    return {"version": version, **metrics}
