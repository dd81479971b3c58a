"""Held-out quality: reconstruction MSE and PSNR, and the denoising gain when noise is added.

    aekit evaluate --model-base-path models/autoencoder --dataset mnist-sample --noise-factor 0.4 --json

The same `reconstruction_metrics` scores the Keras model after each epoch and an exported
SavedModel, so the numbers in history.json and from `aekit evaluate` mean the same thing.
PSNR is over the whole split: 10*log10(1 / MSE) with pixels in [0, 1].
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from storage import paths
from training import data
from training.config import ConfigError

EVAL_BATCH = 256
EVAL_NOISE_SEED = 7  # fixed: every evaluation of a model adds the same noise


def psnr_db(mse: float) -> float:
    return float("inf") if mse <= 0 else 10.0 * math.log10(1.0 / mse)


def reconstruction_sums(reconstruct: Callable[[tf.Tensor], tf.Tensor], split: data.Split | np.ndarray,
                        noise_factor: float = 0.0, part: tuple[int, int] = (0, 1)) -> np.ndarray:
    """[clean, noisy, denoised squared-error sums, pixel count] over part `part` of the split,
    streamed in batches; sums of parts add up to the whole split's."""
    sums = np.zeros(4)
    for noisy, clean in data.eval_dataset(split, EVAL_BATCH, noise_factor=noise_factor, seed=EVAL_NOISE_SEED,
                                          part=part):
        sums[0] += float(tf.reduce_sum(tf.square(reconstruct(clean) - clean)))
        if noise_factor > 0:
            sums[1] += float(tf.reduce_sum(tf.square(noisy - clean)))
            sums[2] += float(tf.reduce_sum(tf.square(reconstruct(noisy) - clean)))
        sums[3] += float(tf.size(clean))
    return sums


def metrics_from_sums(sums, noise_factor: float = 0.0) -> dict[str, float]:
    """mse/psnr_db of clean reconstructions; with noise also noisy_psnr_db, denoised_psnr_db, gain."""
    clean, noisy, denoised, count = (float(v) for v in np.asarray(sums))
    mse = clean / count
    metrics = {"mse": mse, "psnr_db": psnr_db(mse)}
    if noise_factor > 0:
        noisy, denoised = psnr_db(noisy / count), psnr_db(denoised / count)
        metrics.update(noise_factor=noise_factor, noisy_psnr_db=noisy, denoised_psnr_db=denoised,
                       denoise_gain_db=denoised - noisy)
    return metrics


def reconstruction_metrics(reconstruct: Callable[[tf.Tensor], tf.Tensor], split: data.Split | np.ndarray,
                           noise_factor: float = 0.0) -> dict[str, float]:
    """The metrics of `metrics_from_sums` on the whole split, in one process."""
    return metrics_from_sums(reconstruction_sums(reconstruct, split, noise_factor), noise_factor)


def latest_version_dir(model_base_path: str) -> str:
    """The highest numeric version folder under `model_base_path`."""
    base = paths.check(model_base_path, "--model-base-path")
    if not paths.isdir(base):
        raise ConfigError(f"model base path {base} does not exist; run `aekit train` or `aekit export` first")
    versions = paths.version_folders(base)
    if not versions:
        raise ConfigError(f"No versions of servable found under base path {base}")
    return paths.join(base, versions[max(versions)])


def load_latest_version(model_base_path: str, needed: str):
    """(version, loaded SavedModel) of the latest exported version, which must have signature `needed`.

    Callers keep the loaded object: its signatures read variables that die with it."""
    version_dir = latest_version_dir(model_base_path)
    try:
        loaded = tf.saved_model.load(version_dir)
    except Exception as e:
        raise ConfigError(f"cannot load SavedModel {version_dir}: {str(e).splitlines()[0]}") from None
    if needed not in loaded.signatures:
        raise ConfigError(f"{version_dir} has no {needed!r} signature (found {sorted(loaded.signatures)}); "
                          "is it an aekit export?")
    return int(posixpath.basename(version_dir)), loaded


@dataclasses.dataclass
class LoadedForSource:
    """The latest version, one of its signatures, and the source whose shape it was checked against.
    `loaded` is kept because the signature reads variables that die with it."""
    version: int
    loaded: object
    signature: Callable
    source: data.Source


def load_for_source(model_base_path: str, needed: str, dataset: str, data_dir: str | None = None) -> LoadedForSource:
    """The latest version's signature `needed` and `dataset`, refused in one line if the
    dataset's examples are not the shape the signature takes as `images`."""
    version, loaded = load_latest_version(model_base_path, needed)
    signature = loaded.signatures[needed]
    source = data.load_source(dataset, data_dir)
    expected = tuple(signature.structured_input_signature[1]["images"].shape[1:])
    if source.input_shape != expected:
        raise ConfigError(f"dataset {dataset} has examples of shape {source.input_shape} but the model "
                          f"expects {expected}")
    return LoadedForSource(version, loaded, signature, source)


def evaluate_saved_model(model_base_path: str, dataset: str, noise_factor: float = 0.0,
                         data_dir: str | None = None) -> dict[str, float]:
    """Scores the latest exported version's `denoise` signature on the dataset's test split."""
    model = load_for_source(model_base_path, "denoise", dataset, data_dir)
    metrics = reconstruction_metrics(lambda x: model.signature(images=x)["reconstruction"], model.source.test,
                                     noise_factor)
    return {"version": model.version, **metrics}
