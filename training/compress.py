"""Compression jobs: a dataset to a code file and back, and the rate-distortion of the latest version.

    aekit compress --model-base-path models/autoencoder --dataset mnist-sample --split test --output test.aec
    aekit decompress --model-base-path models/autoencoder --input test.aec --output test.npz
    aekit evaluate --compression --model-base-path models/autoencoder --dataset mnist-sample --json

compress runs the latest version's `compress` signature (one uint8 per latent dimension) over the
split in batches and writes a code file (training/codefile.py) that names the model, its version
and the fingerprint of its decoder and quantization. decompress refuses a file from another model,
another version or another fingerprint, and a damaged file, in one line; otherwise it runs that
version's `decompress` signature and writes `images` (uint8, the source's shape) and `labels`
(when the file has them) to an .npz, in batches. Only the labels (8 bytes an image) are held in
memory whole. evaluate --compression reports held-out PSNR of decompress(compress(x)) and the
bytes per image a code file of the test split takes (header and trailer amortised, no labels).
"""

from __future__ import annotations

import posixpath
import zipfile

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from storage import paths
from training import codefile, data, endpoints
from training.config import ConfigError
from training.evaluate import EVAL_BATCH, load_for_source, psnr_db

SPLITS = ("train", "test", "all")
DEFAULT_CODEC = "zlib"  # measured on mnist-sample codes: 7% under "none", and lzma does not beat it (README)
PROGRESS_MIN_EXAMPLES = 10_000  # smaller inputs finish before a bar would tell anything


def model_name(model_base_path: str) -> str:
    """A model's name is its base path's last folder, as in TF Serving's --model_base_path examples."""
    return posixpath.basename(model_base_path.rstrip("/"))


def _splits(source: data.Source, which: str) -> list[data.Split]:
    if which not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}; got {which!r}")
    return {"train": [source.train], "test": [source.test], "all": [source.train, source.test]}[which]


def _has_labels(split: data.Split) -> bool:
    """Unlabelled in-memory sources carry label 0 everywhere (training/sources.py); TFRecords carry a label."""
    return not split.in_memory or bool(np.any(np.asarray(split.y) != 0))


def _progress(total: int, what: str):
    return tqdm(total=total, unit="img", desc=what, disable=total < PROGRESS_MIN_EXAMPLES or None, leave=False)


def compress_job(model_base_path: str, dataset: str, output: str, split: str = "test",
                 codec: str = DEFAULT_CODEC, data_dir: str | None = None) -> dict:
    """Writes the split's codes from the latest version to `output`; returns a summary."""
    model = load_for_source(model_base_path, "compress", dataset, data_dir)
    metadata = _compression_metadata(export_dir(model_base_path, model.version), model.version)
    parts = _splits(model.source, split)
    header = codefile.Header(model_name(model_base_path), model.version, metadata["fingerprint"],
                             int(metadata["latent_dim"]), tuple(model.source.input_shape),
                             sum(p.count for p in parts), any(_has_labels(p) for p in parts), codec)
    paths.check_writable(posixpath.dirname(output) or ".", "--output")
    with _removed_on_failure(output), _progress(header.count, "compress") as bar:
        with codefile.Writer(tf.io.gfile.GFile(output, "wb"), header) as writer:
            for part in parts:
                for images, labels in data.labelled_batches(part, EVAL_BATCH):
                    writer.write(model.signature(images=images)["codes"].numpy(), labels)
                    bar.update(len(labels))
    size = tf.io.gfile.stat(output).length
    return {"output": output, "model": header.model, "version": header.version, "count": header.count,
            "labels": header.labels, "codec": codec, "bytes": size, "bytes_per_image": size / max(header.count, 1)}


def decompress_job(model_base_path: str, input_path: str, output: str, model_version: int | None = None) -> dict:
    """Decodes a code file with the version that wrote it into an .npz of uint8 images (and labels)."""
    paths.check(input_path, "--input")
    if not paths.exists(input_path):
        raise ConfigError(f"--input {input_path} does not exist")
    header = codefile.verify(input_path)
    paths.check_writable(posixpath.dirname(output) or ".", "--output")
    _, body_start = codefile.read_header(input_path)
    decompress = _matching_decompress(model_base_path, header, input_path, model_version)
    labels = []
    with _removed_on_failure(output), _progress(header.count, "decompress") as bar:
        with tf.io.gfile.GFile(output, "wb") as raw, zipfile.ZipFile(_WriteOnly(raw), "w") as archive:
            with archive.open("images.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False,
                                                         "shape": (header.count, *header.image_shape)})
                for codes, batch_labels in codefile.records(input_path, header, body_start, EVAL_BATCH):
                    f.write(to_uint8(decompress(codes), header.image_shape).tobytes())
                    labels.append(batch_labels)
                    bar.update(len(codes))
            if header.labels:
                with archive.open("labels.npy", "w") as f:
                    np.lib.format.write_array(f, np.concatenate(labels) if labels else np.zeros(0, np.int64))
    return {"output": output, "model": header.model, "version": header.version, "count": header.count,
            "labels": header.labels}


def to_uint8(images: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float images in [0, 1] -> uint8 (nearest of 0..255) in the source's shape."""
    return np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8).reshape(-1, *shape)


def _matching_decompress(model_base_path: str, header: codefile.Header, input_path: str, version: int | None):
    """The `decompress` signature of the version that wrote the file, after checking model name,
    version and fingerprint; each mismatch is refused in one line."""
    name = model_name(paths.check(model_base_path, "--model-base-path"))
    written_by = f"{input_path} was written by version {header.version} of model {header.model!r}"
    if header.model != name:
        raise codefile.CodeFileError(f"{written_by}, not by model {name!r} ({model_base_path}); "
                                     "decode it with that model's --model-base-path")
    if version is not None and version != header.version:
        raise codefile.CodeFileError(f"{written_by}; version {version} cannot decode it (codes mean something "
                                     "only to the decoder that made them): omit --model-version")
    version_dir = export_dir(model_base_path, header.version)
    metadata = _compression_metadata(version_dir, header.version)
    if metadata["fingerprint"] != header.fingerprint:
        raise codefile.CodeFileError(
            f"{written_by} with decoder fingerprint {header.fingerprint[:12]}..., but {version_dir} has "
            f"{metadata['fingerprint'][:12]}... (re-exported with other weights?); recompress with this version")
    loaded = tf.saved_model.load(version_dir)

    def decompress(codes: np.ndarray) -> np.ndarray:  # holds `loaded`: its variables die with it
        return loaded.signatures["decompress"](codes=tf.constant(codes))["images"].numpy()
    return decompress


def export_dir(model_base_path: str, version: int) -> str:
    """The folder of version `version` under the base path, refused in one line when absent."""
    base = paths.check(model_base_path, "--model-base-path")
    versions = paths.version_folders(base) if paths.isdir(base) else {}
    if version not in versions:
        found = ", ".join(map(str, sorted(versions))) or "none"
        raise ConfigError(f"version {version} is not under {base} (versions: {found})")
    return paths.join(base, versions[version])


def _compression_metadata(version_dir: str, version: int) -> dict:
    metadata = endpoints.read_compression_metadata(version_dir)
    if metadata is None:
        raise ConfigError(f"version {version} ({version_dir}) was exported before compression existed: it has no "
                          f"{endpoints.COMPRESSION_FILE}; export it again")
    return metadata


class _WriteOnly:
    """A GFile opened for writing, minus its seek (which fails): zipfile then streams the archive."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data: bytes) -> int:
        self.stream.write(data)
        return len(data)  # zipfile counts offsets from this; GFile.write returns None

    def flush(self) -> None:
        self.stream.flush()


class _CountingSink:
    """A write-only stream that keeps only the number of bytes written to it."""

    def __init__(self):
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)

    def close(self) -> None:
        pass


def evaluate_compression(model_base_path: str, dataset: str, data_dir: str | None = None,
                         codec: str = DEFAULT_CODEC) -> dict:
    """Held-out PSNR of decompress(compress(x)) (float, and after rounding to uint8 as decompress
    writes it), the float model's PSNR, and the code file's bytes per image on the test split."""
    model = load_for_source(model_base_path, "compress", dataset, data_dir)
    metadata = _compression_metadata(export_dir(model_base_path, model.version), model.version)
    signatures = model.loaded.signatures
    split = model.source.test
    header = codefile.Header(model_name(model_base_path), model.version, metadata["fingerprint"],
                             int(metadata["latent_dim"]), tuple(model.source.input_shape), split.count, False, codec)
    sink, sums = _CountingSink(), np.zeros(4)
    with codefile.Writer(sink, header) as writer:
        for images, _ in data.labelled_batches(split, EVAL_BATCH):
            codes = signatures["compress"](images=images)["codes"]
            decoded = signatures["decompress"](codes=codes)["images"].numpy()
            clean = np.asarray(images, np.float64)
            sums += [np.sum(np.square(decoded - clean)),
                     np.sum(np.square(to_uint8(decoded, decoded.shape[1:]) / 255.0 - clean)),
                     np.sum(np.square(signatures["denoise"](images=images)["reconstruction"].numpy() - clean)),
                     clean.size]
            writer.write(codes.numpy())
    return {"version": model.version, "latent_dim": header.latent_dim, "codec": codec,
            "test_examples": split.count, "bytes_per_image": sink.size / max(split.count, 1),
            "psnr_db": psnr_db(sums[0] / sums[3]), "psnr_db_uint8": psnr_db(sums[1] / sums[3]),
            "float_psnr_db": psnr_db(sums[2] / sums[3])}


class _removed_on_failure:
    """Deletes a half-written output file when the block raises."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is not None and tf.io.gfile.exists(self.path):
            tf.io.gfile.remove(self.path)
