"""Mixed precision, the TensorBoard views and --profile-steps, on tiny models (CPU; GPU test skips)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.test_train import cfg_for, one_step_weights
from training import data, jobs, observe, precision, train
from training.config import ConfigError


@pytest.fixture(scope="module")
def tiny():
    arrays = data.load_arrays("mnist-sample")
    return data.Arrays(arrays.x_train[:128], arrays.y_train[:128], arrays.x_test[:64], arrays.y_test[:64])


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_a_mixed_step_is_finite_keeps_float32_variables_and_exports_float32(tmp_path, tiny, policy):
    cfg = cfg_for(tmp_path, model="conv", latent_dim=8, epochs=1, batch_size=64, precision=policy,
                  max_examples=64, model_base_path=str(tmp_path / "models"))
    with pytest.warns(UserWarning, match="slower") if policy == "mixed_float16" else contextlib.nullcontext():
        state, history = train.train_and_evaluate(cfg, tiny, tf.distribute.get_strategy())
    assert np.isfinite(history[-1]["loss"]) and history[-1]["step"] == 1
    assert precision.is_mixed(state.encoder)
    assert {v.dtype for v in state.autoencoder.weights} == {"float32"}
    # the output sigmoid is float32; the conv that makes its logits computes in 16 bits
    layers = {layer.name: layer.compute_dtype for layer in state.decoder.layers}
    assert layers["reconstruction"] == "float32" and layers["reconstruction_logits"] == policy[len("mixed_"):]
    assert state.decoder.output.dtype == "float32"
    version_dir, created = jobs.export_trained(state, cfg, tiny)  # verify_export runs inside
    assert created
    loaded = tf.saved_model.load(version_dir)
    for name, fn in loaded.signatures.items():
        # every float in or out is float32; compress's codes out and decompress's codes in are uint8,
        # score's anomaly_score_kind is a string
        dtypes = {spec.dtype for spec in fn.structured_input_signature[1].values()}
        dtypes |= {t.dtype for t in fn.structured_outputs.values()}
        assert {d for d in dtypes if d.is_floating} == {tf.float32}, name
        assert dtypes - {tf.float32} <= {tf.bool, tf.uint8, tf.string}, name


def two_replica_check(check: str, workdir) -> dict:
    """Runs one tests/two_replicas.py check in its own process (see there why) and returns its JSON."""
    result = subprocess.run([sys.executable, "-m", "tests.two_replicas", check, str(workdir)], capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_float16_on_two_devices_matches_one_device(tmp_path):
    found = two_replica_check("float16_step", tmp_path)
    assert found["replicas"] == 2 and found["same_start"] and found["finite"]
    assert found["moved"] > 1e-4  # the step was applied, not skipped as an overflow
    # float16 activations, and the two halves of the batch summed in another order: 1 device gave
    # the same weights to within ~3e-5 (learning rate 1e-2, so a step moves them by up to ~1e-2).
    assert found["max_difference"] < 2e-4


@pytest.mark.slow
def test_an_overflow_on_one_replica_makes_every_replica_skip_the_step_and_halves_the_scale(tmp_path):
    found = two_replica_check("overflow_vote", tmp_path)
    assert found["max_pixel_per_replica"] == [1.0, 1e5]  # only the second replica's half overflows
    assert found["moved_by_overflow_step"] == [0.0, 0.0]  # no replica applied it, none got NaN
    assert found["scale_after_overflow"] == found["scale_start"] / 2
    assert min(found["moved_by_clean_step"]) > 1e-4 and found["finite_after"] == [True, True]  # training goes on


@pytest.mark.parametrize("before, after", [("float32", "mixed_float16"), ("mixed_float16", "float32")])
def test_a_run_resumes_in_another_precision_with_adam_restored_and_a_fresh_loss_scale(tmp_path, tiny, before, after):
    with pytest.warns(UserWarning, match="slower") if before == "mixed_float16" else contextlib.nullcontext():
        first, _ = train.train_and_evaluate(cfg_for(tmp_path, epochs=1, precision=before), tiny,
                                            tf.distribute.get_strategy())
    saved = [v.numpy() for v in first.autoencoder.weights]
    cfg = cfg_for(tmp_path, epochs=2, precision=after)  # the same workdir: a resume, not a new run
    resumed = train.build_state(cfg, tiny.input_shape, tf.distribute.get_strategy())
    assert int(resumed.step.numpy()) == 2 and int(resumed.optimizer.iterations.numpy()) == 2
    for a, b in zip(saved, resumed.autoencoder.weights):
        np.testing.assert_array_equal(a, b.numpy())
    moments = [v for v in resumed.optimizer.variables if "momentum" in v.path or "velocity" in v.path]
    assert moments and all(float(np.max(np.abs(v.numpy()))) > 0 for v in moments)  # Adam's, not fresh zeros
    if after == "mixed_float16":
        assert float(resumed.optimizer.dynamic_scale.numpy()) == resumed.optimizer.initial_scale
    with pytest.warns(UserWarning, match="slower") if after == "mixed_float16" else contextlib.nullcontext():
        _, history = train.train_and_evaluate(cfg, tiny, tf.distribute.get_strategy())
    assert [h["epoch"] for h in history] == [1, 2] and np.isfinite(history[-1]["loss"])


def test_tensorboard_has_images_throughput_hparams_projector_and_the_profile(tmp_path, tiny):
    cfg = cfg_for(tmp_path, model="conv", latent_dim=8, epochs=1, batch_size=32, noise_factor=0.3,
                  max_examples=96, steps_per_loop=20, profile_steps="2,3")
    train.train_and_evaluate(cfg, tiny, tf.distribute.get_strategy())
    logdir = tmp_path / "run" / "tensorboard"
    tags, plugins = set(), set()
    for events in logdir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                tags.add(value.tag)
                plugins.add(value.metadata.plugin_data.plugin_name)
    assert {"inputs", "noisy_inputs", "reconstructions", "images_per_second", "images_per_second_per_replica",
            "loss", "mse"} <= tags
    assert {"images", "hparams", "scalars"} <= plugins
    projector = logdir / observe.PROJECTOR_DIR
    labels = (projector / "metadata.tsv").read_text().split()
    assert labels == [str(y) for y in tiny.y_test[:len(labels)]] and len(labels) == len(tiny.y_test)
    codes = tf.train.load_checkpoint(str(projector / "embedding.ckpt")).get_tensor(observe.EMBEDDING_TENSOR)
    assert codes.shape == (len(labels), 8)
    assert observe.EMBEDDING_TENSOR in (logdir / "projector_config.pbtxt").read_text()
    assert list((logdir / "plugins" / "profile").glob("*/*.xplane.pb"))


def test_profile_steps_split_the_loop_calls_at_the_range():
    profiler = observe.Profiler((5, 12), "unused", enabled=True)
    assert profiler.boundaries() == (4, 12)
    assert observe.Profiler((5, 12), "unused", enabled=False).boundaries() == ()


@pytest.mark.parametrize("overrides, message", [
    ({"precision": "float16"}, "--precision must be one of float32, mixed_float16, mixed_bfloat16"),
    ({"profile_steps": "7"}, "--profile-steps must be START,END"),
    ({"profile_steps": "a,b"}, "--profile-steps must be START,END"),
    ({"profile_steps": "9,3"}, "--profile-steps needs 0 < START <= END"),
])
def test_bad_precision_or_profile_steps_is_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        cfg_for(tmp_path, **overrides)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"), reason="no GPU visible to TensorFlow")
def test_one_step_on_the_gpus_equals_one_device(tmp_path, tiny):
    from training import distribute

    strategy = distribute.make_strategy()
    cfg = cfg_for(tmp_path, learning_rate=1e-2)
    init_one, after_one = one_step_weights(cfg, tiny, tf.distribute.OneDeviceStrategy("/gpu:0"))
    init_all, after_all = one_step_weights(cfg, tiny, strategy)
    for a, b in zip(init_one, init_all):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(after_one, after_all):
        np.testing.assert_allclose(a, b, atol=2e-6)
