"""Export: signatures (names, shapes, dtypes) equal the Keras model, warmup, atomic versions."""

from __future__ import annotations

import dataclasses
import os
import posixpath
import socket
import threading

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from storage import paths
from training import anomaly, data, endpoints, export, jobs, scoring, train
from training.config import ConfigError, TrainConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    arrays = data.load_arrays("mnist-sample")
    arrays = data.Arrays(arrays.x_train[:128], arrays.y_train[:128], arrays.x_test[:64], arrays.y_test[:64])
    workdir = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(model="conv", latent_dim=16, epochs=1, batch_size=64, workdir=str(workdir), export=False)
    state, _ = train.train_and_evaluate(cfg, arrays, tf.distribute.get_strategy())
    return cfg, state, arrays


def test_export_signatures_match_keras(tmp_path, trained):
    cfg, state, arrays = trained
    cfg.model_base_path = str(tmp_path / "models")
    version_dir, created = jobs.export_trained(state, cfg, arrays)
    assert created and os.path.basename(version_dir) == "1"
    loaded = tf.saved_model.load(str(version_dir))
    assert set(loaded.signatures) == {"encode", "decode", "denoise", "score", "serving_default", "compress",
                                      "decompress"}

    def io(name):
        fn = loaded.signatures[name]
        inputs = {k: (tuple(v.shape), v.dtype) for k, v in fn.structured_input_signature[1].items()}
        outputs = {k: (tuple(v.shape), v.dtype) for k, v in fn.structured_outputs.items()}
        return inputs, outputs

    image = (None, 28, 28, 1)
    assert io("encode") == ({"images": (image, tf.float32)}, {"latent": ((None, 16), tf.float32)})
    assert io("decode") == ({"latent": ((None, 16), tf.float32)}, {"reconstruction": (image, tf.float32)})
    assert io("denoise") == io("serving_default") == ({"images": (image, tf.float32)},
                                                      {"reconstruction": (image, tf.float32)})
    assert io("compress") == ({"images": (image, tf.float32)}, {"codes": ((None, 16), tf.uint8)})
    assert io("decompress") == ({"codes": ((None, 16), tf.uint8)}, {"images": (image, tf.float32)})
    assert io("score")[1] == {"error": ((None,), tf.float32), "is_anomaly": ((None,), tf.bool),
                              "threshold": ((None,), tf.float32), "threshold_fpr": ((None,), tf.float32),
                              "error_map": (image, tf.float32), "anomaly_score": ((None,), tf.float32),
                              "latent_distance": ((None,), tf.float32), "blurred_error": ((None,), tf.float32),
                              "anomaly_score_kind": ((None,), tf.string)}

    x = data.scale_to_unit(tf.constant(arrays.x_test[:5])).numpy()
    np.testing.assert_allclose(loaded.signatures["denoise"](images=x)["reconstruction"].numpy(),
                               state.autoencoder(x).numpy(), atol=1e-5)
    score = loaded.signatures["score"](images=x)
    served = anomaly.score_examples(loaded.signatures["score"], arrays.x_test)["anomaly_score"]
    threshold = export.calibrate_threshold(served, 1 - cfg.anomaly_quantile).value
    np.testing.assert_allclose(score["threshold"].numpy(), threshold, rtol=1e-5)
    np.testing.assert_allclose(score["threshold_fpr"].numpy(), 1 - cfg.anomaly_quantile, rtol=1e-6)
    np.testing.assert_array_equal(score["is_anomaly"].numpy(), score["anomaly_score"].numpy() > threshold)
    assert score["anomaly_score_kind"].numpy().tolist() == [cfg.anomaly_score.encode()] * len(x)


def test_warmup_file_has_records_for_every_signature(tmp_path, trained):
    cfg, state, arrays = trained
    cfg.model_base_path = str(tmp_path / "models")
    version_dir, _ = jobs.export_trained(state, cfg, arrays)
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(os.path.join(version_dir, export.WARMUP_FILE))]
    names = [r.predict_log.request.model_spec.signature_name for r in records]
    assert set(names) == {"encode", "decode", "denoise", "score", "serving_default", "compress", "decompress"}
    assert len(records) == 7 * endpoints.WARMUP_RECORDS_PER_SIGNATURE


def test_quantization_ranges_are_the_training_codes_min_and_max(tmp_path, trained):
    cfg, state, arrays = trained
    cfg.model_base_path = str(tmp_path / "models")
    version_dir, _ = jobs.export_trained(state, cfg, arrays)
    codes = state.encoder(data.scale_to_unit(tf.constant(arrays.x_train)), training=False).numpy()
    metadata = endpoints.read_compression_metadata(version_dir)
    np.testing.assert_allclose(metadata["low"], codes.min(0), atol=1e-5)
    np.testing.assert_allclose(metadata["high"], np.maximum(codes.max(0), codes.min(0) + 1e-6), atol=1e-5)
    test_codes = state.encoder(data.scale_to_unit(tf.constant(arrays.x_test)), training=False).numpy()
    assert not np.allclose(metadata["high"], np.maximum(test_codes.max(0), test_codes.min(0) + 1e-6), atol=1e-5)


def test_versions_increase_and_only_version_folders_remain(tmp_path, trained):
    cfg, state, arrays = trained
    cfg.model_base_path = str(tmp_path / "models")
    (tmp_path / "models" / "7").mkdir(parents=True)
    assert os.path.basename(jobs.export_trained(state, cfg, arrays)[0]) == "8"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["7", "8"]


def test_no_partial_version_is_ever_visible(tmp_path, trained):
    cfg, state, arrays = trained
    base = tmp_path / "models"
    cfg.model_base_path = str(base)
    seen_incomplete, done = [], threading.Event()

    def watch():  # what a polling TF Serving would see
        while not done.is_set():
            for p in list(base.glob("[0-9]*")):
                if not (p / "saved_model.pb").exists() or not (p / "variables").exists():
                    seen_incomplete.append(p.name)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        jobs.export_trained(state, cfg, arrays)
    finally:
        done.set()
        watcher.join()
    assert seen_incomplete == []


def test_a_failed_check_publishes_nothing(tmp_path, trained, monkeypatch):
    cfg, state, arrays = trained
    cfg.model_base_path = str(tmp_path / "models")

    def mismatch(*args, **kwargs):
        raise export.ExportError("signature 'denoise' output 'reconstruction' differs from the Keras model by 1")

    monkeypatch.setattr(export, "verify_export", mismatch)
    with pytest.raises(export.ExportError, match="differs"):
        jobs.export_trained(state, cfg, arrays)
    assert list((tmp_path / "models").iterdir()) == []


def test_verify_export_catches_a_real_mismatch(tmp_path, trained):
    cfg, state, arrays = trained
    x = data.scale_to_unit(tf.constant(arrays.x_test[:4])).numpy()
    written, stats = export.Threshold(0.01, 0.01, 64), scoring.fit_on_split(state.encoder, state.decoder,
                                                                           arrays.x_train, "mse")
    export.build_archive(state.encoder, state.decoder, written, stats=stats).write_out(str(tmp_path / "v"),
                                                                                      verbose=False)
    with pytest.raises(export.ExportError, match="score"):  # threshold differs
        export.verify_export(tmp_path / "v", state.encoder, state.decoder, export.Threshold(0.5, 0.01, 64), x,
                             stats=stats)
    with pytest.raises(export.ExportError, match="threshold_fpr"):  # how it was chosen differs
        export.verify_export(tmp_path / "v", state.encoder, state.decoder, export.Threshold(0.01, 0.05, 64), x,
                             stats=stats)
    moved = dataclasses.replace(stats, code_mean=stats.code_mean + 1.0)  # a stored statistic differs
    with pytest.raises(export.ExportError, match="latent_distance"):
        export.verify_export(tmp_path / "v", state.encoder, state.decoder, written, x, stats=moved)


def test_export_job_needs_a_trained_workdir(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        jobs.export_job(str(tmp_path))
    TrainConfig(workdir=str(tmp_path)).save(tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint"):
        jobs.export_job(str(tmp_path))


def test_rerunning_an_export_of_the_same_step_publishes_nothing_new_unless_forced(tmp_path, trained):
    cfg, state, arrays = trained
    cfg.model_base_path = str(tmp_path / "models")
    first, created = jobs.export_trained(state, cfg, arrays)
    again, created_again = jobs.export_trained(state, cfg, arrays)
    assert created and not created_again and again == first
    forced, created_forced = jobs.export_trained(state, cfg, arrays, force=True)
    assert created_forced and os.path.basename(forced) == "2"
    assert sorted(os.listdir(tmp_path / "models")) == ["1", "2"]


def test_stale_staging_folders_are_removed_and_live_ones_kept(tmp_path, trained):
    cfg, state, arrays = trained
    base = tmp_path / "models"
    cfg.model_base_path = str(base)
    dead = subprocess_pid_that_exited()
    host = socket.gethostname()
    for name in (f".tmp-export-3-{host}-{dead}", f".tmp-export-4-{dead}", f".tmp-export-5-{host}-{os.getpid()}"):
        (base / name / "variables").mkdir(parents=True)
        (base / name / "variables" / "variables.index").write_bytes(b"half")
    old = base / ".tmp-export-6-otherhost-12"
    (old / "variables").mkdir(parents=True)
    (old / "variables" / "x").write_bytes(b"half")
    stamp = os.stat(old / "variables" / "x").st_mtime - export.STALE_STAGING_SECONDS - 10
    os.utime(old / "variables" / "x", (stamp, stamp))
    (base / ".tmp-export-7-otherhost-13").mkdir()  # another host's export, still fresh: kept
    jobs.export_trained(state, cfg, arrays)
    assert sorted(os.listdir(base)) == [".tmp-export-5-" + f"{host}-{os.getpid()}", ".tmp-export-7-otherhost-13", "1"]


def subprocess_pid_that_exited() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_object_store_publish_copies_saved_model_pb_last(trained, monkeypatch):
    cfg, state, arrays = trained
    # ram:// stands in for a bucket: no rename, files copied one by one (and it lists children by
    # bare name prefix, so assets/ seems to hold assets.extra's files: publish must not copy those).
    cfg.model_base_path = f"ram://bucket-{os.getpid()}/models"
    copied, real_copy = [], tf.io.gfile.copy

    def recording_copy(src, dst, overwrite=False):
        copied.append(dst)
        if dst.endswith("saved_model.pb"):  # at this moment every other file must be complete
            staged, published = src[: -len("saved_model.pb")], dst[: -len("saved_model.pb")]
            for d, _, names in tf.io.gfile.walk(staged):
                for n in names:
                    source = posixpath.join(d, n)
                    if n != "saved_model.pb" and tf.io.gfile.exists(source):
                        assert tf.io.gfile.exists(published + source[len(staged):]), source
        real_copy(src, dst, overwrite=overwrite)

    monkeypatch.setattr(tf.io.gfile, "copy", recording_copy)
    version_dir, _ = jobs.export_trained(state, cfg, arrays)
    assert version_dir == cfg.model_base_path + "/1"
    assert copied[-1] == version_dir + "/saved_model.pb" and len(copied) > 3
    assert any(c.endswith("assets.extra/tf_serving_warmup_requests") for c in copied)
    assert paths.listdir(cfg.model_base_path) == ["1"]  # the staging copy is gone
    assert "denoise" in tf.saved_model.load(version_dir).signatures


def test_a_failed_object_store_copy_raises_once_instead_of_retrying(trained, monkeypatch):
    cfg, state, arrays = trained
    cfg.model_base_path = f"ram://broken-{os.getpid()}/models"
    calls = []

    def failing_copy(src, dst, overwrite=False):
        calls.append(dst)
        raise tf.errors.NotFoundError(None, None, f"{src} vanished")

    monkeypatch.setattr(tf.io.gfile, "copy", failing_copy)
    with pytest.raises(tf.errors.NotFoundError):
        jobs.export_trained(state, cfg, arrays)
    assert len(calls) == 1  # one attempt, not a new version number per retry
    assert paths.listdir(cfg.model_base_path) == []  # the staging copy is gone


def test_an_unwritable_model_base_path_fails_before_training(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    cfg = TrainConfig(model="dense", smoke=True, workdir=str(tmp_path / "run"),
                      model_base_path=str(tmp_path / "a-file" / "models"))
    with pytest.raises(paths.PathError, match="--model-base-path .* is not writable"):
        jobs.train_job(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained
