"""Recognition: how much of the class a linear classifier and k-nearest neighbours read from the codes.

    aekit evaluate --probe --model-base-path models/autoencoder --dataset mnist-sample --json

The latest exported version's `encode` signature turns the training and held-out splits into
codes, in batches. On the training codes we fit a linear probe (standardized codes, then a
logistic regression whose C is chosen by cross-validation on the training split alone) and a
k-nearest-neighbour classifier (plain Euclidean), and report their held-out accuracy; raw pixels and PCA at the
code's dimension (fitted on the training pixels) go through the same two classifiers as
baselines. The few-label setting keeps FEW_LABELS training examples per class, drawn with each
seed of FEW_LABEL_SEEDS, and reports the mean accuracy over the draws.

`fit_linear_probe` is also what `aekit export --probe` puts on top of the encoder as the
`classify` signature (see training/endpoints.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from sklearn import decomposition, linear_model, neighbors, pipeline, preprocessing

from training import data
from training.config import ConfigError
from training.evaluate import load_for_source

PROBE_BATCH = 256
FEW_LABELS = 10  # labelled training examples per class in the few-label setting
FEW_LABEL_SEEDS = (0, 1, 2, 3, 4)  # one draw per seed; the mean over draws is reported
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # inverse L2 strengths tried by cross-validation
CV_FOLDS = 5  # also fits the few-label case: 10 examples per class leave 2 per fold
MAX_ITER = 3000  # lbfgs iterations: enough to converge on standardized 784-pixel inputs
KNN_NEIGHBOURS = 5  # with 10 labels per class a larger k would vote across classes


@dataclasses.dataclass(frozen=True)
class Features:
    """What the classifiers see for one split: codes, raw pixels (flattened, in [0, 1]) and labels."""
    codes: np.ndarray
    pixels: np.ndarray
    labels: np.ndarray


def split_features(encode: Callable, split: data.Split, with_pixels: bool = True) -> Features:
    """Codes from `encode` (images -> [N, D]), pixels (unless not `with_pixels`) and labels of a
    split, streamed in batches: only the codes (and pixels) of the whole split are kept."""
    codes, pixels, labels = [], [], []
    for images, y in data.labelled_batches(split, PROBE_BATCH):
        codes.append(np.asarray(encode(images), np.float32))
        pixels.append(np.reshape(np.asarray(images, np.float32), (len(y), -1)) if with_pixels else
                      np.zeros((len(y), 0), np.float32))
        labels.append(y)
    return Features(np.concatenate(codes), np.concatenate(pixels), np.concatenate(labels))


def check_labelled(labels: np.ndarray, dataset: str) -> None:
    """A probe needs at least two classes; unlabelled sources carry one label (0) for every example."""
    present = np.unique(labels)
    if len(present) < 2:
        raise ConfigError(f"evaluate --probe needs a labelled source, but every training example of {dataset} "
                          f"has label {present[0] if len(present) else 'none'} (.npy files and image folders "
                          "without sub-folders carry no labels); use mnist-sample, npz:PATH with y_train/y_test, "
                          "a folder with one sub-folder per class, or labelled TFRecords")


def fit_linear_probe(x: np.ndarray, y: np.ndarray) -> pipeline.Pipeline:
    """Standardize, then multinomial logistic regression with C chosen by stratified CV on (x, y)."""
    folds = min(CV_FOLDS, int(np.min(np.unique(y, return_counts=True)[1])))
    if folds < 2:
        return _pipeline(linear_model.LogisticRegression(C=1.0, max_iter=MAX_ITER)).fit(x, y)
    probe = linear_model.LogisticRegressionCV(Cs=list(C_GRID), cv=folds, max_iter=MAX_ITER, scoring="accuracy",
                                             l1_ratios=(0.0,), use_legacy_attributes=False)
    return _pipeline(probe).fit(x, y)


def fit_knn(x: np.ndarray, y: np.ndarray) -> neighbors.KNeighborsClassifier:
    """k-nearest neighbours, Euclidean on the features as they are: standardizing would blow up
    near-constant dimensions (border pixels, a dead code unit) to the weight of informative ones."""
    return neighbors.KNeighborsClassifier(n_neighbors=min(KNN_NEIGHBOURS, len(y))).fit(x, y)


def _pipeline(classifier) -> pipeline.Pipeline:
    return pipeline.make_pipeline(preprocessing.StandardScaler(), classifier)


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """A fitted linear probe as numbers the export stores in variables:
    scores = softmax(((code - mean) / scale) @ weights + bias), column j the probability of class_ids[j]."""
    mean: np.ndarray  # [D] StandardScaler's mean of the training codes
    scale: np.ndarray  # [D] their standard deviation (1 where a dimension is constant)
    weights: np.ndarray  # [D, K]
    bias: np.ndarray  # [K]
    class_ids: np.ndarray  # [K] int64 labels, in score-column order
    classifier: pipeline.Pipeline  # the sklearn model it came from; the export is checked against it

    def describe(self) -> str:
        return f"linear probe: {self.weights.shape[0]}-d codes -> {len(self.class_ids)} classes"


def linear_probe(classifier: pipeline.Pipeline) -> LinearProbe:
    """The weights of a fitted `fit_linear_probe` pipeline. A two-class logistic regression has one
    logit z (sklearn's predict_proba is [1 - sigmoid(z), sigmoid(z)]), which is softmax([0, z])."""
    scaler, logistic = classifier.steps[0][1], classifier.steps[-1][1]
    weights, bias = logistic.coef_.T, logistic.intercept_
    if weights.shape[1] == 1:
        weights, bias = np.concatenate([np.zeros_like(weights), weights], 1), np.concatenate([[0.0], bias])
    return LinearProbe(scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32),
                       weights.astype(np.float32), bias.astype(np.float32),
                       logistic.classes_.astype(np.int64), classifier)


def fit_export_probe(encode: Callable, split: data.Split, dataset: str) -> LinearProbe:
    """The linear probe that `aekit export --probe` serves: fitted on all of the training split's codes."""
    train = split_features(encode, split, with_pixels=False)
    check_labelled(train.labels, dataset)
    return linear_probe(fit_linear_probe(train.codes, train.labels))


def few_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` examples of every class, drawn without replacement with `seed`."""
    rng = np.random.default_rng(seed)
    picked = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise ConfigError(f"the few-label probe needs {per_class} training examples of every class; "
                              f"class {cls} has {len(members)}")
        picked.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(picked))


def classifier_accuracies(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                          test_y: np.ndarray) -> dict[str, float]:
    """Held-out accuracy of the linear probe and k-NN, on all labels and on FEW_LABELS per class."""
    result = {"linear_probe_accuracy": _accuracy(fit_linear_probe(train_x, train_y), test_x, test_y),
              "knn_accuracy": _accuracy(fit_knn(train_x, train_y), test_x, test_y)}
    few_linear, few_knn = [], []
    for seed in FEW_LABEL_SEEDS:
        keep = few_per_class(train_y, FEW_LABELS, seed)
        few_linear.append(_accuracy(fit_linear_probe(train_x[keep], train_y[keep]), test_x, test_y))
        few_knn.append(_accuracy(fit_knn(train_x[keep], train_y[keep]), test_x, test_y))
    result[f"linear_probe_accuracy_{FEW_LABELS}_per_class"] = float(np.mean(few_linear))
    result[f"linear_probe_accuracy_{FEW_LABELS}_per_class_std"] = float(np.std(few_linear))
    result[f"knn_accuracy_{FEW_LABELS}_per_class"] = float(np.mean(few_knn))
    return result


def _accuracy(classifier, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(classifier.predict(x) == y))


def pca_features(train_pixels: np.ndarray, test_pixels: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Both splits projected on the first `dim` principal components of the training pixels."""
    pca = decomposition.PCA(n_components=min(dim, *train_pixels.shape), random_state=0).fit(train_pixels)
    return pca.transform(train_pixels), pca.transform(test_pixels)


def probe_report(train: Features, test: Features) -> dict:
    """Accuracies on the codes, with raw pixels and PCA at the code's dimension as baselines."""
    dim = train.codes.shape[1]
    pca_train, pca_test = pca_features(train.pixels, test.pixels, dim)
    return {
        "code_dim": dim, "train_examples": len(train.labels), "test_examples": len(test.labels),
        "classes": len(np.unique(train.labels)), "few_label_seeds": list(FEW_LABEL_SEEDS),
        **classifier_accuracies(train.codes, train.labels, test.codes, test.labels),
        "baselines": {
            "pixels": {"dim": train.pixels.shape[1],
                       **classifier_accuracies(train.pixels, train.labels, test.pixels, test.labels)},
            "pca": {"dim": pca_train.shape[1],
                    **classifier_accuracies(pca_train, train.labels, pca_test, test.labels)},
        },
    }


def evaluate_probe(model_base_path: str, dataset: str, data_dir: str | None = None) -> dict:
    """Recognition quality of the latest exported version's codes on `dataset` (see module doc)."""
    model = load_for_source(model_base_path, "encode", dataset, data_dir)
    train = split_features(lambda x: model.signature(images=x)["latent"], model.source.train)
    check_labelled(train.labels, dataset)
    test = split_features(lambda x: model.signature(images=x)["latent"], model.source.test)
    return {"version": model.version, **probe_report(train, test)}


def format_report(report: dict) -> str:
    """The report as a small table: one row per input (codes, pixels, PCA), one column per accuracy."""
    few = f"{FEW_LABELS}/class"
    rows = [("input", "dim", "linear", "k-NN", f"linear {few}", f"k-NN {few}")]
    for name, values in [(f"codes (version {report['version']})", report),
                         ("raw pixels", report["baselines"]["pixels"]), ("PCA", report["baselines"]["pca"])]:
        dim = values.get("dim", report["code_dim"])
        rows.append((name, str(dim), *(f"{values[k]:.3f}" for k in (
            "linear_probe_accuracy", "knn_accuracy", f"linear_probe_accuracy_{FEW_LABELS}_per_class",
            f"knn_accuracy_{FEW_LABELS}_per_class"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    seeds = ", ".join(map(str, FEW_LABEL_SEEDS))
    return "\n".join([*lines, f"held-out accuracy on {report['test_examples']} examples; {few}: mean over "
                      f"draws with seeds {seeds}"])
