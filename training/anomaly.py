"""Anomaly detection as a job: train on the normal classes, measure how well `score` finds the rest.

    aekit train --normal-classes 3 --threshold-fpr 0.01 --workdir runs/three --model-base-path models/three
    aekit evaluate --anomaly --model-base-path models/three --normal-classes 3 --json
    aekit evaluate --anomaly --model-base-path models/three --anomalies odd-images/

`normal_split` keeps only the normal labels of a labelled source (for training and for the
threshold's calibration); `evaluate_anomaly` scores the held-out split of the latest exported
version through its `score` signature (the normal classes against the rest, or the whole test
split against a separate anomaly source) and reports AUROC and average precision, which need no
threshold, and false-positive rate, recall, precision and F1 at the model's stored threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics

from training import data
from training.config import ConfigError
from training.evaluate import load_latest_version

SCORE_BATCH = 256


def parse_classes(text: str) -> tuple[int, ...]:
    """"3" or "0,1,7" -> (0, 1, 7)."""
    try:
        classes = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ConfigError(f"--normal-classes must be comma-separated integer labels, e.g. 3 or 0,1,7; "
                          f"got {text!r}") from None
    if not classes:
        raise ConfigError("--normal-classes names no class; give labels such as 3 or 0,1,7")
    return classes


def normal_split(arrays: data.Arrays, classes: Sequence[int], dataset: str) -> data.Arrays:
    """The train and test examples whose label is one of `classes`: what a one-class model sees."""
    present = np.unique(np.concatenate([arrays.y_train, arrays.y_test]))
    if len(present) < 2:
        raise ConfigError(f"--normal-classes needs a labelled source, but every example of {dataset} has "
                          f"label {present[0] if len(present) else 'none'} (.npy files and image folders "
                          "without sub-folders carry no labels); evaluate with --anomalies SRC instead")
    for split, labels in (("training", arrays.y_train), ("held-out", arrays.y_test)):
        missing = [c for c in classes if not np.any(labels == c)]
        if missing:
            raise ConfigError(f"--normal-classes {','.join(map(str, classes))}: {dataset} has no {split} "
                              f"examples of class {missing[0]} (its labels are {', '.join(map(str, present))})")
    if set(present) <= set(classes):
        raise ConfigError(f"--normal-classes names every label of {dataset}; leave at least one out as the anomalies")
    keep_train, keep_test = np.isin(arrays.y_train, classes), np.isin(arrays.y_test, classes)
    return data.Arrays(arrays.x_train[keep_train], arrays.y_train[keep_train],
                       arrays.x_test[keep_test], arrays.y_test[keep_test])


def detection_metrics(normal_scores: np.ndarray, anomaly_scores: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC and average precision over all thresholds; FPR, recall, precision, F1 at `threshold`.

    Anomalies are the positive class; an input is flagged when its score is above the threshold,
    as the score signature's is_anomaly does.
    """
    if len(normal_scores) == 0 or len(anomaly_scores) == 0:
        raise ConfigError(f"anomaly metrics need normal and anomalous examples; got {len(normal_scores)} "
                          f"normal and {len(anomaly_scores)} anomalous")
    scores = np.concatenate([normal_scores, anomaly_scores]).astype(np.float64)
    truth = np.concatenate([np.zeros(len(normal_scores), bool), np.ones(len(anomaly_scores), bool)])
    flagged = scores > threshold
    return {
        "auroc": float(metrics.roc_auc_score(truth, scores)),
        "average_precision": float(metrics.average_precision_score(truth, scores)),
        "fpr": float(np.mean(flagged[~truth])),
        "recall": float(metrics.recall_score(truth, flagged, zero_division=0.0)),
        "precision": float(metrics.precision_score(truth, flagged, zero_division=0.0)),
        "f1": float(metrics.f1_score(truth, flagged, zero_division=0.0)),
    }


def score_examples(score, x: np.ndarray) -> dict[str, np.ndarray]:
    """Runs a `score` signature over `x` (any dtype the data module reads) in batches."""
    parts = [{k: v.numpy() for k, v in score(images=clean).items()}
             for clean, _ in data.make_dataset(x, SCORE_BATCH, training=False)]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def evaluate_anomaly(model_base_path: str, dataset: str, normal_classes: str = "", anomalies: str = "",
                     data_dir: str | None = None) -> dict:
    """Detection quality of the latest version: --normal-classes split `dataset`'s test split into
    normal and anomalous examples; --anomalies SRC takes all of SRC as anomalies instead."""
    if bool(normal_classes) == bool(anomalies):
        raise ConfigError("aekit evaluate --anomaly needs one of --normal-classes CLASSES or --anomalies SRC")
    version, loaded = load_latest_version(model_base_path, "score")
    score = loaded.signatures["score"]
    arrays = data.load_arrays(dataset, data_dir)
    if normal_classes:
        classes = parse_classes(normal_classes)
        normal_split(arrays, classes, dataset)  # the same checks as training
        is_normal = np.isin(arrays.y_test, classes)
        normal_x, anomaly_x = arrays.x_test[is_normal], arrays.x_test[~is_normal]
    else:
        other = data.load_arrays(anomalies, data_dir)
        if other.input_shape != arrays.input_shape:
            raise ConfigError(f"anomaly source {anomalies} has examples of shape {other.input_shape}, "
                              f"but {dataset} and the model have {arrays.input_shape}")
        normal_x, anomaly_x = arrays.x_test, np.concatenate([other.x_train, other.x_test])
    _check_shape(score, arrays.input_shape, dataset)
    normal, anomalous = score_examples(score, normal_x), score_examples(score, anomaly_x)
    threshold = float(normal["threshold"][0])
    # exports made before threshold_fpr existed used the 0.99 quantile of the held-out errors
    fpr = float(normal["threshold_fpr"][0]) if "threshold_fpr" in normal else 0.01
    return {"version": version, "normal_examples": len(normal_x), "anomaly_examples": len(anomaly_x),
            "threshold": threshold, "threshold_fpr": fpr,
            **detection_metrics(normal["error"], anomalous["error"], threshold)}


def _check_shape(score, input_shape: tuple[int, ...], dataset: str) -> None:
    expected = tuple(score.structured_input_signature[1]["images"].shape[1:])
    if input_shape != expected:
        raise ConfigError(f"dataset {dataset} has examples of shape {input_shape} but the model expects {expected}")
