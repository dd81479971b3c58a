"""Anomaly detection as a job: train on the normal classes, measure how well `score` finds the rest.

    aekit train --normal-classes 3 --threshold-fpr 0.01 --workdir runs/three --model-base-path models/three
    aekit evaluate --anomaly --model-base-path models/three --normal-classes 3 --json
    aekit evaluate --anomaly --model-base-path models/three --anomalies odd-images/

`normal_source` keeps only the normal labels of a labelled source for training and for the
threshold's calibration (in memory, or for a streamed tfrecord:/tfds: source, whose epoch length
and shards are fixed by its files, as shards of their own written once under the workdir);
`evaluate_anomaly` scores the held-out split of the latest exported
version through its `score` signature's anomaly_score, the score its threshold is on (the
normal classes against the rest, or the whole test split against a separate anomaly source) and reports AUROC and average precision, which need no
threshold, and false-positive rate, recall, precision and F1 at the model's stored threshold.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
from sklearn import metrics

from storage import paths
from training import convert, data
from training.config import ConfigError
from training.evaluate import load_for_source
from training.sources import METADATA_FILE

SCORE_BATCH = 256


def parse_classes(text: str, flag: str = "--normal-classes") -> tuple[int, ...]:
    """"3" or "0,1,7" -> (0, 1, 7)."""
    try:
        classes = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integer labels, e.g. 3 or 0,1,7; "
                          f"got {text!r}") from None
    if not classes:
        raise ConfigError(f"{flag} names no class; give labels such as 3 or 0,1,7")
    return classes


def normal_source(source: data.Source, classes: Sequence[int], dataset: str, copy_dir: str,
                  shards: int = 8, check_stop: Callable[[], None] | None = None) -> data.Source:
    """The source with only the examples of `classes`, for training and threshold calibration.

    An in-memory source is filtered in memory. A streamed source cannot be filtered inside the
    pipeline: its files fix every epoch's length and each worker's share. So its normal classes
    are written once, as `shards` TFRecord shards in `copy_dir` (what `aekit data convert
    --classes` writes), and streamed from there. A later run reuses the copy if it holds the
    same classes of the same source files (name, size and modification time of each), and
    rewrites it otherwise, also when a killed run left it unfinished.
    """
    if source.train.in_memory and source.test.in_memory:
        arrays = data.Arrays(source.train.x, source.train.y, source.test.x, source.test.y)
        return normal_split(arrays, classes, dataset).source(source.name)
    fingerprint = _files_fingerprint(source)
    reason = _why_not_reusable(copy_dir, dataset, classes, fingerprint)
    if reason:
        if any(_same_folder(copy_dir, name.rsplit("/", 1)[0]) for name in source.train.files):
            raise ConfigError(f"--dataset {dataset} is the normal-classes copy of an earlier run; train on the "
                              "original source with --normal-classes, or on this copy without it")
        split_labels = {"train": convert.labels(source.train), "test": convert.labels(source.test)}
        check_classes({"training": split_labels["train"], "held-out": split_labels["test"]}, classes, dataset)
        print(f"writing the examples of class {','.join(map(str, classes))} of {dataset} to {copy_dir} "
              f"({reason}; a streamed source is filtered on disk, once)", flush=True)
        _remove_copy(copy_dir)
        convert.convert(dataset, copy_dir, shards, classes=classes, source=source,
                        flags=("--normal-classes", "--workdir"), extra={"source_files_sha256": fingerprint},
                        check_stop=check_stop, split_labels=split_labels)
    return data.load_source(f"tfrecord:{copy_dir}")


def _same_folder(a: str, b: str) -> bool:
    if paths.is_local(a) and paths.is_local(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


def _files_fingerprint(source: data.Source) -> str:
    """A digest of the source's files by name, size and modification time: a re-converted or
    replaced source reads as another one, without reading its contents."""
    digest = hashlib.sha256()
    for name in sorted(source.train.files + source.test.files):
        stat = tf.io.gfile.stat(name)
        digest.update(f"{name}\0{stat.length}\0{stat.mtime_nsec}\n".encode())
    return digest.hexdigest()


def _why_not_reusable(copy_dir: str, dataset: str, classes: Sequence[int], fingerprint: str) -> str:
    """'' when copy_dir holds a finished copy of `classes` of these source files; else what differs."""
    metadata_path = paths.join(copy_dir, METADATA_FILE)  # written last: absent in an unfinished copy
    if not paths.exists(metadata_path):
        return "no finished copy there yet"
    metadata = json.loads(paths.read_text(metadata_path))
    if metadata.get("classes") != sorted(int(c) for c in classes):
        return f"the copy there holds class {','.join(map(str, metadata.get('classes') or []))}"
    if metadata.get("source") != dataset or metadata.get("source_files_sha256") != fingerprint:
        return "the copy there was made from other source files"
    return ""


def _remove_copy(copy_dir: str) -> None:
    """metadata.json first: a removal cut short must not leave a folder that reads as a finished copy."""
    metadata_path = paths.join(copy_dir, METADATA_FILE)
    if paths.exists(metadata_path):
        tf.io.gfile.remove(metadata_path)
    if paths.exists(copy_dir):
        paths.remove_tree(copy_dir)


def normal_split(arrays: data.Arrays, classes: Sequence[int], dataset: str) -> data.Arrays:
    """The train and test examples whose label is one of `classes`: what a one-class model sees."""
    check_classes({"training": arrays.y_train, "held-out": arrays.y_test}, classes, dataset)
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


def score_examples(score, x: np.ndarray | data.Split) -> dict[str, np.ndarray]:
    """Runs a `score` signature over `x` (an array or a split, in memory or streamed) in batches."""
    parts = [{k: v.numpy() for k, v in score(images=clean).items()}
             for clean, _ in data.eval_dataset(x, SCORE_BATCH)]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def score_split(score, split: data.Split) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The score signature's per-example outputs (no error_map: it is the input's size) and the labels."""
    parts, labels = [], []
    for images, y in data.labelled_batches(split, SCORE_BATCH):
        parts.append({k: v.numpy() for k, v in score(images=images).items() if k != "error_map"})
        labels.append(y)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}, np.concatenate(labels)


def served_score_key(outputs: dict) -> str:
    """The output is_anomaly thresholds: anomaly_score, or error in exports made before it existed."""
    return "anomaly_score" if "anomaly_score" in outputs else "error"


def check_classes(labels: dict[str, np.ndarray], classes: Sequence[int], dataset: str) -> None:
    """The checks of `normal_split` on labels alone (the split's images need not be in memory)."""
    present = np.unique(np.concatenate(list(labels.values())))
    if len(present) < 2:
        raise ConfigError(f"--normal-classes needs a labelled source, but every example of {dataset} has "
                          f"label {present[0] if len(present) else 'none'} (.npy files and image folders "
                          "without sub-folders carry no labels); evaluate with --anomalies SRC instead")
    for split, y in labels.items():
        missing = [c for c in classes if not np.any(y == c)]
        if missing:
            raise ConfigError(f"--normal-classes {','.join(map(str, classes))}: {dataset} has no {split} "
                              f"examples of class {missing[0]} (its labels are {', '.join(map(str, present))})")
    if set(present) <= set(classes):
        raise ConfigError(f"--normal-classes names every label of {dataset}; leave at least one out as the anomalies")


def evaluate_anomaly(model_base_path: str, dataset: str, normal_classes: str = "", anomalies: str = "",
                     data_dir: str | None = None) -> dict:
    """Detection quality of the latest version: --normal-classes split `dataset`'s test split into
    normal and anomalous examples; --anomalies SRC takes all of SRC as anomalies instead.
    Every split is scored in batches, so streamed sources never sit in memory."""
    if bool(normal_classes) == bool(anomalies):
        raise ConfigError("aekit evaluate --anomaly needs one of --normal-classes CLASSES or --anomalies SRC")
    model = load_for_source(model_base_path, "score", dataset, data_dir)
    score, source, version = model.signature, model.source, model.version
    test, test_labels = score_split(score, source.test)
    key = served_score_key(test)
    if normal_classes:
        classes = parse_classes(normal_classes)
        check_classes({"held-out": test_labels}, classes, dataset)
        is_normal = np.isin(test_labels, classes)
        normal_errors, anomaly_errors = test[key][is_normal], test[key][~is_normal]
    else:
        other = data.load_source(anomalies, data_dir)
        if other.input_shape != source.input_shape:
            raise ConfigError(f"anomaly source {anomalies} has examples of shape {other.input_shape}, "
                              f"but {dataset} and the model have {source.input_shape}")
        normal_errors = test[key]
        anomaly_errors = np.concatenate([score_split(score, split)[0][key] for split in (other.train, other.test)])
    threshold = float(test["threshold"][0])
    # exports made before threshold_fpr existed used the 0.99 quantile of the held-out errors
    fpr = float(test["threshold_fpr"][0]) if "threshold_fpr" in test else 0.01
    kind = test["anomaly_score_kind"][0].decode() if "anomaly_score_kind" in test else "mse"
    return {"version": version, "normal_examples": len(normal_errors), "anomaly_examples": len(anomaly_errors),
            "threshold": threshold, "threshold_fpr": fpr, "anomaly_score": kind,
            **detection_metrics(normal_errors, anomaly_errors, threshold)}
