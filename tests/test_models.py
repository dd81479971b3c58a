"""Model shapes: encoder and decoder halves for dense and conv, and bad shapes' errors."""

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
