"""Paths: every command takes local, gs:// and ram:// paths through one layer, and refuses the rest."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

import aekit_cli
from clients.grpc_client import AutoencoderClient
from serving import main as serving_main
from storage import paths
from training import data, jobs
from training.config import TrainConfig


def test_schemes_and_joins():
    assert paths.scheme("gs://b/x") == "gs" and paths.scheme("/data/x") == "" and paths.scheme("a/b://c") == ""
    assert paths.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
    assert paths.join("runs/ae", "history.json") == os.path.join("runs/ae", "history.json")
    assert paths.check("gs://bucket/run", "--workdir") == "gs://bucket/run"  # TF has a GCS filesystem
    assert paths.check("ram://x", "--workdir") == "ram://x"


@pytest.mark.parametrize("path, hint", [("s3://bucket/run", "tensorflow-io"), ("nope://x/y", "plugin")])
def test_a_scheme_without_a_filesystem_is_refused_in_one_line(path, hint):
    with pytest.raises(paths.PathError, match=f"--workdir {path}: TensorFlow .* has no filesystem for .*{hint}"):
        paths.check(path, "--workdir")


@pytest.mark.parametrize("argv", [
    ["train", "--smoke", "--workdir", "s3://bucket/run"],
    ["train", "--smoke", "--workdir", "runs/x", "--model-base-path", "s3://bucket/models"],
    ["data", "convert", "--dataset", "mnist-sample", "--output", "s3://bucket/data"],
    ["export", "--workdir", "s3://bucket/run"],
    ["evaluate", "--model-base-path", "s3://bucket/models"],
    ["train", "--smoke", "--dataset", "tfrecord:s3://bucket/data", "--workdir", "runs/x"],
])
def test_every_command_refuses_the_scheme_before_any_work(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert aekit_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "s3://" in err and "tensorflow-io" in err, err
    assert not (tmp_path / "s3:").exists()  # never a local folder named after the URL
    assert not (tmp_path / "runs" / "x" / "checkpoints").exists()  # nothing trained


def test_serve_refuses_the_scheme_in_one_line(capsys):
    assert serving_main.main(["--engine=embedded", "--port=0", "--model_base_path=s3://bucket/models"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert any("s3://" in line and "tensorflow-io" in line for line in err)


def test_write_text_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = str(tmp_path / "history.json")
    paths.write_text(target, "old")
    paths.write_text(target, "new")
    assert paths.read_text(target) == "new" and os.listdir(tmp_path) == ["history.json"]
    paths.write_text("ram://texts/h.json", "in memory")
    assert paths.read_text("ram://texts/h.json") == "in memory"


def test_check_writable(tmp_path):
    assert paths.check_writable(str(tmp_path / "new" / "models"), "--model-base-path")
    assert os.listdir(tmp_path / "new" / "models") == []  # the probe is removed
    (tmp_path / "file").write_text("x")
    with pytest.raises(paths.PathError, match="is not writable"):
        paths.check_writable(str(tmp_path / "file" / "sub"), "--model-base-path")


@pytest.mark.parametrize("where", ["ram", "local"])
def test_train_export_serve_and_call_on_one_path_layer(where, tmp_path):
    # The workdir (checkpoints, TensorBoard, history, config) and the model base path on ram:// or
    # local disk: the server polls, loads and serves the version from the same path layer.
    root = f"ram://e2e-{os.getpid()}" if where == "ram" else str(tmp_path)
    cfg = TrainConfig(model="dense", epochs=1, max_examples=256, batch_size=64, workdir=paths.join(root, "run"),
                      model_base_path=paths.join(root, "models"))
    result = jobs.train_job(cfg)
    assert result["export"] == paths.join(root, "models", "1")
    assert paths.listdir(cfg.model_base_path) == ["1"]  # no staging copy, no partial version left
    for name in ("config.json", "history.json", "checkpoints", "tensorboard"):
        assert paths.exists(paths.join(root, "run", name)), name
    if where == "local":
        assert not any(p.startswith("ram:") for p in os.listdir("."))
    server = serving_main.EmbeddedServer(serving_main.parse_flags(
        ["--port=0", "--model_name=ae", f"--model_base_path={cfg.model_base_path}"]))
    server.start()
    try:
        with AutoencoderClient(f"localhost:{server.grpc_port}", "ae") as client:
            assert client.wait_until_available(timeout=60) == 1
            images = data.load_arrays("mnist-sample").x_test[:4].astype(np.float32) / 255.0
            served = client.denoise(images)
        loaded = tf.saved_model.load(result["export"])
        np.testing.assert_allclose(served, loaded.signatures["denoise"](images=images)["reconstruction"].numpy(),
                                   atol=1e-5)
    finally:
        server.stop(grace=1)
