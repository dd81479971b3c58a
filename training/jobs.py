"""The training-side jobs behind `aekit train`, `aekit export` and `aekit evaluate`.

Each reads top to bottom: build what it needs from a config, run it, say where the result is.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import tensorflow as tf

from training import anomaly, data, distribute, export, models, train
from training.config import ConfigError, TrainConfig
from training.evaluate import evaluate_saved_model

SAMPLE_IMAGES = 8  # held-out examples used to check the export and to write warmup records


def train_job(cfg: TrainConfig) -> dict:
    """Trains (resuming from cfg.workdir) and, on the chief, exports a new version."""
    strategy = distribute.make_strategy(cfg.num_logical_devices, cfg.collective, cfg.collective_timeout_seconds)
    arrays = load_training_arrays(cfg)
    state, history = train.train_and_evaluate(cfg, arrays, strategy)
    result = {"workdir": cfg.workdir, "step": int(state.step.numpy()), "task": distribute.task_name(strategy),
              "weights_sha256": weights_fingerprint(state), **(history[-1] if history else {})}
    if cfg.export and state.is_chief:
        result["export"] = str(export_trained(state, cfg, arrays))
        print(f"exported {result['export']}", flush=True)
    return result


def load_training_arrays(cfg: TrainConfig) -> data.Arrays:
    """The data source, with only the normal classes when cfg.normal_classes names some."""
    arrays = data.load_arrays(cfg.dataset, cfg.data_dir, cfg.download)
    if not cfg.normal_classes:
        return arrays
    return anomaly.normal_split(arrays, anomaly.parse_classes(cfg.normal_classes), cfg.dataset)


def weights_fingerprint(state: train.TrainState) -> str:
    """A hash of every weight: equal on all workers when synchronous training kept them in step."""
    digest = hashlib.sha256()
    for variable in state.autoencoder.weights:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


def export_trained(state: train.TrainState, cfg: TrainConfig, arrays: data.Arrays) -> Path:
    """Calibrates the anomaly threshold on held-out (normal) data and publishes the next version."""
    errors = held_out_errors(state, arrays.x_test)
    threshold = export.calibrate_threshold(errors, cfg.calibration_fpr)
    print(threshold.describe(), flush=True)
    sample = data.scale_to_unit(tf.constant(arrays.x_test[:SAMPLE_IMAGES])).numpy()
    return export.export_version(state.encoder, state.decoder, cfg.model_base_path, threshold, sample)


def held_out_errors(state: train.TrainState, x_test: np.ndarray) -> np.ndarray:
    """Per-example reconstruction MSE on the test split."""
    errors = [models.reconstruction_error(clean, state.autoencoder(clean, training=False)).numpy()
              for clean, _ in data.make_dataset(x_test, 256, training=False)]
    return np.concatenate(errors)


def export_job(workdir: str, model_base_path: str | None = None, threshold_fpr: float | None = None) -> Path:
    """Exports the latest checkpoint in `workdir` with the config it was trained with.

    `threshold_fpr` recalibrates the anomaly threshold to that false-positive rate on held-out
    normal data: a new version from the same weights, without retraining.
    """
    config_path = Path(workdir) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{workdir} has no config.json; is it a workdir written by `aekit train`?")
    overrides = {"workdir": workdir, "num_logical_devices": 0}
    if model_base_path:
        overrides["model_base_path"] = model_base_path
    if threshold_fpr is not None:
        overrides["threshold_fpr"] = threshold_fpr
    cfg = TrainConfig.from_file(config_path, **overrides)
    if tf.train.latest_checkpoint(str(Path(workdir) / "checkpoints")) is None:
        raise ConfigError(f"{workdir}/checkpoints has no checkpoint to export; train first")
    arrays = load_training_arrays(cfg)
    state = train.build_state(cfg, arrays.input_shape, tf.distribute.get_strategy())
    return export_trained(state, cfg, arrays)


def evaluate_job(model_base_path: str, dataset: str, noise_factor: float = 0.0,
                 data_dir: str | None = None) -> dict:
    return evaluate_saved_model(model_base_path, dataset, noise_factor, data_dir)
