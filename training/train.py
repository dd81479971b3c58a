"""The training job: one custom loop (`strategy.run`) for one device, many GPUs and many workers.

    aekit train --dataset mnist-sample --model conv --epochs 10 --num-logical-devices 2
    # -> runs/ae/{checkpoints/, tensorboard/, config.json, history.json} and models/autoencoder/N

Keras 3 `fit` cannot run under MultiWorkerMirroredStrategy (keras-team/keras#20585), so this loop
is the only code path. The loss of each replica is divided by the GLOBAL batch size, so summing
gradients over replicas gives the same update as one device on the whole batch.
Rerunning with the same workdir resumes from the last checkpoint at the exact step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from storage import paths
from training import data, distribute, evaluate, models, observe, precision
from training.config import ConfigError, TrainConfig


class Preempted(RuntimeError):
    """Raised after a SIGTERM once every worker has saved a checkpoint; rerun to resume."""

    exit_code = 143  # as a process ended by SIGTERM


class WorkerLost(RuntimeError):
    """A collective failed because a peer died or became unreachable; rerun the job to resume."""

    exit_code = 1
    # TensorFlow's threads may still be inside the aborted collectives or its connect call: the
    # CLI leaves through os._exit right after the line rather than wait in their teardown. (The
    # SIGSEGV of issue 19 came earlier, inside the aborted RingReduce: see distribute.collective_backstop_seconds.)
    abandon_process = True


class CheckpointUnusable(RuntimeError):
    """Checkpoints exist but none restores: training from scratch would silently discard them."""

    exit_code = 2


class ResumeMismatch(RuntimeError):
    """The workers restored different steps: they do not share one work directory."""

    exit_code = 2


# What a collective raises when a peer is gone: the step cannot finish on this worker either.
PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                 tf.errors.AbortedError)


# What restoring a damaged checkpoint raises: a truncated data file gives IndexError ("Read less
# bytes than requested", py_checkpoint_reader.py), garbage DataLossError, a missing one NotFoundError.
UNRESTORABLE = (tf.errors.OpError, ValueError, AssertionError, IndexError)


@dataclasses.dataclass
class TrainState:
    """Everything the loop and the exporter share: strategy, models, optimizer, checkpointing."""
    strategy: tf.distribute.Strategy
    encoder: keras.Model
    decoder: keras.Model
    autoencoder: keras.Model
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable
    epoch_loss_sum: tf.Variable  # sum of the current epoch's step losses so far, so a resumed epoch's mean is whole
    checkpoint: tf.train.Checkpoint
    manager: tf.train.CheckpointManager
    is_chief: bool


def per_example_loss(clean: tf.Tensor, reconstruction: tf.Tensor, kind: str) -> tf.Tensor:
    """Mean over all but the batch axis of BCE or squared error: shape [batch]."""
    if kind == "bce":
        p = tf.clip_by_value(reconstruction, 1e-7, 1.0 - 1e-7)
        elementwise = -(clean * tf.math.log(p) + (1.0 - clean) * tf.math.log(1.0 - p))
        return tf.reduce_mean(tf.reshape(elementwise, [tf.shape(clean)[0], -1]), axis=1)
    return models.reconstruction_error(clean, reconstruction)


def build_state(cfg: TrainConfig, input_shape, strategy: tf.distribute.Strategy,
                steps_per_epoch: int = 0) -> TrainState:
    """Models and optimizer under the strategy's scope, restored from the newest checkpoint that restores."""
    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope(), precision.policy(cfg.precision):
        encoder, decoder = models.build_autoencoder(cfg.model, input_shape, cfg.latent_dim, **cfg.model_options())
        autoencoder = models.chain(encoder, decoder, cfg.quantization_noise, cfg.seed)
        optimizer = precision.make_optimizer(cfg.precision, learning_rate(cfg, steps_per_epoch))
        optimizer.build(autoencoder.trainable_variables)  # slots exist before restore
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        epoch_loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="epoch_loss_sum")
        # Saved so that a restarted worker can tell a finished job without loading the data.
        epoch_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="steps_per_epoch")
    parts = dict(encoder=encoder, decoder=decoder, step=step, epoch_loss_sum=epoch_loss_sum,
                 steps_per_epoch=epoch_steps)
    checkpoint = tf.train.Checkpoint(optimizer=optimizer, **parts)
    chief = distribute.is_chief(strategy)
    manager = tf.train.CheckpointManager(checkpoint, _checkpoint_dir(cfg.workdir, strategy, chief),
                                         max_to_keep=3)
    # Restored through the optimizer as each checkpoint saved it: --precision may change on resume.
    restore_newest(lambda prefix: tf.train.Checkpoint(optimizer=precision.as_saved_in(optimizer, prefix), **parts),
                   paths.join(cfg.workdir, "checkpoints"), distribute.task_name(strategy))
    if steps_per_epoch:
        epoch_steps.assign(steps_per_epoch)
    return TrainState(strategy, encoder, decoder, autoencoder, optimizer, step, epoch_loss_sum, checkpoint,
                      manager, chief)


def learning_rate(cfg: TrainConfig, steps_per_epoch: int):
    """cfg.learning_rate, or a cosine decay of it to 0 over every epoch's steps (the optimizer's
    iteration count is checkpointed, so a resumed run continues the schedule where it stopped).
    A schedule even without `steps_per_epoch` (export, which does not train): a float learning
    rate is a checkpointed variable and a schedule is not, and both must restore the same checkpoint."""
    if cfg.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(cfg.learning_rate, cfg.epochs * max(steps_per_epoch, 1))
    return cfg.learning_rate


def _basename(prefix: str) -> str:
    return prefix.rstrip("/").rsplit("/", 1)[-1]


def checkpoint_paths(directory: str) -> list[str]:
    """Checkpoint prefixes in `directory`, newest first, found from the files themselves.

    The `checkpoint` state file is not trusted: garbage in it, or a newest checkpoint deleted
    by hand, must not make a run start over.
    """
    numbered = []
    for index_file in tf.io.gfile.glob(f"{directory}/ckpt-*.index"):
        match = re.search(r"ckpt-(\d+)\.index$", index_file)
        if match:
            numbered.append((int(match.group(1)), index_file[: -len(".index")]))
    return [prefix for _, prefix in sorted(numbered, reverse=True)]


def restore_newest(checkpoint_for: Callable[[str], tf.train.Checkpoint], directory: str,
                   who: str = "local") -> str | None:
    """Restores the newest checkpoint that restores and says why when it is not the newest.

    `checkpoint_for(prefix)` gives the objects to restore that checkpoint into.

    Returns its prefix, or None when `directory` holds none (a fresh run). Raises
    CheckpointUnusable when there are checkpoints but none restores.
    """
    failed = []
    for prefix in checkpoint_paths(directory):
        try:
            status = checkpoint_for(prefix).restore(prefix)
            status.assert_existing_objects_matched()
            status.expect_partial()  # values this run has no object for (a dropped loss scale) are left
        except UNRESTORABLE as e:
            reason = e.message if isinstance(e, tf.errors.OpError) else str(e)
            failed.append(f"{_basename(prefix)} ({type(e).__name__}: {reason.splitlines()[0][:120]})")
            continue
        if failed:
            print(f"{who}: restored {_basename(prefix)}, the newest checkpoint that restores; "
                  f"skipped {'; '.join(failed)}", flush=True)
        return prefix
    if failed:
        raise CheckpointUnusable(f"no checkpoint in {directory} restores: {'; '.join(failed)}; "
                                 "restore them from a backup, or move the folder away to train from scratch")
    return None


def completed_step(cfg: TrainConfig) -> int | None:
    """The step of the newest checkpoint when it already holds cfg.epochs of training, else None.

    Reads the files only (no model, no data, no TensorFlow context), so a worker of a finished
    job knows it before it would wait for peers that already exited.
    """
    for prefix in checkpoint_paths(paths.join(cfg.workdir, "checkpoints"))[:1]:
        try:
            reader = tf.train.load_checkpoint(prefix)
            step = int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))
            per_epoch = int(reader.get_tensor("steps_per_epoch/.ATTRIBUTES/VARIABLE_VALUE"))
        except UNRESTORABLE:
            return None  # unreadable or written before steps_per_epoch was saved: build_state decides
        if per_epoch and step >= cfg.epochs * per_epoch:
            return step
    return None


def _checkpoint_dir(workdir: str, strategy: tf.distribute.Strategy, chief: bool) -> str:
    # Every worker must take part in a save (it may all-reduce), but only the chief's copy is
    # kept: the others write to a scratch folder that save_checkpoint deletes.
    if chief:
        return paths.join(workdir, "checkpoints")
    return paths.join(workdir, f".scratch-{distribute.task_name(strategy)}")


def save_checkpoint(state: TrainState) -> None:
    state.manager.save(checkpoint_number=int(state.step.numpy()))
    if not state.is_chief:
        paths.remove_tree(state.manager.directory)


def make_train_step(state: TrainState, loss_kind: str, global_batch: int, noise_factor: float = 0.0,
                    max_shift: int = 0, shift_input_only: bool = False):
    """A tf.function running `num_steps` synchronous steps on every replica.

    It reads batches of data.make_dataset(..., noise_in_step=True) and draws their noise on the
    replica's device. Returns (mean loss, stop votes). Several steps per call keep Python off the
    hot path (like Keras' steps_per_execution); the loop stays inside one graph on every strategy.
    """
    strategy, autoencoder, optimizer = state.strategy, state.autoencoder, state.optimizer
    scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def replica_step(batch):
        noisy, clean = data.add_noise(*batch, noise_factor, max_shift, shift_input_only)
        with tf.GradientTape() as tape:
            reconstruction = autoencoder(noisy, training=True)
            loss = tf.nn.compute_average_loss(per_example_loss(clean, tf.cast(reconstruction, tf.float32), loss_kind),
                                              global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss)  # LossScaleOptimizer (float16) scales; Adam returns it as is
        grads = tape.gradient(scaled, autoencoder.trainable_variables)
        if scaling:
            grads = precision.agree_on_finite(grads)  # apply_gradients unscales and skips overflowed steps
        optimizer.apply_gradients(zip(grads, autoencoder.trainable_variables))
        return loss

    @tf.function
    def train_steps(iterator, stop_vote, num_steps):
        total = tf.constant(0.0)
        for _ in tf.range(num_steps):
            loss = strategy.run(replica_step, args=(next(iterator),))
            total += strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
            state.step.assign_add(1)
        # SIGTERM vote: all-reduced, so a worker told to stop stops them all at the same step and
        # their checkpoints agree. tf.identity makes it a per-replica value that can be reduced.
        votes = strategy.run(tf.identity, args=(stop_vote,))
        return total / tf.cast(num_steps, tf.float32), strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)

    return train_steps


class StopSignal:
    """Turns SIGTERM (preemption, pod eviction) into a flag the loop checks at each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            # `aekit train` holds SIGTERM blocked from its start (see distribute.wait_for_workers):
            # one that arrived meanwhile is delivered now, to this handler.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(cfg: TrainConfig, source: data.Source | data.Arrays | None = None,
                       strategy: tf.distribute.Strategy | None = None,
                       stop: StopSignal | None = None) -> tuple[TrainState, list[dict]]:
    """Trains to cfg.epochs (resuming from cfg.workdir), evaluating after each epoch.

    Raises Preempted, after saving a checkpoint, when SIGTERM arrives (or `stop` says so), and
    WorkerLost when a peer is lost at any stage, from the first broadcast of the weights on.
    """
    strategy = strategy or distribute.make_strategy(cfg.num_logical_devices, cfg.collective,
                                                    cfg.collective_timeout_seconds, cfg.rendezvous_timeout_seconds)
    source = _as_source(source, cfg)
    train_split = data.limit(source.train, cfg.max_examples)
    steps = data.steps_per_epoch(train_split.count, cfg.batch_size)
    check_batch_fits(cfg.batch_size, strategy)  # before anything is written to the workdir
    precision.warn_if_slow(cfg.precision)
    with contextlib.nullcontext(stop) if stop else StopSignal() as stop, _peers_required(strategy, cfg.workdir):
        state = build_state(cfg, source.input_shape, strategy, steps)
        agree_on_start(state, stop)
        return state, _train_epochs(cfg, state, source, train_split, steps, stop)


def check_batch_fits(batch_size: int, strategy: tf.distribute.Strategy) -> None:
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ConfigError(f"--batch-size {batch_size} does not split evenly over {replicas} replicas; "
                          f"use a multiple of {replicas}, e.g. {max(replicas, batch_size - batch_size % replicas)}")


@contextlib.contextmanager
def _peers_required(strategy: tf.distribute.Strategy, workdir: str):
    """Turns a lost peer, wherever it shows (broadcast, all-reduce, save), into one WorkerLost line."""
    try:
        yield
    except PEER_FAILURES as e:
        last = checkpoint_paths(paths.join(workdir, "checkpoints"))[:1] or ["none yet"]
        raise WorkerLost(f"{distribute.task_name(strategy)}: a peer worker failed or is unreachable "
                         f"({type(e).__name__}: {e.message.splitlines()[0][:200]}); "
                         f"restart the job to resume from the last checkpoint ({last[0]})") from None


def agree_on_start(state: TrainState, stop) -> None:
    """Every worker's restored step, and any SIGTERM so far, compared through one all-reduce.

    Workers that restored different steps would desynchronise silently (a work directory per
    pod); they refuse instead, all of them, in the same words.
    """
    workers = distribute.worker_ids(state.strategy)
    mine = int(state.step.numpy())
    reports = np.zeros(len(workers) + 1)
    reports[workers.index(distribute.task_name(state.strategy))] = mine
    reports[-1] = 1.0 if stop.requested else 0.0
    if len(workers) > 1:
        reports = distribute.sum_over_workers(state.strategy, reports).numpy()
    steps = dict(zip(workers, reports[:-1].astype(int)))
    if len(set(steps.values())) > 1:
        said = ", ".join(f"{w} at step {s}" for w, s in steps.items())
        raise ResumeMismatch(f"workers restored different checkpoints ({said}): every worker must see the same "
                             "--workdir (a bucket path or one volume mounted by every pod), not a folder of its own")
    if reports[-1] > 0:
        raise Preempted(f"stopped by SIGTERM before training resumed at step {mine}; nothing new to save")
    role = "chief" if state.is_chief else "worker"
    print(f"{distribute.task_name(state.strategy)} ({role}): resuming at step {mine}", flush=True)


def _train_epochs(cfg: TrainConfig, state: TrainState, source: data.Source, train_split: data.Split,
                  steps: int, stop) -> list[dict]:
    strategy = state.strategy
    if state.is_chief:
        cfg.save(cfg.workdir)
    if cfg.augment_shift and len(source.input_shape) != 3:
        raise ConfigError(f"--augment-shift moves images; this data has shape {tuple(source.input_shape)}")
    train_step = make_train_step(state, cfg.loss, cfg.batch_size, cfg.noise_factor, cfg.augment_shift,
                                 cfg.shift_input_only)
    # Records past the restored step came from a checkpoint that did not restore: they are redone.
    history = [h for h in _read_history(cfg.workdir) if h["step"] <= int(state.step.numpy())]
    logdir = paths.join(cfg.workdir, "tensorboard")
    writer = tf.summary.create_file_writer(logdir) if state.is_chief else tf.summary.create_noop_writer()
    profiler = observe.Profiler(cfg.profile_range, logdir, state.is_chief)
    _log(state, f"training {cfg.model} on {cfg.dataset} in {cfg.precision}: {train_split.count} examples, "
                f"{steps} steps/epoch, {strategy.num_replicas_in_sync} replica(s)")
    held_out = observe.held_out_examples(source, observe.PROJECTOR_EXAMPLES) if state.is_chief else None
    with writer.as_default(), contextlib.ExitStack() as cleanup:
        cleanup.callback(profiler.stop)  # a run that ends or fails inside the range still writes its trace
        if state.is_chief:
            observe.write_hparams(cfg)
        while int(state.step.numpy()) < cfg.epochs * steps:
            epoch = int(state.step.numpy()) // steps
            loss, stopped = _run_epoch(cfg, state, train_step, train_split, epoch, steps, stop, profiler)
            metrics = _held_out_metrics(cfg, state, source.test)
            record = {"epoch": epoch + 1, "step": int(state.step.numpy()), "loss": loss, **metrics}
            history.append(record)
            _write_epoch(state, cfg.workdir, record, history)
            if state.is_chief:
                observe.write_images(state.autoencoder, held_out[0][:observe.IMAGES], cfg.noise_factor, record["step"])
            if stopped and int(state.step.numpy()) < cfg.epochs * steps:
                raise Preempted(f"stopped by SIGTERM at step {record['step']}; checkpoint saved, rerun to resume")
        if state.is_chief:
            observe.write_projector(state.encoder, *held_out, logdir)
    return history


def _as_source(source: data.Source | data.Arrays | None, cfg: TrainConfig) -> data.Source:
    if isinstance(source, data.Arrays):
        return source.source(cfg.dataset)
    return source or data.load_source(cfg.dataset, cfg.data_dir, cfg.download)


def _held_out_metrics(cfg: TrainConfig, state: TrainState, test: data.Split) -> dict:
    """Each worker scores its own part of the test split; the sums are all-reduced, so every
    worker gets the whole split's metrics for 1/N of the work."""
    part = distribute.worker_part(state.strategy)
    sums = evaluate.reconstruction_sums(lambda x: state.autoencoder(x, training=False), test,
                                        cfg.noise_factor, part)
    return evaluate.metrics_from_sums(distribute.sum_over_workers(state.strategy, sums), cfg.noise_factor)


def _run_epoch(cfg, state: TrainState, train_steps, train_split: data.Split, epoch: int, steps: int,
               stop, profiler: observe.Profiler) -> tuple[float, bool]:
    done = int(state.step.numpy()) - epoch * steps  # > 0 when resuming mid-epoch
    dataset = state.strategy.distribute_datasets_from_function(
        lambda ctx: data.make_dataset(train_split, cfg.batch_size, noise_factor=cfg.noise_factor,
                                      seed=cfg.seed + epoch, input_context=ctx, skip_batches=done,
                                      input_groups=cfg.input_groups, noise_in_step=True))
    iterator = iter(dataset)
    if done == 0:
        state.epoch_loss_sum.assign(0.0)
    bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
               disable=not (sys.stderr.isatty() and state.is_chief), leave=False)
    while done < steps:
        step = int(state.step.numpy())
        # Calls end on checkpoint steps, so checkpoints land exactly every checkpoint_every_steps.
        # They also end where a --profile-steps range starts and ends, so the trace holds exactly it.
        chunk = min(cfg.steps_per_loop, steps - done, cfg.checkpoint_every_steps - step % cfg.checkpoint_every_steps,
                    *(b - step for b in profiler.boundaries() if b > step))
        profiler.before(step)
        started = time.perf_counter()
        loss, votes = train_steps(iterator, tf.constant(1.0 if stop.requested else 0.0), tf.constant(chunk))
        loss = float(loss)  # waits for the call: the time below is the steps', not their dispatch
        images_per_second = chunk * cfg.batch_size / (time.perf_counter() - started)
        done, step = done + chunk, step + chunk
        profiler.after(step)
        state.epoch_loss_sum.assign_add(loss * chunk)  # checkpointed with the step: a resume keeps it
        _write_throughput(state, images_per_second, step)
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_second:.0f}",
                        per_replica=f"{images_per_second / state.strategy.num_replicas_in_sync:.0f}")
        bar.update(chunk)
        stopped = float(votes) > 0  # all-reduced: every worker sees the same answer
        if stopped or step % cfg.checkpoint_every_steps == 0 or done == steps:
            save_checkpoint(state)
        if stopped and done < steps:
            raise Preempted(f"stopped by SIGTERM at step {step}; checkpoint saved, rerun to resume")
    bar.close()
    # Stopped on the epoch's last step: the caller records the epoch first, then stops.
    return float(state.epoch_loss_sum.numpy()) / steps, stopped


def _write_throughput(state: TrainState, images_per_second: float, step: int) -> None:
    """Images/s of the last call (global, and per replica) as TensorBoard scalars at its last step."""
    tf.summary.scalar("images_per_second", images_per_second, step=step)
    tf.summary.scalar("images_per_second_per_replica", images_per_second / state.strategy.num_replicas_in_sync,
                      step=step)


def _write_epoch(state: TrainState, workdir: str, record: dict, history: list[dict]) -> None:
    parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()]
    _log(state, "  ".join(parts))
    if not state.is_chief:
        return
    for key, value in record.items():
        if isinstance(value, float):
            tf.summary.scalar(key, value, step=record["step"])
    paths.write_text(paths.join(workdir, "history.json"), json.dumps(history, indent=1) + "\n")


def _read_history(workdir: str) -> list[dict]:
    path = paths.join(workdir, "history.json")
    return json.loads(paths.read_text(path)) if paths.exists(path) else []


def _log(state: TrainState, message: str) -> None:
    if state.is_chief:
        print(message, flush=True)
