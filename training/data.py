"""Input pipeline: batches of (noisy, clean) float32 pairs for training and evaluation.

Sources are read by training/sources.py; this module only turns a split into tf.data batches:

  in memory (mnist-sample, npz, .npy, images)   a generator yields each batch's uint8/float rows
  files (tfrecord:, tfds:)                       shard by file, interleave, shuffle buffer, batch

then, per batch and never per example: parse/decode, scale to [0, 1], add noise, prefetch. The
trainer asks for the rows as stored with their noise keys instead, and scales and draws the noise
in its step, on the accelerator (`noise_in_step`, `add_noise`).
No path puts the data in the graph: a numpy array handed to from_tensor_slices or tf.constant
is embedded in the GraphDef as a constant (a copy per pipeline, and a hard 2 GB limit), while a
generator keeps one copy in this process and the graph holds only a call into it.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from storage import paths
from training import records
from training.sources import (  # noqa: F401 - the readers' names, re-exported for callers of this module
    SPLIT_SEED,
    Arrays,
    DataError,
    Source,
    Split,
    load_arrays,
    load_source,
    split_arrays,
)

SHUFFLE_BUFFER = 10_000  # examples per input group; with files shuffled per epoch, enough mixing at ~8 MB
CYCLE_LENGTH = 8  # files read at once per input group
PHILOX = 1  # tf.random.Algorithm.PHILOX: a counter-based stream, the same on CPU and GPU


def scale_to_unit(x: tf.Tensor) -> tf.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; floats are already checked to be in [0, 1]."""
    if x.dtype == tf.uint8:
        return tf.cast(x, tf.float32) / 255.0
    return tf.cast(x, tf.float32)


def make_dataset(split: Split | np.ndarray, batch_size: int, *, noise_factor: float = 0.0, seed: int = 0,
                 training: bool = True, input_context: tf.distribute.InputContext | None = None,
                 skip_batches: int = 0, input_groups: int = 0, noise_in_step: bool = False) -> tf.data.Dataset:
    """Batches of (noisy, clean) float32 pairs for one input pipeline.

    With `noise_in_step` (the trainer) batches are (keys, rows as stored, e.g. uint8) and the
    train step calls `add_noise(keys, rows, noise_factor)` on its device: the same values, but the
    noise is drawn by the accelerator, and the host ships 1 byte per pixel instead of 8 (noisy and
    clean float32). Drawing noise took half the pipeline's time here (benchmarks/bench_training.py).

    `batch_size` is the GLOBAL batch. With an `input_context` (from the strategy) this pipeline
    feeds only its rows of each global batch, split into per-replica batches, so one function
    serves one device, many GPUs and many workers. In memory, every pipeline cuts the same seeded
    permutation, so the replicas together see exactly the batch one device would. From files,
    each global batch is drawn from `input_groups` disjoint sets of files (default: one per
    pipeline); a fixed `input_groups` gives the same batches on 1 process and on N workers.
    `seed` is seed + epoch in the trainer and `skip_batches` the steps already done.

    Resuming skips batches deterministically rather than checkpointing the tf.data iterator: a
    generator's iterator cannot be checkpointed, a shuffle buffer would be saved per worker in
    every checkpoint, and skipping costs at most part of one epoch of reading (the pipeline is
    over 10x faster than the trainer; see benchmarks/bench_training.py).
    """
    split = split if isinstance(split, Split) else Split(len(split), x=split)
    start, rows, per_replica = _slice_for(batch_size, input_context)
    if split.in_memory:
        ds = _memory_batches(split.x, batch_size, seed, training, start, rows, skip_batches)
    else:
        ds = _file_batches(split, batch_size, seed, training, input_context, input_groups, skip_batches)

    def finish(i, batch):
        # one map per batch for parsing, keys and noise: each tf.data stage costs a thread handoff
        stored = batch if split.in_memory else records.parse_batch(batch, split.fmt)
        keys = noise_keys(seed, i, start, tf.shape(stored)[0])
        return (keys, stored) if noise_in_step else add_noise(keys, stored, noise_factor)

    ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    if per_replica != rows:
        ds = ds.rebatch(per_replica)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_dataset(split: Split | np.ndarray, batch_size: int, *, noise_factor: float = 0.0, seed: int = 0,
                 part: tuple[int, int] = (0, 1)) -> tf.data.Dataset:
    """The split in order, in batches; `part=(i, n)` keeps the i-th of n disjoint parts, so n
    workers evaluate it together, each reading and scoring about 1/n of it."""
    index, count = part
    split = split if isinstance(split, Split) else Split(len(split), x=split)
    if count > 1 and split.in_memory:
        split = Split(0, x=split.x[index::count])  # every n-th example
    elif count > 1 and len(split.files) >= count:
        split = Split(0, files=split.files[index::count], fmt=split.fmt)  # whole files
    ds = make_dataset(split, batch_size, noise_factor=noise_factor, seed=seed, training=False)
    if count > 1 and not split.in_memory and len(split.files) < count:
        ds = ds.shard(count, index)  # fewer files than workers: every n-th batch (each reads all)
    return ds


def labelled_batches(split: Split, batch_size: int):
    """(images in [0, 1], labels) batches of a split, in order; streamed splits are read from their files."""
    if split.in_memory:
        for start in range(0, split.count, batch_size):
            yield (scale_to_unit(split.x[start:start + batch_size]), np.asarray(split.y[start:start + batch_size]))
        return
    for serialized in tf.data.TFRecordDataset(list(split.files)).batch(batch_size):
        yield scale_to_unit(records.parse_batch(serialized, split.fmt)), records.parse_labels(serialized).numpy()


def noise_keys(seed: int, batch_index: tf.Tensor, first_row: int, rows: tf.Tensor) -> tf.Tensor:
    """[rows, 3] int64: (seed, batch index, row of the GLOBAL batch) per row. Carried with the rows,
    so after any split into per-replica batches the first row's key names that part's noise."""
    rows = tf.cast(rows, tf.int64)
    head = tf.tile(tf.stack([tf.cast(seed, tf.int64), tf.cast(batch_index, tf.int64)])[None], [rows, 1])
    return tf.concat([head, (tf.cast(first_row, tf.int64) + tf.range(rows))[:, None]], axis=1)


def add_noise(keys: tf.Tensor, stored: tf.Tensor, noise_factor: float, max_shift: int = 0,
              shift_input_only: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """(noisy input, target) float32 in [0, 1] from rows as stored and their `noise_keys`.

    With max_shift, the input is the image moved by random whole pixels (random_shift), and so is
    the target, unless shift_input_only: then the target is the image where it was, so the model
    learns to put a moved digit back and its code learns to ignore small moves (what a linear
    classifier on the code needs; benchmarks/bench_codes.py has the measurement).
    """
    clean = scale_to_unit(stored)
    moved = random_shift(clean, keys, max_shift) if max_shift > 0 else clean
    target = clean if shift_input_only else moved
    if noise_factor <= 0:
        return moved, target
    noise = gaussian_noise(tf.shape(clean), keys[0, :2], first_row=keys[0, 2])
    return tf.clip_by_value(moved + noise_factor * noise, 0.0, 1.0), target


def random_shift(images: tf.Tensor, keys: tf.Tensor, max_shift: int) -> tf.Tensor:
    """Each image [rows, H, W, C] moved by dx, dy whole pixels, each uniform in [-max_shift,
    max_shift], zeros moved in: augmentation for a small training set.

    The shifts come from the rows' own Philox stream, like the noise (seed pair (seed, -1 - batch
    index), which no noise stream uses), so any split of a batch over replicas and workers moves
    every image exactly as one device would.
    """
    rows = tf.shape(images)[0]
    normal = gaussian_noise(tf.stack([rows, 2]), tf.stack([keys[0, 0], -1 - keys[0, 1]]), first_row=keys[0, 2])
    uniform = 0.5 * (1.0 + tf.math.erf(normal / math.sqrt(2.0)))  # the normal CDF: uniform in (0, 1)
    span = 2 * max_shift + 1
    steps = tf.minimum(tf.floor(uniform * span), span - 1) - max_shift  # [rows, 2] integers (dx, dy)
    ones, zeros = tf.ones([rows, 1]), tf.zeros([rows, 1])
    # output pixel (x, y) reads input pixel (x - dx, y - dy)
    transforms = tf.concat([ones, zeros, -steps[:, :1], zeros, ones, -steps[:, 1:], zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(images=images, transforms=transforms,
                                                 output_shape=tf.shape(images)[1:3], fill_value=0.0,
                                                 interpolation="NEAREST", fill_mode="CONSTANT")


def gaussian_noise(shape: tf.Tensor, seed: tf.Tensor, first_row: int | tf.Tensor = 0) -> tf.Tensor:
    """Standard normal float32 values of `shape` [rows, ...]: rows first_row.. of the batch-wide
    stream that `seed` (a stateless pair) names.

    Philox is counter-based: row r's values come from counters r * L/4 on, whatever rows are
    drawn with it, so a worker draws only the rows it feeds and gets exactly the values one device
    would give them. Box-Muller on the uniforms, in TF's vectorized math ops: with one thread per
    op, as in tf.data's parallel map, this is ~2x faster than tf.random.stateless_normal's kernel.
    """
    rows = shape[0]
    per_row = tf.reduce_prod(shape[1:])
    half = (per_row + 1) // 2
    row_length = 4 * ((2 * half + 3) // 4)  # uniforms per row, whole Philox blocks of 4
    key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=seed)
    offset = tf.stack([tf.cast(first_row, tf.int64) * tf.cast(row_length // 4, tf.int64), 0])
    counter = tf.bitcast(tf.bitcast(counter, tf.int64) + offset, tf.uint64)
    u = tf.raw_ops.StatelessRandomUniformV2(shape=tf.stack([rows, row_length]), key=key, counter=counter,
                                            alg=PHILOX)
    u1, u2 = u[:, :half], u[:, half:2 * half]
    radius = tf.sqrt(-2.0 * tf.math.log1p(-u1))  # 1 - u lies in (0, 1]: the log stays finite
    angle = (2.0 * math.pi) * u2
    pairs = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=1)
    return tf.reshape(pairs[:, :per_row], shape)


def _memory_batches(x: np.ndarray, batch_size: int, seed: int, training: bool, start: int, rows: int,
                    skip: int) -> tf.data.Dataset:
    """(batch index, rows start..start+rows of the batch) from a seeded permutation cut into whole
    batches when training (repeated: every worker must take exactly steps_per_epoch steps), in
    order otherwise. One element per batch keeps tf.data's per-element cost off the hot path."""
    count = len(x)
    steps = count // batch_size if training else math.ceil(count / batch_size)

    def batches():
        order = np.random.default_rng([seed, 0]).permutation(count) if training else np.arange(count)
        i = skip
        while training or i < steps:
            first = (i % steps) * batch_size
            yield i, x[order[first:first + batch_size][start:start + rows]]
            i += 1

    signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([None, *x.shape[1:]], tf.as_dtype(x.dtype)))
    return tf.data.Dataset.from_generator(batches, output_signature=signature)


def _file_batches(split: Split, batch_size: int, seed: int, training: bool,
                  context: tf.distribute.InputContext | None, input_groups: int, skip: int) -> tf.data.Dataset:
    """(batch index, serialized records) of this pipeline, from its groups of files."""
    pipelines = context.num_input_pipelines if context else 1
    pipeline = context.input_pipeline_id if context else 0
    groups = input_groups or pipelines
    if groups % pipelines or batch_size % groups:
        raise DataError(f"input groups ({groups}) must be a multiple of the input pipelines ({pipelines}) "
                        f"and divide the global batch ({batch_size})")
    mine = range(pipeline * groups // pipelines, (pipeline + 1) * groups // pipelines)
    streams = [_group_records(split, g, groups, batch_size // groups, seed, training) for g in mine]
    ds = tf.data.Dataset.zip(tuple(streams)).map(lambda *parts: tf.concat(parts, axis=0))
    return ds.enumerate().skip(skip)  # skips serialized records: nothing decoded for skipped batches


def _group_records(split: Split, group: int, groups: int, rows: int, seed: int, training: bool) -> tf.data.Dataset:
    """Batches of `rows` serialized records of one input group.

    Sharded by FILE when there are at least as many files as groups, so workers read disjoint
    files. With fewer files, every group reads all files and keeps every groups-th record
    (tf.data's DATA sharding): correct, but each worker reads the whole split.
    """
    by_file = len(split.files) >= groups
    names = list(split.files[group::groups] if by_file else split.files)
    if training:  # a new seeded file order on every pass, the same for every iterator over it
        files = tf.data.Dataset.from_generator(lambda: _shuffled_forever(names, [seed, group]),
                                               output_signature=tf.TensorSpec([], tf.string))
    else:
        files = tf.data.Dataset.from_tensor_slices(names)
    parallel = _parallel_reads(names)
    ds = files.interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20), cycle_length=CYCLE_LENGTH,
                          num_parallel_calls=parallel, deterministic=True if parallel else None)
    if not by_file:
        ds = ds.shard(groups, group)
    if training:
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed * 7919 + group, reshuffle_each_iteration=False)
    return ds.batch(rows, drop_remainder=training)


def _parallel_reads(names: list[str]) -> int | None:
    """Object stores: files read in parallel, to hide each read's latency. Local files: read in
    turn, which delivers ~1.3x the records per second here (a parallel interleave hands every
    record between threads; benchmarks/bench_training.py, input_pipeline_from_shards)."""
    return None if all(paths.is_local(n) for n in names) else tf.data.AUTOTUNE


def _shuffled_forever(names: list[str], seed: list[int]):
    rng = np.random.default_rng(seed)
    while True:
        yield from (names[i] for i in rng.permutation(len(names)))


def _slice_for(batch_size: int, context: tf.distribute.InputContext | None) -> tuple[int, int, int]:
    """(first row, rows, per-replica batch) of each global batch that this input pipeline feeds."""
    if context is None or context.num_replicas_in_sync == 1:
        return 0, batch_size, batch_size
    per_replica = context.get_per_replica_batch_size(batch_size)  # raises if it does not divide
    rows = batch_size // context.num_input_pipelines
    return context.input_pipeline_id * rows, rows, per_replica


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    steps = num_examples // batch_size
    if steps == 0:
        raise DataError(f"the training split has {num_examples} examples, fewer than one global batch "
                        f"of {batch_size}; lower --batch-size")
    return steps


def to_arrays(source: Source, limit: int = 0) -> Arrays:
    """A source's examples in memory (plots, small checks): streamed files are read in order."""
    def read(split: Split) -> tuple[np.ndarray, np.ndarray]:
        if split.in_memory:
            return split.x[:limit or None], split.y[:limit or None]
        ds = tf.data.TFRecordDataset(list(split.files))
        ds = (ds.take(limit) if limit else ds).batch(1024)
        parts = [(records.parse_batch(b, split.fmt).numpy(), records.parse_labels(b).numpy()) for b in ds]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return Arrays(*read(source.train), *read(source.test))


def limit(split: Split, max_examples: int) -> Split:
    """The first `max_examples` of an in-memory split; a streamed split keeps its files and only
    counts fewer examples (shorter epochs over the same shuffled stream)."""
    if not max_examples or max_examples >= split.count:
        return split
    if split.in_memory:
        return Split(max_examples, split.x[:max_examples], split.y[:max_examples] if split.y is not None else None)
    return Split(max_examples, files=split.files, fmt=split.fmt)
