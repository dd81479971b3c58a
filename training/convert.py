"""`aekit data convert`: any source aekit reads, written once as TFRecord shards that every worker streams.

    aekit data convert --dataset ./my_images --output gs://bucket/data/my_images --shards 32
    aekit train --dataset tfrecord:gs://bucket/data/my_images ...
    # -> train-00000-of-00032.tfrecord ..., test-00000-of-00008.tfrecord ..., metadata.json
    aekit data convert --dataset tfrecord:gs://bucket/data/my_images --output gs://bucket/data/threes --classes 3
    # -> the examples labelled 3 only: a one-class (anomaly detection) training set that streams

Examples keep the source's train/test split (its own, or the fixed split seed's) and go round
robin over the shards, so a class-sorted source still gives mixed shards. Images are stored as raw
pixels with their shape (exact, decoded per batch in one op); vectors as float lists (schema:
training/records.py). metadata.json (shape, dtype, counts per shard, split seed) is written last:
a folder without it is an unfinished conversion and is not read as a dataset.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from storage import paths
from training import data, records
from training.config import ConfigError
from training.sources import METADATA_FILE, SPLIT_SEED, Source, Split

FORMAT_VERSION = "aekit-tfrecord-1"
READ_BATCH = 1024  # examples read from the source at a time


def convert(dataset: str, output: str, shards: int = 8, data_dir: str | None = None,
            download: bool = False, classes: Sequence[int] = (), *, source: Source | None = None,
            flags: tuple[str, str] = ("--classes", "--output"), extra: dict | None = None,
            check_stop: Callable[[], None] | None = None, split_labels: dict | None = None) -> dict:
    """Writes `dataset` as shards under `output` and returns the metadata it wrote.

    classes: keep only the examples with these labels, in both splits (what `train
    --normal-classes` does to an in-memory source, done once for a streamed one: see
    anomaly.normal_source, which passes the `source` it loaded with its `split_labels` already
    read, the `flags` its refusals name, `extra` metadata and a `check_stop` called between
    batches that raises to stop).
    """
    if shards < 1:
        raise ConfigError(f"--shards must be at least 1, got {shards}")
    output = paths.check_writable(output, flags[1])
    if paths.exists(paths.join(output, METADATA_FILE)):
        raise ConfigError(f"{output} already holds a converted dataset ({METADATA_FILE}); choose an empty folder")
    source = source or data.load_source(dataset, data_dir, download)
    if classes:
        split_labels = split_labels or {"train": labels(source.train), "test": labels(source.test)}
    kept = _kept_counts(split_labels, classes, dataset, flags[0]) if classes else {}
    wanted = {"train": shards, "test": max(1, shards // 4)}
    splits = {name: _write_split(getattr(source, name), output, name, min(count, kept.get(name, count)), classes,
                                 check_stop)
              for name, count in wanted.items()}
    first = next(_batches(source.train))[0][:1]
    fmt = records.RecordFormat("image" if first.dtype == "uint8" else "vector", tuple(source.input_shape))
    metadata = {"format_version": FORMAT_VERSION, "source": dataset, "format": fmt.to_json(),
                "shape": list(source.input_shape), "dtype": str(first.dtype), "split_seed": SPLIT_SEED,
                "splits": splits, **(extra or {})}
    if classes:
        metadata["classes"] = sorted(int(c) for c in classes)
    paths.write_text(paths.join(output, METADATA_FILE), json.dumps(metadata, indent=1) + "\n")
    return metadata


def _kept_counts(split_labels: dict[str, np.ndarray], classes: Sequence[int], dataset: str,
                 flag: str) -> dict[str, int]:
    """The examples of `classes` in each split, from the labels alone (read before writing: a
    split gets no more shards than examples); refused if a class has none in a split."""
    kept = {}
    for name, y in split_labels.items():
        present, kept[name] = set(np.unique(y).tolist()), int(np.isin(y, classes).sum())
        missing = [c for c in classes if c not in present]
        if missing:
            raise ConfigError(f"{flag} {','.join(map(str, classes))}: {dataset} has no {name} examples of "
                              f"class {missing[0]} (its labels are {', '.join(map(str, sorted(present)))})")
    return kept


def _write_split(split: Split, output: str, name: str, shards: int, classes: Sequence[int] = (),
                 check_stop: Callable[[], None] | None = None) -> dict:
    shards = min(shards, split.count)
    files = [f"{name}-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]
    counts = [0] * shards
    writers = [tf.io.TFRecordWriter(paths.join(output, f)) for f in files]
    try:
        with tqdm(total=split.count, desc=f"converting {name}", unit="example", disable=None) as bar:
            j = 0
            for x, y in _batches(split):
                if check_stop:
                    check_stop()
                bar.update(len(x))
                if classes:
                    keep = np.isin(y, classes)
                    x, y = x[keep], y[keep]
                for example, label in zip(x, y):
                    writers[j % shards].write(records.example_for(example, int(label)))
                    counts[j % shards] += 1
                    j += 1
    finally:
        for writer in writers:
            writer.close()
    return {"count": sum(counts), "shards": [{"file": f, "count": c} for f, c in zip(files, counts)]}


def labels(split: Split) -> np.ndarray:
    """Every label of a split, in order, without decoding its examples (one pass over a streamed split)."""
    return np.concatenate([y for _, y in _batches(split, labels_only=True)])


def _batches(split: Split, labels_only: bool = False):
    """(examples, labels) numpy batches of a split, in order; examples None when labels_only."""
    if split.in_memory:
        for start in range(0, split.count, READ_BATCH):
            yield (None if labels_only else split.x[start:start + READ_BATCH]), split.y[start:start + READ_BATCH]
        return
    for serialized in tf.data.TFRecordDataset(list(split.files)).batch(READ_BATCH):
        examples = None if labels_only else records.parse_batch(serialized, split.fmt).numpy()
        yield examples, records.parse_labels(serialized).numpy()
