"""Autoencoder models: an encoder and a decoder, each its own Keras Functional model.

    encoder, decoder = build_autoencoder("conv", input_shape=(28, 28, 1), latent_dim=32)

`dense` is the seed blog's MLP (Flatten, 256, 128, latent 32 with ReLU, mirrored back);
`conv` halves the image twice with strided Conv2D and doubles it back with Conv2DTranspose
(options: wider stages, residual blocks at the smallest resolution, a latent bounded by a sigmoid;
for compression a wider decoder, stride-1 refinement at full resolution and a linear code<->pixel skip).
`chain(..., quantization_noise=True)` trains through QuantizationNoise, so the decoder learns codes
that survive one byte per dimension. Keeping the halves separate is what lets the export offer `encode` and `decode` on their own.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import layers

from training.config import ConfigError

# The output sigmoid stays float32 under mixed precision: a 16-bit sigmoid saturates and the
# loss's log(p) of it loses the small errors training needs. The layer that makes its logits
# computes in the policy's dtype, as the TensorFlow mixed precision guide does with a Dense
# followed by a float32 softmax: in float32, the conv model's full-resolution output conv took
# 17 of a bfloat16 step's 55 ms of oneDNN time (ONEDNN_VERBOSE=1, batch 128; README, Precision).
OUTPUT_DTYPE = "float32"


def build_dense(input_shape, latent_dim: int, widths=(256, 128)) -> tuple[keras.Model, keras.Model]:
    inputs = keras.Input(input_shape, name="images")
    x = layers.Flatten()(inputs)
    for width in widths:
        x = layers.Dense(width, activation="relu")(x)
    latent = layers.Dense(latent_dim, activation="relu", name="latent")(x)
    encoder = keras.Model(inputs, latent, name="encoder")

    code = keras.Input((latent_dim,), name="latent")
    x = code
    for width in reversed(widths):
        x = layers.Dense(width, activation="relu")(x)
    x = layers.Dense(math.prod(input_shape))(x)
    x = layers.Activation("sigmoid", dtype=OUTPUT_DTYPE)(x)
    outputs = layers.Reshape(input_shape, name="reconstruction", dtype=OUTPUT_DTYPE)(x)
    return encoder, keras.Model(code, outputs, name="decoder")


LATENT_BOUNDS = {"none": None, "sigmoid": "sigmoid", "tanh": "tanh"}
LINEAR_SKIPS = ("none", "decoder", "both")


@keras.saving.register_keras_serializable(package="aekit")
class QuantizationNoise(layers.Layer):
    """Training only: adds U(-0.5, 0.5) of one quantization step to every code dimension.

    The step is each dimension's range over the batch divided by (levels - 1), what uniform
    quantization to `levels` levels over the training codes' min/max will cost after training:
    the additive-noise proxy of rounding from learned image compression (Balle et al., 2017).
    At inference (training=False) it is the identity.
    """

    def __init__(self, levels: int = 256, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.levels = levels
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, codes, training=False):
        if not training:
            return codes
        spread = tf.reduce_max(codes, axis=0) - tf.reduce_min(codes, axis=0)
        step = tf.stop_gradient(spread / (self.levels - 1))  # the range is measured, not learned through
        noise = keras.random.uniform(tf.shape(codes), -0.5, 0.5, dtype=codes.dtype, seed=self.seed_generator)
        return codes + noise * step

    def get_config(self):
        return {**super().get_config(), "levels": self.levels, "seed": self.seed}


def _residual_block(x, filters: int):
    """Two 3x3 convolutions added back to their input (He et al., 2016), at constant size."""
    y = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
    y = layers.Conv2D(filters, 3, padding="same")(y)
    return layers.Activation("relu")(layers.Add()([x, y]))


def build_conv(input_shape, latent_dim: int, widths=(32, 64), residual_blocks: int = 0,
               latent_bound: str = "none", decoder_widths=None, refine_convs: int = 0,
               linear_skip: str = "none") -> tuple[keras.Model, keras.Model]:
    """Strided Conv2D encoder, Conv2DTranspose decoder. Decoder options (compression, issue 18):
    `decoder_widths` its stages' filters (default: `widths`; the last is also the Dense->small
    projection's), `refine_convs` stride-1 3x3 convolutions at full resolution before the output,
    `linear_skip` "decoder": a Dense code->pixels added to the output's logits, so the decoder
    contains a linear map beside the convolutional one; "both": also a Dense pixels->code added
    to the code, so the autoencoder contains a linear (PCA-like) autoencoder."""
    if len(input_shape) != 3:
        raise ConfigError(f"--model conv needs images (H, W, C); this data has shape {tuple(input_shape)}: "
                          "use --model dense for vectors")
    height, width, channels = input_shape
    decoder_widths = tuple(decoder_widths or widths)
    if len(decoder_widths) != len(widths):
        raise ConfigError(f"--decoder-widths needs one filter count per strided stage ({len(widths)}, as "
                          f"--conv-widths); got {len(decoder_widths)}")
    factor = 2 ** len(widths)  # each strided layer halves the image
    if height % factor or width % factor:
        raise ConfigError(f"--model conv needs image sides divisible by {factor}; got {height}x{width}")
    if linear_skip not in LINEAR_SKIPS:
        raise ConfigError(f"--linear-skip must be one of {', '.join(LINEAR_SKIPS)}; got {linear_skip!r}")

    inputs = keras.Input(input_shape, name="images")
    x = inputs
    for filters in widths:
        x = layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(x)
    for _ in range(residual_blocks):
        x = _residual_block(x, widths[-1])
    x = layers.Flatten()(x)
    # linear code by default: ReLU would waste dimensions; a bound fixes the range quantization sees
    if linear_skip == "both":
        x = layers.Dense(latent_dim)(x)
        x = layers.Add()([x, layers.Dense(latent_dim, name="linear_code")(layers.Flatten()(inputs))])
        latent = layers.Activation(LATENT_BOUNDS[latent_bound] or "linear", name="latent")(x)
    else:
        latent = layers.Dense(latent_dim, activation=LATENT_BOUNDS[latent_bound], name="latent")(x)
    encoder = keras.Model(inputs, latent, name="encoder")

    small = (height // factor, width // factor, decoder_widths[-1])
    code = keras.Input((latent_dim,), name="latent")
    x = layers.Dense(math.prod(small), activation="relu")(code)
    x = layers.Reshape(small)(x)
    for _ in range(residual_blocks):
        x = _residual_block(x, decoder_widths[-1])
    for filters in reversed(decoder_widths):
        x = layers.Conv2DTranspose(filters, 3, strides=2, padding="same", activation="relu")(x)
    for _ in range(refine_convs):
        x = layers.Conv2D(decoder_widths[0], 3, padding="same", activation="relu")(x)
    logits = layers.Conv2D(channels, 3, padding="same", name="reconstruction_logits")(x)
    if linear_skip != "none":
        skip = layers.Dense(math.prod(input_shape), name="linear_skip", dtype=OUTPUT_DTYPE)(code)
        skip = layers.Reshape(input_shape, dtype=OUTPUT_DTYPE)(skip)
        logits = layers.Add(dtype=OUTPUT_DTYPE)([logits, skip])
    outputs = layers.Activation("sigmoid", name="reconstruction", dtype=OUTPUT_DTYPE)(logits)
    return encoder, keras.Model(code, outputs, name="decoder")


BUILDERS = {"dense": build_dense, "conv": build_conv}


def build_autoencoder(kind: str, input_shape, latent_dim: int, **options) -> tuple[keras.Model, keras.Model]:
    """Returns (encoder, decoder) for `kind` in BUILDERS; `options` go to the builder (conv only)."""
    if kind not in BUILDERS:
        raise ConfigError(f"unknown model {kind!r}; choose one of {', '.join(BUILDERS)}")
    return BUILDERS[kind](tuple(input_shape), latent_dim, **options)


def reconstruction_error(images, reconstruction):
    """Per-example mean squared error, shape [batch]: the anomaly score and the `mse` loss."""
    squared = tf.reshape(tf.square(reconstruction - images), [tf.shape(images)[0], -1])
    return tf.reduce_mean(squared, axis=1)


def chain(encoder: keras.Model, decoder: keras.Model, quantization_noise: bool = False,
          seed: int | None = None) -> keras.Model:
    """The full autoencoder (images -> reconstruction) sharing the halves' weights; with
    `quantization_noise` the code passes QuantizationNoise in between (training only)."""
    inputs = keras.Input(encoder.input_shape[1:], name="images")
    codes = encoder(inputs)
    if quantization_noise:
        codes = QuantizationNoise(seed=seed, name="quantization_noise")(codes)
    return keras.Model(inputs, decoder(codes), name="autoencoder")
