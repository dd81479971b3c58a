"""Anomaly detection: class filtering, exact FPR calibration, AUROC/AP, error_map, recalibrating export."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from training import anomaly, convert, data, export, jobs, models, scoring, train
from training.config import ConfigError, TrainConfig
from training.evaluate import latest_version_dir


def labelled(train_labels, test_labels) -> data.Arrays:
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    images = lambda n: np.arange(n * 16, dtype=np.uint8).reshape(n, 4, 4, 1)  # noqa: E731
    return data.Arrays(images(len(train_labels)), train_labels, images(len(test_labels)), test_labels)


def test_normal_split_keeps_only_the_normal_labels_in_both_splits():
    arrays = labelled([0, 1, 2, 1, 0, 7], [1, 2, 7, 0, 7])
    normal = anomaly.normal_split(arrays, anomaly.parse_classes("7,0"), "toy")
    assert normal.y_train.tolist() == [0, 0, 7] and normal.y_test.tolist() == [7, 0, 7]
    np.testing.assert_array_equal(normal.x_train, arrays.x_train[[0, 4, 5]])
    np.testing.assert_array_equal(normal.x_test, arrays.x_test[[2, 3, 4]])


@pytest.mark.parametrize("arrays, classes, message", [
    (labelled([0, 0, 0], [0, 0]), "3", "needs a labelled source"),
    (labelled([0, 1, 2], [0, 1, 2]), "5", "no training examples of class 5"),
    (labelled([0, 1, 2], [0, 1]), "2", "no held-out examples of class 2"),
    (labelled([0, 1], [0, 1]), "0,1", "leave at least one out"),
])
def test_normal_split_errors_say_what_to_do(arrays, classes, message):
    with pytest.raises(ConfigError, match=message):
        anomaly.normal_split(arrays, anomaly.parse_classes(classes), "toy")


def test_parse_classes_rejects_what_is_not_a_label():
    assert anomaly.parse_classes(" 3, 1,3") == (1, 3)
    with pytest.raises(ConfigError, match="integer labels"):
        anomaly.parse_classes("three")


@pytest.mark.parametrize("count, fpr, flagged", [(1000, 0.01, 10), (1000, 0.05, 50), (250, 0.01, 2), (7, 0.1, 0)])
def test_threshold_flags_exactly_the_requested_fraction(count, fpr, flagged):
    errors = np.random.default_rng(count).permutation(np.linspace(0.001, 0.5, count))
    threshold = export.calibrate_threshold(errors, fpr)
    assert int(np.sum(errors > threshold.value)) == flagged
    # the served graph's float32 rounding moves scores in the last bits: no example may flip
    for nudge in (1 - 1e-7, 1 + 1e-7):
        assert int(np.sum(errors * nudge > threshold.value)) == flagged
    assert (threshold.fpr, threshold.examples) == (fpr, count)


def test_detection_metrics_on_a_hand_computed_case():
    # normal 0.1 0.2 0.3 0.6 | anomalies 0.4 0.5 0.7: of the 12 (anomaly, normal) pairs, the
    # anomaly scores higher in 10 (0.4 and 0.5 lose to 0.6) -> AUROC 10/12. Ranked by score:
    # 0.7 A, 0.6 N, 0.5 A, 0.4 A: precision at each anomaly 1, 2/3, 3/4 -> AP (1 + 2/3 + 3/4) / 3.
    m = anomaly.detection_metrics(np.array([0.1, 0.2, 0.3, 0.6]), np.array([0.4, 0.5, 0.7]), threshold=0.45)
    assert m["auroc"] == pytest.approx(10 / 12)
    assert m["average_precision"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # flagged above 0.45: 0.6 (normal), 0.5 and 0.7 (anomalies)
    assert m["fpr"] == pytest.approx(1 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """An untrained dense autoencoder on 8x8 images with the combined score, exported once (~3 s):
    the statistics do not need a trained model to be checked."""
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    train_x, test_x = (rng.random((n, 8, 8, 1)).astype(np.float32) for n in (40, 30))
    encoder, decoder = models.build_autoencoder("dense", (8, 8, 1), 4)
    stats = scoring.fit_on_split(encoder, decoder, train_x, "combined")
    threshold = export.calibrate_threshold(scoring.anomaly_scores(encoder, decoder, test_x, stats), 0.1, stats.kind)
    version_dir, _ = export.export_version(encoder, decoder, str(root / "models"), threshold, test_x[:8], stats=stats)
    return {"encoder": encoder, "decoder": decoder, "train": train_x, "test": test_x, "threshold": threshold,
            "loaded": tf.saved_model.load(version_dir)}


def numpy_statistics(encoder, decoder, x, sigma=scoring.BLUR_SIGMA, shrinkage=scoring.SHRINKAGE):
    """The combined score's pieces computed with numpy and scipy alone: codes, their mean and
    regularised inverse covariance, the squared Mahalanobis and blurred-residual functions."""
    codes = encoder(x, training=False).numpy().astype(np.float64)
    covariance = np.cov(codes.T)
    ridge = shrinkage * np.trace(covariance) / codes.shape[1]
    mean, precision = codes.mean(axis=0), np.linalg.inv(covariance + ridge * np.eye(codes.shape[1]))

    def distance(images):
        z = encoder(images, training=False).numpy().astype(np.float64) - mean
        return np.einsum("ij,jk,ik->i", z, precision, z)

    def blurred(images):
        residual = decoder(encoder(images, training=False), training=False).numpy().astype(np.float64) - images
        smooth = ndimage.gaussian_filter(residual, (0, sigma, sigma, 0), mode="constant", truncate=4.0)
        squares = np.square(smooth).reshape(len(images), -1)
        peak = -(-squares.shape[1] // scoring.PEAK_SHARE)  # the largest 1/20, rounded up: 4 of 64 pixels here
        return np.sort(squares, axis=1)[:, -peak:].mean(axis=1)

    return mean, precision, distance, blurred


def stored_variables(loaded) -> dict[str, np.ndarray]:
    # keras.export.ExportArchive keeps every tracked variable in `_all_variables`; the names are ours
    return {v.name.split(":")[0]: v.numpy() for v in loaded._all_variables}


def test_stored_statistics_equal_numpys_on_the_training_codes(small_export):
    mean, precision, distance, blurred = numpy_statistics(small_export["encoder"], small_export["decoder"],
                                                          small_export["train"])
    stored = stored_variables(small_export["loaded"])
    np.testing.assert_allclose(stored["code_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored["code_precision"], precision, rtol=1e-3, atol=1e-3 * np.abs(precision).max())
    np.testing.assert_allclose(stored["median_distance"], np.median(distance(small_export["train"])), rtol=1e-3)
    np.testing.assert_allclose(stored["median_blurred"], np.median(blurred(small_export["train"])), rtol=1e-4)
    radius = int(4.0 * scoring.BLUR_SIGMA + 0.5)  # scipy's truncate=4.0
    line = np.exp(-0.5 * (np.arange(-radius, radius + 1) / scoring.BLUR_SIGMA) ** 2)
    np.testing.assert_allclose(stored["blur_kernel"], np.outer(line, line) / line.sum() ** 2, rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 8, 8, 3), (3, 3, 7, 2), (2, 2, 2, 1)])
def test_blurred_error_is_the_mean_of_the_largest_twentieth_of_values_per_channel(shape):
    rng = np.random.default_rng(0)
    images, reconstruction = rng.random(shape, np.float32), rng.random(shape, np.float32)
    got = scoring.blurred_error(images, reconstruction, tf.constant(scoring.gaussian_kernel())).numpy()
    smooth = ndimage.gaussian_filter((reconstruction - images).astype(np.float64), (0, scoring.BLUR_SIGMA,
                                     scoring.BLUR_SIGMA, 0), mode="constant", truncate=4.0)
    squares = np.square(smooth).reshape(shape[0], -1)
    peak = -(-squares.shape[1] // scoring.PEAK_SHARE)  # 10 of 192 values, 3 of 42, 1 of 4
    np.testing.assert_allclose(got, np.sort(squares, axis=1)[:, -peak:].mean(axis=1), rtol=1e-5)


def test_served_combined_score_equals_a_numpy_computation(small_export):
    encoder, decoder, train_x = small_export["encoder"], small_export["decoder"], small_export["train"]
    _, _, distance, blurred = numpy_statistics(encoder, decoder, train_x)
    x = np.concatenate([small_export["test"][:3], np.zeros((1, 8, 8, 1), np.float32)])  # and a blank input
    got = {k: v.numpy() for k, v in small_export["loaded"].signatures["score"](images=x).items()}
    want = (np.log(distance(x) / np.median(distance(train_x))) + np.log(blurred(x) / np.median(blurred(train_x))))
    np.testing.assert_allclose(got["latent_distance"], distance(x), rtol=1e-3)
    np.testing.assert_allclose(got["blurred_error"], blurred(x), rtol=1e-4)
    np.testing.assert_allclose(got["anomaly_score"], want, rtol=1e-3, atol=1e-3)
    assert got["anomaly_score_kind"].tolist() == [b"combined"] * len(x)


def test_threshold_is_on_the_served_score_and_error_is_still_the_mean_of_error_map(small_export):
    score = small_export["loaded"].signatures["score"]
    got = anomaly.score_examples(score, small_export["test"])
    threshold = small_export["threshold"]
    # calibrated on the served score (computed eagerly at export; the graph agrees to float32 rounding)
    assert threshold.score == "combined"
    assert threshold.value == pytest.approx(export.calibrate_threshold(got["anomaly_score"], 0.1).value, rel=1e-5)
    np.testing.assert_array_equal(got["is_anomaly"], got["anomaly_score"] > np.float32(threshold.value))
    assert int(got["is_anomaly"].sum()) == 3  # floor(0.1 * 30)
    assert not np.allclose(got["anomaly_score"], got["error"])
    np.testing.assert_allclose(got["error_map"].mean(axis=(1, 2, 3)), got["error"], rtol=1e-6)


@pytest.fixture(scope="module")
def one_class_run(tmp_path_factory):
    """A tiny conv model trained on digit 1 only, exported once."""
    root = tmp_path_factory.mktemp("one-class")
    cfg = TrainConfig(model="conv", latent_dim=16, epochs=2, batch_size=16, normal_classes="1",
                      threshold_fpr=0.05, workdir=str(root / "run"), model_base_path=str(root / "models"))
    result = jobs.train_job(cfg)
    return cfg, result


@pytest.mark.slow  # trains a small model once for the module (~15 s)
def test_training_on_normal_classes_calibrates_on_held_out_normal_data(one_class_run):
    cfg, result = one_class_run
    loaded = tf.saved_model.load(result["export"])
    normal = jobs.load_training_source(cfg)
    assert set(normal.train.y.tolist()) == set(normal.test.y.tolist()) == {1}
    assert normal.test.count == len(normal.test.x)
    scores = anomaly.score_examples(loaded.signatures["score"], normal.test.x)
    assert np.all(scores["threshold_fpr"] == np.float32(0.05)) and set(scores["anomaly_score_kind"]) == {b"combined"}
    assert int(np.sum(scores["is_anomaly"])) == int(np.floor(0.05 * len(normal.test.x)))
    np.testing.assert_array_equal(scores["is_anomaly"], scores["anomaly_score"] > scores["threshold"])


@pytest.mark.slow  # trains a small model once for the module (~15 s)
def test_error_map_has_the_input_shape_and_sums_to_error_times_pixels(one_class_run):
    _, result = one_class_run
    loaded = tf.saved_model.load(result["export"])
    x = np.random.default_rng(0).random((3, 28, 28, 1)).astype(np.float32)
    score = {k: v.numpy() for k, v in loaded.signatures["score"](images=x).items()}
    assert score["error_map"].shape == x.shape
    np.testing.assert_allclose(score["error_map"].sum(axis=(1, 2, 3)), score["error"] * 28 * 28, rtol=1e-5)


@pytest.mark.slow  # trains a small model once for the module (~15 s)
def test_export_recalibrates_without_retraining(one_class_run):
    cfg, result = one_class_run
    before = tf.saved_model.load(result["export"])
    same_dir, created = jobs.export_job(cfg.workdir)  # the same step and rate: already exported
    assert (same_dir, created) == (result["export"], False)
    after_dir, created = jobs.export_job(cfg.workdir, threshold_fpr=0.2)  # a new rate is a new version
    assert created and after_dir != result["export"]
    assert jobs.export_job(cfg.workdir, threshold_fpr=0.2) == (after_dir, False)
    after = tf.saved_model.load(after_dir)
    x = anomaly.score_examples  # the same held-out normal digits through both versions
    normal = jobs.load_training_source(cfg).test.x
    old, new = x(before.signatures["score"], normal), x(after.signatures["score"], normal)
    np.testing.assert_allclose(new["error"], old["error"], atol=1e-6)  # same weights
    assert np.all(new["threshold_fpr"] == np.float32(0.2)) and new["threshold"][0] < old["threshold"][0]
    assert int(np.sum(new["is_anomaly"])) == int(np.floor(0.2 * len(normal)))


@pytest.mark.slow  # trains a small model once for the module (~15 s)
def test_evaluate_anomaly_reports_detection_quality(one_class_run, tmp_path):
    cfg, _ = one_class_run
    report = anomaly.evaluate_anomaly(cfg.model_base_path, "mnist-sample", normal_classes="1")
    test = data.load_arrays("mnist-sample")
    ones = test.y_test == 1
    assert (report["normal_examples"], report["anomaly_examples"]) == (int(ones.sum()), int((~ones).sum()))
    loaded = tf.saved_model.load(str(latest_version_dir(cfg.model_base_path)))
    scores = anomaly.score_examples(loaded.signatures["score"], test.x_test)["anomaly_score"]
    expected = anomaly.detection_metrics(scores[ones], scores[~ones], report["threshold"])
    assert report["anomaly_score"] == "combined"
    assert {k: report[k] for k in expected} == pytest.approx(expected)
    noise = np.random.default_rng(0).random((20, 28, 28, 1)).astype(np.float32)
    np.savez(tmp_path / "noise.npz", x_train=noise[:10], x_test=noise[10:])
    report = anomaly.evaluate_anomaly(cfg.model_base_path, "mnist-sample", anomalies=f"npz:{tmp_path / 'noise.npz'}")
    assert report["anomaly_examples"] == 20 and report["auroc"] == 1.0
    with pytest.raises(ConfigError, match="one of --normal-classes"):
        anomaly.evaluate_anomaly(cfg.model_base_path, "mnist-sample")
    json.dumps(report)


@pytest.mark.slow  # trains a small model once for the module (~15 s)
def test_evaluate_anomaly_streams_a_tfrecord_source_like_the_same_data_in_memory(one_class_run, tmp_path):
    cfg, _ = one_class_run
    convert.convert("mnist-sample", str(tmp_path / "shards"), shards=4)
    streamed = anomaly.evaluate_anomaly(cfg.model_base_path, f"tfrecord:{tmp_path / 'shards'}", normal_classes="1")
    in_memory = anomaly.evaluate_anomaly(cfg.model_base_path, "mnist-sample", normal_classes="1")
    assert streamed == pytest.approx(in_memory)


def test_normal_classes_of_a_streamed_source_are_written_once_and_streamed(tmp_path, capsys):
    convert.convert("mnist-sample", str(tmp_path / "shards"), shards=2)
    arrays = data.load_arrays("mnist-sample")
    cfg = TrainConfig(dataset=f"tfrecord:{tmp_path / 'shards'}", normal_classes="1,7", workdir=str(tmp_path / "run"))
    source = jobs.load_training_source(cfg)
    copy = tmp_path / "run" / "normal-classes" / "local"
    assert "writing the examples of class 1,7" in capsys.readouterr().out
    assert not source.train.in_memory and set(source.train.files) <= {str(p) for p in copy.glob("train-*")}
    for split, y in (("train", arrays.y_train), ("test", arrays.y_test)):
        got = convert.labels(getattr(source, split))
        assert len(got) == int(np.isin(y, [1, 7]).sum()) and set(got.tolist()) == {1, 7}
    written = {p: p.stat().st_mtime_ns for p in copy.iterdir()}
    jobs.load_training_source(cfg)  # the same source and classes: the copy is reused, not rewritten
    assert "writing" not in capsys.readouterr().out and {p: p.stat().st_mtime_ns for p in copy.iterdir()} == written
    (copy / "metadata.json").unlink()  # as a run killed while writing it leaves the copy
    assert jobs.load_training_source(cfg).train.count == int(np.isin(arrays.y_train, [1, 7]).sum())
    assert "writing" in capsys.readouterr().out
    ones = jobs.load_training_source(dataclasses.replace(cfg, normal_classes="1"))  # other classes: rewritten
    assert "the copy there holds class 1,7" in capsys.readouterr().out
    assert set(convert.labels(ones.train).tolist()) == {1}
    with pytest.raises(ConfigError, match=r"^--normal-classes 1,11: .* has no training examples of class 11"):
        jobs.load_training_source(dataclasses.replace(cfg, normal_classes="1,11"))
    with pytest.raises(ConfigError, match="is the normal-classes copy of an earlier run"):  # would delete itself
        jobs.load_training_source(dataclasses.replace(cfg, dataset=f"tfrecord:{copy}", normal_classes="7"))
    assert (copy / "metadata.json").exists()


def test_a_sigterm_while_writing_the_copy_stops_before_anything_is_trained(tmp_path):
    convert.convert("mnist-sample", str(tmp_path / "shards"), shards=2)
    cfg = TrainConfig(dataset=f"tfrecord:{tmp_path / 'shards'}", normal_classes="3", workdir=str(tmp_path / "run"))
    stop = train.StopSignal()
    stop.requested = True  # as its SIGTERM handler sets it
    with pytest.raises(train.Preempted, match="while writing the normal classes"):
        jobs.load_training_source(cfg, None, stop)
    assert not (tmp_path / "run" / "normal-classes" / "local" / "metadata.json").exists()


def test_a_re_converted_source_makes_the_copy_stale(tmp_path, capsys):
    convert.convert("mnist-sample", str(tmp_path / "shards"), shards=2)
    cfg = TrainConfig(dataset=f"tfrecord:{tmp_path / 'shards'}", normal_classes="3", workdir=str(tmp_path / "run"))
    jobs.load_training_source(cfg)
    capsys.readouterr()
    shutil.rmtree(tmp_path / "shards")
    convert.convert("mnist-sample", str(tmp_path / "shards"), shards=3)  # the same examples, other files
    jobs.load_training_source(cfg)
    assert "made from other source files" in capsys.readouterr().out


@pytest.mark.slow  # a smoke training run (~10 s)
def test_train_normal_classes_on_a_streamed_source_trains_and_calibrates_on_those_classes(tmp_path, capsys):
    convert.convert("mnist-sample", str(tmp_path / "shards"), shards=2)
    cfg = TrainConfig(dataset=f"tfrecord:{tmp_path / 'shards'}", normal_classes="1", smoke=True,
                      workdir=str(tmp_path / "run"), model_base_path=str(tmp_path / "models"))
    jobs.train_job(cfg)
    ones = int(np.sum(data.load_arrays("mnist-sample").y_test == 1))
    assert f"of {ones} held-out normal examples" in capsys.readouterr().out  # calibrated on the 1s alone
    report = anomaly.evaluate_anomaly(cfg.model_base_path, cfg.dataset, normal_classes="1")
    assert report["normal_examples"] == ones and report["auroc"] > 0.5


def test_normal_classes_filters_an_in_memory_source_with_its_counts():
    source = anomaly.normal_source(labelled([1, 2, 1, 3], [2, 1, 3]).source("toy"), (1,), "toy", "unused")
    assert (source.train.count, source.test.count) == (2, 1) and source.train.y.tolist() == [1, 1]


def test_an_unknown_anomaly_score_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="--anomaly-score must be one of mse, combined"):
        TrainConfig(anomaly_score="mahalanobis")


@pytest.mark.slow  # trains a small model once for the module (~15 s)
def test_export_can_switch_the_served_score_to_mse(one_class_run):
    cfg, result = one_class_run
    mse_dir, created = jobs.export_job(cfg.workdir, anomaly_score="mse")  # a new score is a new version
    assert created and mse_dir != result["export"]
    normal = jobs.load_training_source(cfg).test.x
    got = anomaly.score_examples(tf.saved_model.load(mse_dir).signatures["score"], normal)
    assert set(got["anomaly_score_kind"]) == {b"mse"}
    np.testing.assert_array_equal(got["anomaly_score"], got["error"])
    np.testing.assert_array_equal(got["is_anomaly"], got["error"] > got["threshold"])
