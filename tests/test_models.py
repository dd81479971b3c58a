"""Model shapes: encoder and decoder halves for dense and conv, and bad shapes' errors."""

import dataclasses
import json

import numpy as np
import pytest

from training import models
from training.config import ConfigError


@pytest.mark.parametrize("kind, shape", [("dense", (28, 28, 1)), ("conv", (28, 28, 1)), ("dense", (12,)),
                                         ("conv", (32, 16, 3))])
def test_halves_have_the_configured_shapes(kind, shape):
    encoder, decoder = models.build_autoencoder(kind, shape, latent_dim=7)
    x = np.random.default_rng(0).random((3, *shape)).astype(np.float32)
    latent = encoder(x)
    assert latent.shape == (3, 7)
    reconstruction = decoder(latent)
    assert reconstruction.shape == (3, *shape)
    assert float(np.min(reconstruction)) >= 0.0 and float(np.max(reconstruction)) <= 1.0  # sigmoid output
    assert models.chain(encoder, decoder)(x).shape == (3, *shape)


def test_dense_matches_the_seed_blog_layout():
    encoder, decoder = models.build_autoencoder("dense", (28, 28, 1), 32)
    widths = [layer.units for layer in encoder.layers if hasattr(layer, "units")]
    assert widths == [256, 128, 32]
    assert [layer.units for layer in decoder.layers if hasattr(layer, "units")] == [128, 256, 784]


@pytest.mark.parametrize("shape, message", [((12,), "needs images"), ((30, 30, 1), "divisible by 4")])
def test_conv_rejects_shapes_it_cannot_handle(shape, message):
    with pytest.raises(ConfigError, match=message):
        models.build_autoencoder("conv", shape, 8)


def test_unknown_model():
    with pytest.raises(ConfigError, match="unknown model"):
        models.build_autoencoder("transformer", (4,), 2)


def test_quantization_noise_is_at_most_half_a_step_and_only_in_training():
    codes = np.stack([np.linspace(0.0, 255.0, 64), np.linspace(-1.0, 1.0, 64)], axis=1).astype(np.float32)
    layer = models.QuantizationNoise(levels=256, seed=3)
    np.testing.assert_array_equal(layer(codes), codes)  # inference: the identity
    noisy = np.asarray(layer(codes, training=True))
    steps = np.array([1.0, 2.0 / 255], np.float32)  # each column's range / 255
    offsets = np.abs(noisy - codes) / steps
    assert offsets.max() <= 0.5 + 1e-5 and offsets.mean() > 0.1  # really noisy, never more than half a step


def test_conv_options_build_and_survive_the_float32_clone():
    from training import precision
    encoder, decoder = models.build_autoencoder("conv", (28, 28, 1), 8, widths=(16, 32), residual_blocks=1,
                                                latent_bound="sigmoid")
    autoencoder = models.chain(encoder, decoder, quantization_noise=True, seed=1)
    x = np.random.default_rng(0).random((2, 28, 28, 1)).astype(np.float32)
    codes = np.asarray(encoder(x))
    assert codes.min() >= 0.0 and codes.max() <= 1.0  # sigmoid-bounded code
    copy = precision.float32_copy(autoencoder)
    assert any(isinstance(layer, models.QuantizationNoise) for layer in copy.layers)
    np.testing.assert_allclose(copy(x), autoencoder(x), atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"conv_widths": "32,x"}, "--conv-widths must be positive filter counts"),
    ({"conv_widths": "0"}, "--conv-widths must be positive filter counts"),
    ({"latent_bound": "relu"}, "--latent-bound must be one of none, sigmoid, tanh"),
    ({"lr_schedule": "step"}, "--lr-schedule must be one of constant, cosine"),
    ({"residual_blocks": -1}, "--residual-blocks must be 0 or more"),
])
def test_bad_model_options_are_one_line(overrides, message):
    from training.config import TrainConfig
    with pytest.raises(ConfigError, match=message) as e:
        TrainConfig(**overrides)
    assert "\n" not in str(e.value)


def test_compression_decoder_options_build_with_the_configured_shapes():
    encoder, decoder = models.build_autoencoder("conv", (28, 28, 1), 8, widths=(16, 32), decoder_widths=(24, 48),
                                                refine_convs=2, linear_skip="both")
    x = np.random.default_rng(0).random((3, 28, 28, 1)).astype(np.float32)
    reconstruction = np.asarray(decoder(encoder(x)))
    assert reconstruction.shape == (3, 28, 28, 1)
    assert reconstruction.min() >= 0.0 and reconstruction.max() <= 1.0
    filters = [layer.filters for layer in decoder.layers if hasattr(layer, "filters")]
    assert filters == [48, 24, 24, 24, 1]  # stages 48 then 24 (widest at 7x7), two refinements, the output
    projection = next(layer for layer in decoder.layers if hasattr(layer, "units"))
    assert projection.units == 7 * 7 * 48  # the Dense->7x7 projection has the last decoder width


def test_linear_skip_is_a_linear_map_of_the_code_inside_the_sigmoid():
    _, decoder = models.build_autoencoder("conv", (8, 8, 1), 5, widths=(4, 4), linear_skip="decoder")
    output_conv = [layer for layer in decoder.layers if hasattr(layer, "filters")][-1]
    output_conv.set_weights([np.zeros_like(w) for w in output_conv.get_weights()])  # silence the conv path
    skip = decoder.get_layer("linear_skip")
    rng = np.random.default_rng(1)
    kernel, bias = rng.normal(size=(5, 64)).astype(np.float32), rng.normal(size=64).astype(np.float32)
    skip.set_weights([kernel, bias])
    codes = rng.normal(size=(4, 5)).astype(np.float32)
    expected = 1.0 / (1.0 + np.exp(-(codes @ kernel + bias)))
    np.testing.assert_allclose(np.asarray(decoder(codes)).reshape(4, 64), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"decoder_widths": "32"}, "--decoder-widths needs one filter count per strided stage"),
    ({"decoder_widths": "32,x"}, "--decoder-widths must be positive filter counts"),
    ({"refine_convs": -1}, "--refine-convs must be 0 or more"),
    ({"linear_skip": "yes"}, "--linear-skip must be one of none, decoder, both"),
])
def test_bad_decoder_options_are_one_line(overrides, message):
    from training.config import TrainConfig
    with pytest.raises(ConfigError, match=message) as e:
        TrainConfig(**overrides)
    assert "\n" not in str(e.value)


def test_compression_decoder_exports_and_passes_verify_export(tmp_path):
    import tensorflow as tf

    from training import data, jobs, train
    from training.config import TrainConfig
    arrays = data.load_arrays("mnist-sample")
    arrays = data.Arrays(arrays.x_train[:128], arrays.y_train[:128], arrays.x_test[:64], arrays.y_test[:64])
    cfg = TrainConfig(latent_dim=8, epochs=1, batch_size=64, conv_widths="8,16", decoder_widths="16,32",
                      refine_convs=1, linear_skip="both", loss="mse", workdir=str(tmp_path / "run"),
                      model_base_path=str(tmp_path / "models"), export=False)
    state, _ = train.train_and_evaluate(cfg, arrays, tf.distribute.get_strategy())
    version_dir, created = jobs.export_trained(state, cfg, arrays)  # export_trained runs verify_export
    assert created
    loaded = tf.saved_model.load(version_dir)
    x = data.scale_to_unit(tf.constant(arrays.x_test[:3])).numpy()
    np.testing.assert_allclose(loaded.signatures["denoise"](images=x)["reconstruction"].numpy(),
                               state.autoencoder(x, training=False).numpy(), atol=1e-5)


def test_the_compression_preset_is_the_measured_settings_under_the_flags_given():
    import aekit_cli
    from training.config import COMPRESSION_SETTINGS, TrainConfig, preset_settings
    parse = aekit_cli.build_parser().parse_args
    cfg = aekit_cli.train_config_from_args(parse(["train", "--preset", "compression", "--latent-dim", "128"]))
    assert cfg.latent_dim == 128 and cfg.model == "conv"
    assert {k: getattr(cfg, k) for k in COMPRESSION_SETTINGS[128]} == COMPRESSION_SETTINGS[128]
    flagged = aekit_cli.train_config_from_args(parse(["train", "--preset", "compression", "--epochs", "2"]))
    assert flagged.epochs == 2 and flagged.latent_dim == 32  # a flag wins; 32 bytes without --latent-dim
    assert flagged.linear_skip == COMPRESSION_SETTINGS[32]["linear_skip"]
    assert TrainConfig().linear_skip == "none" and TrainConfig().loss == "bce"  # the defaults are untouched
    assert preset_settings("compression", 100) == {**COMPRESSION_SETTINGS[128], "model": "conv", "latent_dim": 100}
    with pytest.raises(ConfigError, match="--preset must be one of compression, recognition; got 'fast'"):
        preset_settings("fast", 32)


def test_the_recognition_preset_moves_the_input_only_and_refuses_the_flag_without_a_shift(capsys, tmp_path):
    import aekit_cli
    from training.config import COMPRESSION_SETTINGS, RECOGNITION_SETTINGS, TrainConfig
    parse = aekit_cli.build_parser().parse_args
    cfg = aekit_cli.train_config_from_args(parse(["train", "--preset", "recognition"]))
    assert cfg.latent_dim == 32 and cfg.shift_input_only and cfg.augment_shift == RECOGNITION_SETTINGS[32]["augment_shift"]
    assert {k: getattr(cfg, k) for k in RECOGNITION_SETTINGS[32]} == RECOGNITION_SETTINGS[32]
    assert not TrainConfig().shift_input_only
    # the compression preset over a recognition run's config file is the compression preset
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    over = aekit_cli.train_config_from_args(parse(["train", "--config", str(tmp_path / "config.json"),
                                                   "--preset", "compression"]))
    assert not over.shift_input_only and over.augment_shift == COMPRESSION_SETTINGS[32]["augment_shift"]
    assert aekit_cli.main(["train", "--shift-input-only", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--shift-input-only moves the inputs by --augment-shift" in err, err
