"""The training loop: replicas agree with one device, checkpoints resume exactly, SIGTERM saves."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from training import data, distribute, train
from training.config import ConfigError, TrainConfig


@pytest.fixture(scope="module")
def small_arrays():
    arrays = data.load_arrays("mnist-sample")
    return data.Arrays(arrays.x_train[:256], arrays.y_train[:256], arrays.x_test[:128], arrays.y_test[:128])


def cfg_for(tmp_path, **overrides):
    values = dict(model="dense", epochs=2, batch_size=64, workdir=str(tmp_path / "run"), export=False,
                  checkpoint_every_steps=2)
    values.update(overrides)
    return TrainConfig(**values)


def mirrored() -> tf.distribute.Strategy:
    return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")[:2]])


def one_step_weights(cfg, arrays, strategy):
    state = train.build_state(cfg, arrays.input_shape, strategy)
    step = train.make_train_step(state, cfg.loss, cfg.batch_size, cfg.noise_factor)
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: data.make_dataset(arrays.x_train, cfg.batch_size, noise_factor=cfg.noise_factor, seed=cfg.seed,
                                      input_context=ctx, noise_in_step=True))
    initial = [v.numpy() for v in state.autoencoder.trainable_variables]
    step(iter(dataset), tf.constant(0.0), tf.constant(1))
    return initial, [v.numpy() for v in state.autoencoder.trainable_variables]


def test_one_step_on_two_devices_equals_one_device(tmp_path, small_arrays):
    assert len(tf.config.list_logical_devices("CPU")) >= 2  # set up by conftest before TF started
    # with noise: each replica draws its rows' noise in the step (data.add_noise), and must draw
    # exactly the values one device draws for those rows of the global batch
    cfg = cfg_for(tmp_path, learning_rate=1e-2, noise_factor=0.3)
    init_one, after_one = one_step_weights(cfg, small_arrays, tf.distribute.get_strategy())
    init_two, after_two = one_step_weights(cfg, small_arrays, mirrored())
    for a, b in zip(init_one, init_two):
        np.testing.assert_array_equal(a, b)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(after_one, init_one))
    assert moved > 1e-4  # the step did something
    for a, b in zip(after_one, after_two):
        np.testing.assert_allclose(a, b, atol=2e-6)


class StopAtStep(train.StopSignal):
    """Behaves like a SIGTERM arriving during training call `n + 1` (calls end on checkpoint steps).

    The first read is the start-up agreement (train.agree_on_start), before any training call.
    """

    def __init__(self, n):
        super().__init__()
        self.calls, self.n = 0, n

    @property
    def requested(self):
        self.calls += 1
        return self.calls > self.n + 1

    @requested.setter
    def requested(self, value):
        pass


def test_interrupted_run_resumes_at_the_right_step_and_matches(tmp_path, small_arrays):
    steps = data.steps_per_epoch(len(small_arrays.x_train), 64)  # 4 per epoch
    full_state, full_history = train.train_and_evaluate(cfg_for(tmp_path / "a"), small_arrays, tf.distribute.get_strategy())
    assert int(full_state.step.numpy()) == 2 * steps

    cfg = cfg_for(tmp_path / "b")
    with pytest.raises(train.Preempted, match="step 6"):
        train.train_and_evaluate(cfg, small_arrays, tf.distribute.get_strategy(), stop=StopAtStep(2))
    assert tf.train.latest_checkpoint(f"{cfg.workdir}/checkpoints").endswith("ckpt-6")
    resumed, history = train.train_and_evaluate(cfg, small_arrays, tf.distribute.get_strategy())
    assert int(resumed.step.numpy()) == 2 * steps
    assert [h["epoch"] for h in history] == [1, 2]  # no epoch lost or run twice
    for a, b in zip(full_state.autoencoder.trainable_variables, resumed.autoencoder.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_sigterm_on_the_last_step_of_an_epoch_still_records_that_epoch(tmp_path, small_arrays):
    cfg = cfg_for(tmp_path)  # 4 steps per epoch, calls of 2 steps
    with pytest.raises(train.Preempted, match="step 4"):
        train.train_and_evaluate(cfg, small_arrays, tf.distribute.get_strategy(), stop=StopAtStep(1))
    _, history = train.train_and_evaluate(cfg, small_arrays, tf.distribute.get_strategy())
    assert [h["epoch"] for h in history] == [1, 2]


def test_workdir_has_config_history_and_tensorboard(tmp_path, small_arrays):
    cfg = cfg_for(tmp_path, epochs=1, noise_factor=0.3)
    train.train_and_evaluate(cfg, small_arrays, tf.distribute.get_strategy())
    workdir = tmp_path / "run"
    assert json.loads((workdir / "config.json").read_text())["noise_factor"] == 0.3
    record = json.loads((workdir / "history.json").read_text())[0]
    assert {"epoch", "step", "loss", "mse", "psnr_db", "noisy_psnr_db", "denoised_psnr_db"} <= set(record)
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_rerun_of_a_finished_run_trains_nothing_more(tmp_path, small_arrays):
    cfg = cfg_for(tmp_path, epochs=1)
    state, _ = train.train_and_evaluate(cfg, small_arrays, tf.distribute.get_strategy())
    again, history = train.train_and_evaluate(cfg, small_arrays, tf.distribute.get_strategy())
    assert int(again.step.numpy()) == int(state.step.numpy()) and len(history) == 1


@pytest.mark.parametrize("overrides, message", [
    ({"model": "gan"}, "--model must be one of"), ({"loss": "l1"}, "--loss must be one of"),
    ({"epochs": 0}, "--epochs must be positive"), ({"noise_factor": 2.0}, "--noise-factor must be in"),
    ({"batch_size": -1}, "--batch-size must be positive"),
])
def test_bad_config_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**overrides)


def test_config_file_roundtrip_and_errors(tmp_path):
    cfg = TrainConfig(epochs=3, smoke=True)
    path = pathlib.Path(cfg.save(str(tmp_path)))
    assert TrainConfig.from_file(path, seed=5).epochs == 1 and TrainConfig.from_file(path, seed=5).seed == 5
    path.write_text('{"epochz": 3}')
    with pytest.raises(ConfigError, match="unknown keys"):
        TrainConfig.from_file(path)
    path.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.from_file(path)


@pytest.mark.parametrize("value, message", [
    ("{", "not valid JSON"), ('{"task": {"type": "worker", "index": 0}}', "'cluster' is missing"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "'task.type'"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}', "'task.index'"),
    ('{"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}}', "'cluster.worker'"),
])
def test_bad_tf_config_names_the_field(value, message):
    with pytest.raises(ConfigError, match=message):
        distribute.read_tf_config({"TF_CONFIG": value})


def _trained_with_three_checkpoints(tmp_path, small_arrays):
    """epochs=2, 4 steps each, a checkpoint every 2 steps: ckpt-4, ckpt-6, ckpt-8 kept."""
    cfg = cfg_for(tmp_path)
    train.train_and_evaluate(cfg, small_arrays, tf.distribute.get_strategy())
    directory = tmp_path / "run" / "checkpoints"
    assert [p.rsplit("-", 1)[1] for p in train.checkpoint_paths(str(directory))] == ["8", "6", "4"]
    return cfg, directory


@pytest.mark.parametrize("damage", ["truncated", "deleted", "garbage state file"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_that_restores(tmp_path, small_arrays, damage, capsys):
    cfg, directory = _trained_with_three_checkpoints(tmp_path, small_arrays)
    if damage == "truncated":
        data_file = next(directory.glob("ckpt-8.data-*"))
        data_file.write_bytes(data_file.read_bytes()[:100])
    elif damage == "deleted":
        for path in directory.glob("ckpt-8.*"):
            path.unlink()
    else:
        (directory / "checkpoint").write_text("garbage {{{")
    more = cfg_for(tmp_path, epochs=3)
    state = train.build_state(more, small_arrays.input_shape, tf.distribute.get_strategy())
    expected = 8 if damage == "garbage state file" else 6  # the state file is not needed to find ckpt-8
    assert int(state.step.numpy()) == expected
    if damage == "truncated":
        assert "restored ckpt-6, the newest checkpoint that restores; skipped ckpt-8" in capsys.readouterr().out
    _, history = train.train_and_evaluate(more, small_arrays, tf.distribute.get_strategy())
    assert [h["epoch"] for h in history] == [1, 2, 3]  # never [1, 2, 1, 2, 3]


def test_checkpoints_that_all_fail_to_restore_stop_in_one_line(tmp_path, small_arrays):
    cfg, directory = _trained_with_three_checkpoints(tmp_path, small_arrays)
    for data_file in directory.glob("ckpt-*.data-*"):
        data_file.write_bytes(b"not a checkpoint")
    with pytest.raises(train.CheckpointUnusable, match="no checkpoint in .* restores: ckpt-8 .*; ckpt-6 .*; ckpt-4"):
        train.build_state(cfg, small_arrays.input_shape, tf.distribute.get_strategy())


def test_a_resumed_epoch_records_the_whole_epochs_mean_loss(tmp_path, small_arrays):
    _, full = train.train_and_evaluate(cfg_for(tmp_path / "a"), small_arrays, tf.distribute.get_strategy())
    cfg = cfg_for(tmp_path / "b")
    with pytest.raises(train.Preempted, match="step 6"):  # stopped halfway through epoch 2
        train.train_and_evaluate(cfg, small_arrays, tf.distribute.get_strategy(), stop=StopAtStep(2))
    _, resumed = train.train_and_evaluate(cfg, small_arrays, tf.distribute.get_strategy())
    assert resumed[1]["loss"] == pytest.approx(full[1]["loss"], rel=1e-5)


def test_a_batch_that_does_not_split_over_the_replicas_writes_nothing(tmp_path, small_arrays):
    cfg = cfg_for(tmp_path, batch_size=63)
    with pytest.raises(ConfigError, match="--batch-size 63 does not split evenly over 2 replicas; use a multiple of 2"):
        train.train_and_evaluate(cfg, small_arrays, mirrored())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("values, message", [
    ({"epochs": "10"}, "config value 'epochs' must be int, got '10' \\(str\\)"),
    ({"learning_rate": "fast"}, "'learning_rate' must be float"),
    ({"export": "yes"}, "'export' must be bool"),
    ({"data_dir": 5}, "'data_dir' must be str or null"),
    ({"batch_size": 64.5}, "'batch_size' must be int"),
])
def test_a_wrongly_typed_config_value_is_one_line(tmp_path, values, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_file(path)
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_finished_checkpoint_is_known_without_the_data(tmp_path, small_arrays):
    cfg = cfg_for(tmp_path)
    assert train.completed_step(cfg) is None  # no checkpoint yet
    train.train_and_evaluate(cfg, small_arrays, tf.distribute.get_strategy())
    assert train.completed_step(cfg) == 8
    assert train.completed_step(cfg_for(tmp_path, epochs=3)) is None  # more epochs asked: not finished
