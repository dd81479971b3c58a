"""Training throughput, side by side in one run (images/s):

    python -m benchmarks.bench_training            # or: make bench
    # seed blog's model.fit on numpy arrays | aekit loop, 1 device | aekit loop, 2 logical devices
    # | the input pipeline alone (must deliver >= 10x what the trainer consumes)

Same dense model, data (mnist-sample, noise 0.4), global batch and step count for every row.
Timings on shared machines are noisy: read the ratios, which are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from training.distribute import configure_logical_devices

configure_logical_devices(2)  # before TensorFlow starts: the 2-device row needs it

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from training import data, models, train  # noqa: E402
from training.config import TrainConfig  # noqa: E402

NOISE = 0.4


def fit_images_per_second(x: np.ndarray, batch: int, epochs: int) -> float:
    """The seed blog: Functional dense autoencoder, compile, fit(noisy, clean) on numpy arrays."""
    keras.utils.set_random_seed(0)
    encoder, decoder = models.build_autoencoder("dense", x.shape[1:], 32)
    autoencoder = models.chain(encoder, decoder)
    autoencoder.compile(optimizer="adam", loss="binary_crossentropy")
    clean = x.astype(np.float32) / 255.0
    noisy = np.clip(clean + NOISE * np.random.default_rng(0).normal(size=clean.shape), 0, 1).astype(np.float32)
    autoencoder.fit(noisy, clean, batch_size=batch, epochs=1, shuffle=True, verbose=0)  # warm-up: tracing
    started = time.perf_counter()
    autoencoder.fit(noisy, clean, batch_size=batch, epochs=epochs, shuffle=True, verbose=0)
    return epochs * (len(x) // batch) * batch / (time.perf_counter() - started)


def loop_images_per_second(x: np.ndarray, batch: int, epochs: int, strategy, workdir: Path) -> float:
    """aekit's custom loop (strategy.run), the exact functions `aekit train` uses."""
    cfg = TrainConfig(model="dense", batch_size=batch, noise_factor=NOISE, workdir=str(workdir), export=False)
    state = train.build_state(cfg, x.shape[1:], strategy)
    step = train.make_train_step(state, cfg.loss, batch)
    steps = len(x) // batch
    vote = tf.constant(0.0)

    def epoch(seed):
        iterator = iter(strategy.distribute_datasets_from_function(
            lambda ctx: data.make_dataset(x, batch, noise_factor=NOISE, seed=seed, input_context=ctx)))
        for done in range(0, steps, cfg.steps_per_loop):  # the trainer's chunking, without checkpoints
            loss, _ = step(iterator, vote, tf.constant(min(cfg.steps_per_loop, steps - done)))
        float(loss)  # wait for the last step

    epoch(0)  # warm-up: tracing
    started = time.perf_counter()
    for e in range(epochs):
        epoch(e + 1)
    return epochs * steps * batch / (time.perf_counter() - started)


def pipeline_images_per_second(x: np.ndarray, batch: int, epochs: int) -> float:
    """The tf.data pipeline alone (gather, scale, Gaussian noise, prefetch), sustained over the
    same number of batches the trainer rows consume; one repeating training stream."""
    steps = epochs * (len(x) // batch)
    dataset = data.make_dataset(x, batch, noise_factor=NOISE, seed=0)
    iterator = iter(dataset)
    for _ in range(20):  # warm-up
        next(iterator)
    started = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * batch / (time.perf_counter() - started)


def run(epochs: int = 3, batch: int = 128, output_dir: str = "bench-output") -> dict:
    x = data.load_arrays("mnist-sample").x_train
    out = Path(output_dir)
    mirrored = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")[:2]])
    rows = {
        "seed_blog_fit": fit_images_per_second(x, batch, epochs),
        "aekit_loop_1_device": loop_images_per_second(x, batch, epochs, tf.distribute.get_strategy(), out / "w1"),
        "aekit_loop_2_logical_devices": loop_images_per_second(x, batch, epochs, mirrored, out / "w2"),
        "input_pipeline_alone": pipeline_images_per_second(x, batch, epochs),
    }
    report = {"images_per_second": rows, "global_batch": batch, "epochs_timed": epochs,
              "loop_vs_fit": rows["aekit_loop_1_device"] / rows["seed_blog_fit"],
              "pipeline_vs_trainer": rows["input_pipeline_alone"] / rows["aekit_loop_1_device"],
              "two_devices_vs_one": rows["aekit_loop_2_logical_devices"] / rows["aekit_loop_1_device"],
              "note": "2 logical devices share the same 2 CPU cores: this row measures MirroredStrategy's "
                      "overhead, not a speed-up"}
    print("training throughput (images/s), same model, data and global batch:")
    for name, value in rows.items():
        print(f"  {name:32s} {value:10.0f}")
    print(f"  loop / fit {report['loop_vs_fit']:.2f} (goal >= 1)   pipeline / trainer "
          f"{report['pipeline_vs_trainer']:.1f} (goal >= 10)   2 devices / 1 {report['two_devices_vs_one']:.2f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--output-dir", default="bench-output")
    args = parser.parse_args()
    run(args.epochs, args.batch_size, args.output_dir)
