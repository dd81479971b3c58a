"""Training precision: float32, mixed_float16 or mixed_bfloat16 (keras.mixed_precision).

    aekit train --model conv --precision mixed_bfloat16
    # -> variables, checkpoints and the exported model stay float32; layers compute in bfloat16

Mixed policies keep every variable in float32 and compute in 16 bits; the output sigmoid (and a
--linear-skip path) and the loss stay float32 (models.py pins them; the conv that makes the
logits computes in 16 bits, as in the TensorFlow mixed precision guide). float16 needs loss scaling: gradients
of small losses underflow to zero in float16, so the loss is multiplied before the backward pass
and the gradients divided after (keras.optimizers.LossScaleOptimizer). bfloat16 has float32's
exponent range and needs none.

Which to use: mixed_bfloat16 on Ampere or newer GPUs and on TPUs, mixed_float16 on Volta/Turing
GPUs (tensor cores without bfloat16), float32 on CPU unless the CPU has AVX512_BF16 / AMX (see
`python -m benchmarks.bench_training`, which measures each precision on this machine).
"""

from __future__ import annotations

import contextlib
import warnings

import keras
import tensorflow as tf


@contextlib.contextmanager
def policy(precision: str):
    """Layers built inside take `precision`'s dtype policy; the previous global policy comes back after."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def warn_if_slow(precision: str) -> None:
    """A warning, not an error: float16 on CPU is correct, only slow (few CPUs have float16 math,
    so oneDNN converts); a GPU config stays runnable on a laptop for a dry run."""
    if precision == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
        warnings.warn("--precision mixed_float16 on a CPU is correct but slower than float32 (no float16 "
                      "arithmetic); use mixed_bfloat16 on CPUs with AVX512_BF16/AMX, float16 on GPUs",
                      stacklevel=2)


def make_optimizer(precision: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """Adam, wrapped in a dynamic LossScaleOptimizer for float16."""
    adam = keras.optimizers.Adam(learning_rate)
    if precision == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(adam)
    return adam


def as_saved_in(optimizer: keras.optimizers.Optimizer, prefix: str):
    """The optimizer as the checkpoint at `prefix` holds it, so a run may change --precision on resume.

    A float16 run saves a LossScaleOptimizer around Adam (Adam under `optimizer/inner_optimizer`);
    float32 and bfloat16 runs save Adam itself. Across that switch Adam's step and moments are
    restored and the loss scale starts afresh (float16) or is dropped; weights are float32 in both.
    """
    saved_scaled = any(name.startswith("optimizer/inner_optimizer/") for name, _ in tf.train.list_variables(prefix))
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    if saved_scaled == scaled:
        return optimizer
    if scaled:
        return optimizer.inner_optimizer
    return tf.train.Checkpoint(inner_optimizer=optimizer)


def agree_on_finite(grads: list[tf.Tensor]) -> list[tf.Tensor]:
    """Makes every replica's gradients non-finite when any replica's are (float16 under a strategy).

    LossScaleOptimizer decides to skip a step from the first replica's local gradients only
    (loss_scale_optimizer.py, _tf_apply: "grads is all-reduced", but apply_gradients all-reduces
    later, inside the inner optimizer). An overflow on another replica would then reach the
    weights as NaN. One scalar all-reduce lets every replica see it and skip the step together.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return grads
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])
    bad_replicas = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
    poison = tf.where(bad_replicas > 0, float("nan"), 1.0)
    return [None if g is None else g * tf.cast(poison, g.dtype) for g in grads]


def float32_copy(model: keras.Model) -> keras.Model:
    """The same Functional model with every layer in float32 and the same weights: what is exported,
    so a served model is float32 in and out whatever precision it was trained in."""

    def as_float32(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    copy = keras.models.clone_model(model, clone_function=as_float32)
    copy.set_weights(model.get_weights())
    return copy


def is_mixed(model: keras.Model) -> bool:
    return any(layer.dtype_policy.compute_dtype != "float32" for layer in model.layers)
