"""TensorBoard views of a run, written by the chief into WORKDIR/tensorboard:

    tensorboard --logdir runs/ae/tensorboard
    # Scalars: loss, mse, psnr_db, images_per_second(_per_replica)   HParams: the run's TrainConfig
    # Images: inputs, noisy_inputs, reconstructions per epoch   Projector: held-out codes by label
    # Profile: the --profile-steps trace

Every file goes through storage.paths / tf.io.gfile, so a gs:// workdir works the same.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorboard.plugins import projector
from tensorboard.plugins.hparams import api as hp

from storage import paths
from training import data
from training.config import TrainConfig

IMAGES = 8  # held-out examples shown per epoch
PROJECTOR_EXAMPLES = 1000  # held-out codes in the projector: enough to see the classes cluster
PROJECTOR_DIR = "projector"  # under the TensorBoard log dir: the embedding checkpoint and labels
EMBEDDING_TENSOR = "embedding/.ATTRIBUTES/VARIABLE_VALUE"  # the variable's name in a tf.train.Checkpoint


def write_hparams(cfg: TrainConfig) -> None:
    """The run's settings in the HParams dashboard (scalars and lists of them as text)."""
    values = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
              for k, v in dataclasses.asdict(cfg).items()}
    hp.hparams(values, trial_id=cfg.workdir)


def held_out_examples(source: data.Source, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` test examples in [0, 1] and their labels (read in file order when streamed)."""
    arrays = data.to_arrays(data.Source(source.name, source.input_shape, data.limit(source.train, 1), source.test),
                            count)
    return data.scale_to_unit(arrays.x_test[:count]).numpy(), np.asarray(arrays.y_test[:count])


def write_images(autoencoder: keras.Model, clean: np.ndarray, noise_factor: float, step: int) -> None:
    """Inputs, noisy inputs (the same noise every epoch) and reconstructions; images only (H, W, C)."""
    if clean.ndim != 4 or clean.shape[-1] not in (1, 3, 4):
        return  # vectors: nothing to look at
    noise = noise_factor * data.gaussian_noise(tf.shape(clean), tf.constant([7, 7], tf.int64))
    noisy = tf.clip_by_value(clean + noise, 0.0, 1.0)
    tf.summary.image("inputs", clean, step=step, max_outputs=IMAGES)
    if noise_factor > 0:
        tf.summary.image("noisy_inputs", noisy, step=step, max_outputs=IMAGES)
    reconstruction = tf.cast(autoencoder(noisy, training=False), tf.float32)
    tf.summary.image("reconstructions", reconstruction, step=step, max_outputs=IMAGES)


def write_projector(encoder: keras.Model, images: np.ndarray, labels: np.ndarray, logdir: str) -> str:
    """Latent codes of `images` as a projector embedding with `labels` as metadata; returns its folder."""
    folder = paths.makedirs(paths.join(logdir, PROJECTOR_DIR))
    codes = tf.cast(encoder(images, training=False), tf.float32)
    checkpoint = tf.train.Checkpoint(embedding=tf.Variable(codes, trainable=False))
    checkpoint.write(paths.join(folder, "embedding.ckpt"))
    paths.write_text(paths.join(folder, "metadata.tsv"), "".join(f"{int(y)}\n" for y in labels))
    config = projector.ProjectorConfig()
    config.model_checkpoint_path = paths.join(folder, "embedding.ckpt")
    embedding = config.embeddings.add()
    embedding.tensor_name = EMBEDDING_TENSOR
    embedding.metadata_path = paths.join(folder, "metadata.tsv")
    # The plugin looks for the config in each run folder: the log dir itself is this run's.
    paths.write_text(paths.join(logdir, "projector_config.pbtxt"), text_format.MessageToString(config))
    return folder


class Profiler:
    """A tf.profiler trace of global steps START..END (1-based, both included) on the chief.

    Steps run --steps-per-loop at a time inside one tf.function call, so the loop ends a call
    at step START - 1 and at END (see `boundaries`): the trace holds exactly those steps.
    """

    def __init__(self, step_range: tuple[int, int] | None, logdir: str, enabled: bool):
        self.range = step_range if enabled else None
        self.logdir = logdir
        self.running = False

    def boundaries(self) -> tuple[int, ...]:
        return (self.range[0] - 1, self.range[1]) if self.range else ()

    def before(self, step: int) -> None:
        """Called with the number of steps done before a call."""
        if self.range and not self.running and self.range[0] - 1 <= step < self.range[1]:
            tf.profiler.experimental.start(self.logdir)
            self.running = True

    def after(self, step: int) -> None:
        if self.running and step >= self.range[1]:
            self.stop()

    def stop(self) -> None:
        if self.running:
            tf.profiler.experimental.stop()
            self.running = False
