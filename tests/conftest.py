"""Test session setup: quiet TensorFlow, and two logical CPU devices before TF initialises,
so MirroredStrategy tests run the same code path as on two GPUs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from training.distribute import configure_logical_devices  # noqa: E402

LOGICAL_DEVICES = 2


def pytest_configure(config):
    configure_logical_devices(LOGICAL_DEVICES)
    tf.get_logger().setLevel("ERROR")
