"""`aekit data convert`: any source aekit reads, written once as TFRecord shards that every worker streams.

    aekit data convert --dataset ./my_images --output gs://bucket/data/my_images --shards 32
    aekit train --dataset tfrecord:gs://bucket/data/my_images ...
    # -> train-00000-of-00032.tfrecord ..., test-00000-of-00008.tfrecord ..., metadata.json

Examples keep the source's train/test split (its own, or the fixed split seed's) and go round
robin over the shards, so a class-sorted source still gives mixed shards. Images are stored as raw
pixels with their shape (exact, decoded per batch in one op); vectors as float lists (schema:
training/records.py). metadata.json (shape, dtype, counts per shard, split seed) is written last:
a folder without it is an unfinished conversion and is not read as a dataset.
"""

from __future__ import annotations

import json

import tensorflow as tf
from tqdm import tqdm

from storage import paths
from training import data, records
from training.config import ConfigError
from training.sources import METADATA_FILE, SPLIT_SEED, Split

FORMAT_VERSION = "aekit-tfrecord-1"
READ_BATCH = 1024  # examples read from the source at a time


def convert(dataset: str, output: str, shards: int = 8, data_dir: str | None = None,
            download: bool = False) -> dict:
    """Writes `dataset` as shards under `output` and returns the metadata it wrote."""
    if shards < 1:
        raise ConfigError(f"--shards must be at least 1, got {shards}")
    output = paths.check_writable(output, "--output")
    if paths.exists(paths.join(output, METADATA_FILE)):
        raise ConfigError(f"{output} already holds a converted dataset ({METADATA_FILE}); choose an empty folder")
    source = data.load_source(dataset, data_dir, download)
    test_shards = max(1, shards // 4)
    splits = {"train": _write_split(source.train, output, "train", shards),
              "test": _write_split(source.test, output, "test", test_shards)}
    first = next(_batches(source.train))[0][:1]
    fmt = records.RecordFormat("image" if first.dtype == "uint8" else "vector", tuple(source.input_shape))
    metadata = {"format_version": FORMAT_VERSION, "source": dataset, "format": fmt.to_json(),
                "shape": list(source.input_shape), "dtype": str(first.dtype), "split_seed": SPLIT_SEED,
                "splits": splits}
    paths.write_text(paths.join(output, METADATA_FILE), json.dumps(metadata, indent=1) + "\n")
    return metadata


def _write_split(split: Split, output: str, name: str, shards: int) -> dict:
    shards = min(shards, split.count)
    files = [f"{name}-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]
    counts = [0] * shards
    writers = [tf.io.TFRecordWriter(paths.join(output, f)) for f in files]
    try:
        with tqdm(total=split.count, desc=f"converting {name}", unit="example", disable=None) as bar:
            j = 0
            for x, y in _batches(split):
                for example, label in zip(x, y):
                    writers[j % shards].write(records.example_for(example, int(label)))
                    counts[j % shards] += 1
                    j += 1
                bar.update(len(x))
    finally:
        for writer in writers:
            writer.close()
    return {"count": sum(counts), "shards": [{"file": f, "count": c} for f, c in zip(files, counts)]}


def _batches(split: Split):
    """(examples, labels) numpy batches of a split, in order."""
    if split.in_memory:
        for start in range(0, split.count, READ_BATCH):
            yield split.x[start:start + READ_BATCH], split.y[start:start + READ_BATCH]
        return
    for serialized in tf.data.TFRecordDataset(list(split.files)).batch(READ_BATCH):
        yield records.parse_batch(serialized, split.fmt).numpy(), records.parse_labels(serialized).numpy()
