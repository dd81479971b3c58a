"""Float16 checks on 2 logical CPU devices, one per process (tests/test_precision.py runs them).

    python -m tests.two_replicas float16_step WORKDIR   # -> one JSON line on stdout

Two MirroredStrategy objects in one process break each other's collectives ("Shape mismatch in
the collective instance 100"), and test_train.py already runs one in the pytest process, so each
check here gets a fresh process with the devices configured before TensorFlow starts.
Only measures and prints; the assertions are in the test, so a wrong number fails it there.
"""

from __future__ import annotations

import json
import sys

from training.distribute import configure_logical_devices

configure_logical_devices(2)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from training import data, train  # noqa: E402
from training.config import TrainConfig  # noqa: E402


def _mirrored() -> tf.distribute.MirroredStrategy:
    return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")[:2]])


def _cfg(workdir: str, name: str) -> TrainConfig:
    return TrainConfig(model="dense", batch_size=64, learning_rate=1e-2, precision="mixed_float16",
                       workdir=f"{workdir}/{name}", export=False)


def float16_step(workdir: str) -> dict:
    """One mixed_float16 step on 1 device and on 2 replicas from the same weights and global batch."""
    from tests.test_train import one_step_weights

    arrays = data.load_arrays("mnist-sample")
    arrays = data.Arrays(arrays.x_train[:256], arrays.y_train[:256], arrays.x_test[:64], arrays.y_test[:64])
    init_one, after_one = one_step_weights(_cfg(workdir, "one"), arrays, tf.distribute.get_strategy())
    init_two, after_two = one_step_weights(_cfg(workdir, "two"), arrays, _mirrored())
    return {"replicas": 2,
            "same_start": all(np.array_equal(a, b) for a, b in zip(init_one, init_two)),
            "moved": max(float(np.max(np.abs(a - b))) for a, b in zip(after_two, init_two)),
            "max_difference": max(float(np.max(np.abs(a - b))) for a, b in zip(after_one, after_two)),
            "finite": all(bool(np.isfinite(w).all()) for w in after_two)}


def overflow_vote(workdir: str) -> dict:
    """A step where only replica 1's batch overflows float16 (pixels of 1e5 > 65504), then a clean step.

    Reports each replica's copy of the weights after each step against the start, and the loss scale.
    """
    strategy = _mirrored()
    cfg = _cfg(workdir, "vote")
    clean = data.load_arrays("mnist-sample").x_train[:32].astype(np.float32) / 255.0
    state = train.build_state(cfg, clean.shape[1:], strategy)
    step = train.make_train_step(state, cfg.loss, cfg.batch_size)
    overflowing = np.full_like(clean, 1e5)

    def batches(halves):
        """A distributed dataset whose one global batch is `halves`, one per replica in turn."""
        return strategy.distribute_datasets_from_function(
            lambda ctx: tf.data.Dataset.from_tensor_slices(np.stack(halves)).map(
                lambda b: (data.noise_keys(0, 0, 0, tf.shape(b)[0]), b)))  # noise-free: keys unused

    def on_replicas(dataset):
        return [float(np.max(rows.numpy())) for _, rows in strategy.experimental_local_results(next(iter(dataset)))]

    def per_replica_weights():
        return [[v.numpy() for v in strategy.experimental_local_results(var.value)]
                for var in state.autoencoder.trainable_variables]

    def moved(before, after):
        return [max(float(np.max(np.abs(a[r] - b[r]))) for a, b in zip(after, before)) for r in range(2)]

    start, scale_start = per_replica_weights(), float(state.optimizer.dynamic_scale.numpy())
    overflow = batches([clean, overflowing])
    step(iter(overflow), tf.constant(0.0), tf.constant(1))
    after_overflow, scale_after_overflow = per_replica_weights(), float(state.optimizer.dynamic_scale.numpy())
    step(iter(batches([clean, clean])), tf.constant(0.0), tf.constant(1))
    after_clean = per_replica_weights()
    return {"max_pixel_per_replica": on_replicas(overflow), "scale_start": scale_start,
            "scale_after_overflow": scale_after_overflow,
            "moved_by_overflow_step": moved(start, after_overflow),
            "moved_by_clean_step": moved(after_overflow, after_clean),
            "finite_after": [all(bool(np.isfinite(w[r]).all()) for w in after_clean) for r in range(2)]}


CHECKS = {"float16_step": float16_step, "overflow_vote": overflow_vote}

if __name__ == "__main__":
    check, workdir = sys.argv[1:]
    print(json.dumps(CHECKS[check](workdir)), flush=True)
