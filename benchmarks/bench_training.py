"""Training throughput, side by side in one run (images per second of wall time and of CPU time):

    python -m benchmarks.bench_training            # or: make bench (both groups)
    python -m benchmarks.bench_training --groups precision --rounds 15   # 3-5 min on 2 cores
    python -m benchmarks.bench_training --groups precision --precisions float32 mixed_bfloat16 mixed_float16
    # core: Keras model.fit (noise drawn per step; and the seed blog's, noise drawn once) | aekit
    # loop, 1 device | aekit loop, 2 logical devices | the input pipeline alone, in memory and
    # streaming shards from disk (each must deliver >= 10x what the trainer consumes) | trainer
    # peak RSS on the sample and on 20x the sample (within 15 %)
    # precision: fit and aekit's loop for dense and conv in each precision; loop / fit per row
    # (goal >= 1) and mixed_bfloat16 / float32 (conv goal >= 1.15)

Same data (mnist-sample, noise 0.4), code size, global batch and step count for every row of a
model, and the same work: fresh noise for every batch, drawn in the step (see fit_runner), except in the
seed_blog_fit reference row.
Timings on shared machines are noisy: read the ratios, which are measured in the same run, each
row the median of rounds in which the rows take turns, and on a VM whose host is busy the CPU
column (see Rate).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from training.distribute import configure_logical_devices

configure_logical_devices(2)  # before TensorFlow starts: the 2-device row needs it

import keras  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import tensorflow as tf  # noqa: E402

from training import convert, data, models, precision, train  # noqa: E402
from training.config import PRECISIONS, TrainConfig  # noqa: E402

NOISE = 0.4
PIPELINE_BATCHES = 1000  # ~1 s of the pipeline alone; a trainer epoch of mnist-sample is 31
STEPS_PER_CALL = TrainConfig().steps_per_loop  # batches the trainer pulls per tf.function call
REPEAT = 20  # the large dataset: the 5,000-image sample 20 times over, 100,000 examples
SHARDS = 16
RSS_BOUND = 1.15  # the large dataset's trainer peak RSS may exceed the sample's by at most 15 %
GROUPS = ("core", "precision")
MODELS = ("dense", "conv")
DEFAULT_POLICIES = ("float32", "mixed_bfloat16")
BF16_CONV_GOAL = 1.15  # issue 16: mixed_bfloat16 conv at least 1.15x float32 conv on this CPU


class Rate(NamedTuple):
    """Images per second of wall time, and per second of this process's CPU time (user+sys, every
    thread). On this shared VM the host's load moves the first by tens of percent between rounds
    of the same row; the second moves much less. It is not throughput: a row that keeps fewer
    cores busy spends less CPU per second of wall time, so read both."""
    wall: float
    cpu: float


class Clock:
    """Times a block in wall and process CPU seconds: `with Clock() as clock: ...; clock.rate(n)`."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rate(self, images: int) -> Rate:
        return Rate(images / self.wall, images / self.cpu)


def fit_runner(x: np.ndarray, batch: int, model: str = "dense", policy: str = "float32",
               noise_per_step: bool = True) -> Callable[[int], Rate]:
    """Keras: Functional autoencoder, compile, fit on numpy arrays; under a mixed policy Keras'
    compile wraps the optimizer in a LossScaleOptimizer for float16 itself.

    noise_per_step: fresh noise for every batch, drawn in the model by keras.layers.GaussianNoise
    (then clipped to [0, 1]), the same work aekit's loop does (it draws the noise in its step).
    Without it, the seed blog: noise drawn ONCE before training and the same noisy images fed
    every epoch, which skips that work (and trains a worse denoiser); shown for reference.
    """
    keras.utils.set_random_seed(0)
    with precision.policy(policy):
        # the loop's code size (TrainConfig's default per model: dense 32, conv 128), so both do the same work
        encoder, decoder = models.build_autoencoder(model, x.shape[1:], TrainConfig(model=model).latent_dim)
        autoencoder = models.chain(encoder, decoder)
        if noise_per_step:
            inputs = keras.Input(x.shape[1:])
            noisy = keras.layers.GaussianNoise(NOISE, seed=0)(inputs)
            autoencoder = keras.Model(inputs, autoencoder(keras.ops.clip(noisy, 0.0, 1.0)))
    autoencoder.compile(optimizer="adam", loss="binary_crossentropy")
    clean = x.astype(np.float32) / 255.0
    noisy = clean if noise_per_step else np.clip(
        clean + NOISE * np.random.default_rng(0).normal(size=clean.shape), 0, 1).astype(np.float32)
    autoencoder.fit(noisy, clean, batch_size=batch, epochs=1, shuffle=True, verbose=0)  # warm-up: tracing

    def timed(epochs: int) -> Rate:
        with Clock() as clock:
            autoencoder.fit(noisy, clean, batch_size=batch, epochs=epochs, shuffle=True, verbose=0)
        return clock.rate(epochs * (len(x) // batch) * batch)
    return timed


def loop_runner(x: np.ndarray, batch: int, strategy, workdir: Path, model: str = "dense",
                policy: str = "float32") -> Callable[[int], Rate]:
    """aekit's custom loop (strategy.run), the exact functions `aekit train` uses."""
    cfg = TrainConfig(model=model, batch_size=batch, noise_factor=NOISE, workdir=str(workdir), export=False,
                      precision=policy)
    state = train.build_state(cfg, x.shape[1:], strategy)
    step = train.make_train_step(state, cfg.loss, batch, NOISE)
    steps = len(x) // batch
    vote = tf.constant(0.0)
    seeds = itertools.count()

    def epoch():
        iterator = iter(strategy.distribute_datasets_from_function(
            lambda ctx: data.make_dataset(x, batch, noise_factor=NOISE, seed=next(seeds), input_context=ctx,
                                          noise_in_step=True)))
        for done in range(0, steps, cfg.steps_per_loop):  # the trainer's chunking, without checkpoints
            loss, _ = step(iterator, vote, tf.constant(min(cfg.steps_per_loop, steps - done)))
        float(loss)  # wait for the last step

    epoch()  # warm-up: tracing

    def timed(epochs: int) -> Rate:
        with Clock() as clock:
            for _ in range(epochs):
                epoch()
        return clock.rate(epochs * steps * batch)
    return timed


def pipeline_runner(x: np.ndarray | data.Split, batch: int) -> Callable[[int], Rate]:
    """The tf.data pipeline alone, as the trainer reads it (noise_in_step: the rows and their noise
    keys; the step draws the noise), pulled STEPS_PER_CALL batches per tf.function call as the
    trainer's loop does. Sustained: a fresh stream each round (no batches prefetched while the
    other rows ran) and PIPELINE_BATCHES batches timed, so the prefetch buffer filled during
    warm-up is a small part of them."""
    seeds = itertools.count()

    def timed(epochs: int) -> Rate:
        iterator = iter(data.make_dataset(x, batch, noise_factor=NOISE, seed=next(seeds), noise_in_step=True))

        @tf.function
        def pull(count):
            last = tf.constant(0.0)
            for _ in tf.range(count):
                rows = next(iterator)[1]
                last = tf.cast(tf.reshape(rows, [-1])[0], tf.float32)  # a value of the batch: none is skipped
            return last

        pull(tf.constant(STEPS_PER_CALL)).numpy()  # warm-up: tracing, first files opened
        with Clock() as clock:
            for _ in range(PIPELINE_BATCHES // STEPS_PER_CALL):
                pull(tf.constant(STEPS_PER_CALL)).numpy()
        return clock.rate(PIPELINE_BATCHES * batch)
    return timed


def large_shards(out: Path) -> Path:
    """The sample repeated REPEAT times (80,000 train + 20,000 test), converted to shards on disk."""
    folder = out / f"sample-x{REPEAT}-shards"
    if not (folder / "metadata.json").exists():
        sample = data.load_arrays("mnist-sample")
        npz = out / f"sample-x{REPEAT}.npz"
        np.savez(npz, x_train=np.concatenate([sample.x_train] * REPEAT),
                 y_train=np.concatenate([sample.y_train] * REPEAT),
                 x_test=np.concatenate([sample.x_test] * REPEAT), y_test=np.concatenate([sample.y_test] * REPEAT))
        convert.convert(f"npz:{npz}", str(folder), shards=SHARDS)
        npz.unlink()
    return folder


def trainer_peak_rss_mb(dataset: str, batch: int, workdir: Path) -> float:
    """Peak resident memory of one fresh `aekit train` process (1 epoch, evaluation included)."""
    shutil.rmtree(workdir, ignore_errors=True)  # a checkpoint left there would make it train nothing
    argv = [sys.executable, "-m", "aekit_cli", "train", "--dataset", dataset, "--model", "dense", "--epochs", "1",
            "--batch-size", str(batch), "--noise-factor", str(NOISE), "--no-export", "--workdir", str(workdir)]
    # Sampled, not wait4's ru_maxrss: a forked child's maxrss starts at its parent's (this ~1 GB
    # benchmark) on Linux, so both datasets read the same.
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    if proc.wait() != 0:
        raise RuntimeError(f"aekit train on {dataset} failed (exit {proc.returncode})")
    return peak / 2**20


def core_runners(x: np.ndarray, batch: int, epochs: int, out: Path) -> dict[str, tuple[Callable[[int], Rate], int]]:
    """The dense float32 rows: fit, the loop on 1 and 2 devices, the input pipeline alone."""
    shards = large_shards(out)
    mirrored = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")[:2]])
    runners = {
        "seed_blog_fit": fit_runner(x, batch, noise_per_step=False),
        "fit_noise_per_step": fit_runner(x, batch),
        "aekit_loop_1_device": loop_runner(x, batch, tf.distribute.get_strategy(), out / "w1"),
        "aekit_loop_2_logical_devices": loop_runner(x, batch, mirrored, out / "w2"),
        "input_pipeline_alone": pipeline_runner(x, batch),
        "input_pipeline_from_shards": pipeline_runner(data.load_source(f"tfrecord:{shards}").train, batch),
    }
    return {name: (timed, epochs) for name, timed in runners.items()}


def precision_runners(x: np.ndarray, batch: int, epochs: int, out: Path,
                      policies: list[str]) -> dict[str, tuple[Callable[[int], Rate], int]]:
    """fit and the loop for each model and precision. A conv epoch takes ~3 s here, so conv rows
    time one epoch per round where dense rows time `epochs`."""
    runners = {}
    for model, (policy, kind) in itertools.product(MODELS, itertools.product(policies, ("fit", "loop"))):
        name = f"{kind}_{model}_{policy}"
        timed = (fit_runner(x, batch, model, policy) if kind == "fit" else
                 loop_runner(x, batch, tf.distribute.get_strategy(), out / f"w-{model}-{policy}", model, policy))
        runners[name] = (timed, epochs if model == "dense" else 1)
    return runners


def precision_ratios(rows: dict[str, float], policies: list[str]) -> dict[str, float]:
    """loop / fit for every model and precision, and each mixed precision / float32 per model and path."""
    ratios = {}
    for model, policy in itertools.product(MODELS, policies):
        ratios[f"loop_vs_fit_{model}_{policy}"] = rows[f"loop_{model}_{policy}"] / rows[f"fit_{model}_{policy}"]
        if policy != "float32" and "float32" in policies:
            for kind in ("loop", "fit"):
                ratios[f"{kind}_{model}_{policy}_vs_float32"] = (rows[f"{kind}_{model}_{policy}"]
                                                                 / rows[f"{kind}_{model}_float32"])
    return ratios


def measure_in_turns(runners: dict[str, tuple[Callable[[int], Rate], int]], rounds: int) -> dict[str, list[Rate]]:
    # Each row times ~1-3 s; one after the other they caught different moments of this machine's
    # drifting speed (loop / fit read 0.70 in one run, 1.31 in the next). So the rows take turns,
    # `rounds` times, and each reports its median.
    samples = {name: [] for name in runners}
    for _ in range(rounds):
        for name, (timed, epochs) in runners.items():
            samples[name].append(timed(epochs))
    return samples


def run(epochs: int = 3, batch: int = 128, output_dir: str = "bench-output", rounds: int = 5,
        groups: tuple[str, ...] = GROUPS, policies: tuple[str, ...] = DEFAULT_POLICIES) -> dict:
    x = data.load_arrays("mnist-sample").x_train
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    policies = list(policies)
    runners = {}
    if "core" in groups:
        runners.update(core_runners(x, batch, epochs, out))
    if "precision" in groups:
        runners.update(precision_runners(x, batch, epochs, out, policies))
    samples = measure_in_turns(runners, rounds)
    rows = {name: float(np.median([r.wall for r in values])) for name, values in samples.items()}
    cpu_rows = {name: float(np.median([r.cpu for r in values])) for name, values in samples.items()}
    report = {"images_per_second": rows, "images_per_cpu_second": cpu_rows,
              "runs": {name: [r.wall for r in values] for name, values in samples.items()},
              "runs_cpu": {name: [r.cpu for r in values] for name, values in samples.items()},
              "global_batch": batch, "epochs_timed": epochs, "rounds": rounds, "groups": list(groups)}
    print(f"training throughput, same data and global batch per row; median of {rounds} rounds, images per "
          "second of wall time | of the process's CPU time:")
    for name, value in rows.items():
        print(f"  {name:32s} {value:8.0f} | {cpu_rows[name]:6.0f}   "
              f"(wall runs: {', '.join(f'{r.wall:.0f}' for r in samples[name])})")
    if "precision" in groups:
        for key, table, unit in (("precision", rows, "wall"), ("precision_cpu", cpu_rows, "CPU")):
            report[key] = precision_ratios(table, policies)
            print(f"  {unit}: " + "   ".join(f"{k} {v:.2f}" for k, v in report[key].items()))
            if "mixed_bfloat16" in policies and "float32" in policies:
                print(f"  {unit}: conv mixed_bfloat16 / float32 loop "
                      f"{report[key]['loop_conv_mixed_bfloat16_vs_float32']:.2f} (goal >= {BF16_CONV_GOAL}), "
                      f"loop / fit >= 1 in every row: "
                      f"{all(v >= 1 for k, v in report[key].items() if k.startswith('loop_vs_fit'))}")
    if "core" in groups:
        report.update(core_report(rows, batch, out))
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def core_report(rows: dict[str, float], batch: int, out: Path) -> dict:
    report = {"loop_vs_fit": rows["aekit_loop_1_device"] / rows["fit_noise_per_step"],
              "loop_vs_seed_blog_fit": rows["aekit_loop_1_device"] / rows["seed_blog_fit"],
              "pipeline_vs_trainer": rows["input_pipeline_alone"] / rows["aekit_loop_1_device"],
              "two_devices_vs_one": rows["aekit_loop_2_logical_devices"] / rows["aekit_loop_1_device"],
              "shards_pipeline_vs_trainer": rows["input_pipeline_from_shards"] / rows["aekit_loop_1_device"],
              "note": "2 logical devices share the same 2 CPU cores: this row measures MirroredStrategy's "
                      "overhead, not a speed-up"}
    print(f"  loop / fit {report['loop_vs_fit']:.2f} (goal >= 1; seed blog's fit, noise drawn once: "
          f"{report['loop_vs_seed_blog_fit']:.2f})   pipeline / trainer "
          f"{report['pipeline_vs_trainer']:.1f} (goal >= 10)   shards pipeline / trainer "
          f"{report['shards_pipeline_vs_trainer']:.1f} (goal >= 10)   2 devices / 1 {report['two_devices_vs_one']:.2f}")
    # Memory, measured once each (one process per dataset, run one after the other).
    shards = large_shards(out)
    rss = {"mnist_sample_in_memory": trainer_peak_rss_mb("mnist-sample", batch, out / "rss-sample"),
           f"sample_x{REPEAT}_shards": trainer_peak_rss_mb(f"tfrecord:{shards}", batch, out / "rss-large")}
    report["trainer_peak_rss_mb"] = rss
    report["large_vs_sample_rss"] = rss[f"sample_x{REPEAT}_shards"] / rss["mnist_sample_in_memory"]
    print(f"trainer peak RSS: mnist-sample (5,000 in memory) {rss['mnist_sample_in_memory']:.0f} MB, "
          f"{REPEAT}x the sample (100,000, streamed from {SHARDS} shards) {rss[f'sample_x{REPEAT}_shards']:.0f} MB: "
          f"ratio {report['large_vs_sample_rss']:.3f} (goal <= {RSS_BOUND})")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--output-dir", default="bench-output")
    parser.add_argument("--rounds", type=int, default=5, help="times each row is measured, in turns")
    parser.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS),
                        help="row groups: core (dense float32, 1 and 2 devices, input pipeline, memory), "
                             "precision (fit and loop per model and precision)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(DEFAULT_POLICIES),
                        help="precisions of the precision group (mixed_float16 conv is ~4x slower than "
                             "float32 on a CPU without float16 arithmetic, so it is left out by default)")
    args = parser.parse_args()
    for name in ("epochs", "batch_size", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    run(args.epochs, args.batch_size, args.output_dir, args.rounds, tuple(args.groups), tuple(args.precisions))
