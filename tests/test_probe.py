"""Recognition: the probe's classifiers on data whose answer is known, the classify signatures, and
`aekit evaluate --probe` / `aekit client classify` on a tiny exported model."""

from __future__ import annotations

import json

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    input_pb2,
    model_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

import aekit_cli
from clients import AutoencoderClient, RestAutoencoderClient
from serving.core import DataPlane
from serving.grpc_server import GrpcServer
from serving.manager import ModelManager
from serving.rest_server import RestApi, RestServer
from training import data, endpoints, export, models, probe, scoring
from training.config import ConfigError
from training.multiworker import free_ports

CLASSES = 3


def blobs(per_class: int, dim: int, seed: int, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around the corners 10 * e_k: linearly separable with a wide margin."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(CLASSES), per_class)
    centres = 10.0 * np.eye(CLASSES, dim)
    return (centres[y] + spread * rng.standard_normal((len(y), dim))).astype(np.float32), y


def test_separable_blobs_are_classified_perfectly_with_all_and_with_few_labels():
    train_x, train_y = blobs(30, 8, seed=0)
    test_x, test_y = blobs(20, 8, seed=1)
    accuracies = probe.classifier_accuracies(train_x, train_y, test_x, test_y)
    assert accuracies["linear_probe_accuracy"] == accuracies["knn_accuracy"] == 1.0
    assert accuracies["linear_probe_accuracy_10_per_class"] == accuracies["knn_accuracy_10_per_class"] == 1.0


def test_knn_votes_its_five_nearest_neighbours():
    # 1-d, so standardizing keeps the order. Around 9 the five nearest are 10, 11, 12 (class 1) and
    # 2, 1 (class 0): 3 votes to 2 for class 1; around 1.5 they are 1, 2, 0, 10, 11: class 0.
    x = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    knn = probe.fit_knn(x, np.array([0, 0, 0, 1, 1, 1]))
    assert knn.predict([[9.0], [1.5]]).tolist() == [1, 0]


def test_few_per_class_draws_the_same_examples_for_a_seed():
    labels = np.repeat(np.arange(4), 25)
    picked = probe.few_per_class(labels, 10, seed=0)
    assert np.bincount(labels[picked]).tolist() == [10] * 4
    assert np.array_equal(picked, probe.few_per_class(labels, 10, seed=0))
    assert not np.array_equal(picked, probe.few_per_class(labels, 10, seed=1))
    with pytest.raises(ConfigError, match="class 3 has 5"):
        probe.few_per_class(np.concatenate([labels[:75], labels[75:80]]), 10, seed=0)


def test_pca_baseline_equals_a_direct_projection_on_the_top_singular_vectors():
    rng = np.random.default_rng(3)
    train, test = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12)), rng.standard_normal((30, 12))
    got_train, got_test = probe.pca_features(train, test, 4)
    mean = train.mean(axis=0)
    components = np.linalg.svd(train - mean, full_matrices=False)[2][:4]
    for got, x in [(got_train, train), (got_test, test)]:
        want = (x - mean) @ components.T
        signs = np.sign(np.sum(got * want, axis=0))  # each component is defined up to its sign
        np.testing.assert_allclose(got * signs, want, atol=1e-8)


@pytest.mark.parametrize("classes", [2, 3])
def test_linear_probe_weights_reproduce_sklearn_predict_proba(classes):
    x, y = blobs(30, 5, seed=2, spread=6.0)  # overlapping: probabilities away from 0 and 1
    keep = y < classes
    fitted = probe.linear_probe(probe.fit_linear_probe(x[keep], y[keep]))
    logits = (x - fitted.mean) / fitted.scale @ fitted.weights + fitted.bias
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    np.testing.assert_allclose(softmax, fitted.classifier.predict_proba(x), atol=1e-5)
    assert fitted.class_ids.tolist() == list(range(classes))


def test_an_unlabelled_source_is_one_line():
    with pytest.raises(ConfigError, match="needs a labelled source") as caught:
        probe.check_labelled(np.zeros(10, np.int64), "x.npy")
    assert "\n" not in str(caught.value)


# ---- a tiny exported model with the classify signatures --------------------------------------

def digit_like_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """4x4 uint8 images: class k lights up row k, with noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(CLASSES), per_class).astype(np.int64)
    x = rng.integers(0, 60, (len(y), 4, 4))
    x[np.arange(len(y)), y, :] += 180
    return x.astype(np.uint8), y


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    (x_train, y_train), (x_test, y_test) = digit_like_images(20, 0), digit_like_images(8, 1)
    np.savez(root / "digits.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    source = data.load_source(f"npz:{root / 'digits.npz'}")
    keras.utils.set_random_seed(0)  # the encoder's weights
    encoder, decoder = models.build_autoencoder("dense", source.input_shape, 6)
    fitted = probe.fit_export_probe(lambda x: encoder(x, training=False), source.train, "digits")
    sample = data.scale_to_unit(x_test[:8, ..., None]).numpy()
    threshold = export.calibrate_threshold(np.linspace(0.0, 1.0, 50), 0.1)
    stats = scoring.fit_on_split(encoder, decoder, source.train, "mse")
    version_dir, _ = export.export_version(encoder, decoder, str(root / "models"), threshold, sample, probe=fitted,
                                           stats=stats)
    return {"root": root, "version_dir": version_dir, "probe": fitted, "encoder": encoder,
            "images": data.scale_to_unit(x_test[..., None]).numpy(), "dataset": f"npz:{root / 'digits.npz'}"}


def test_classify_signatures_have_the_promised_dtypes_and_agree_with_sklearn(exported):
    loaded = tf.saved_model.load(exported["version_dir"])
    images = exported["images"]
    latent = exported["encoder"](images, training=False).numpy()
    want_scores = exported["probe"].classifier.predict_proba(latent)
    got = loaded.signatures["classify"](images=tf.constant(images))
    assert got["classes"].dtype == tf.int64 and got["classes"].shape == (len(images),)
    assert got["scores"].dtype == tf.float32 and got["scores"].shape == (len(images), CLASSES)
    np.testing.assert_allclose(got["scores"].numpy(), want_scores, atol=1e-5)
    assert np.array_equal(got["classes"].numpy(), exported["probe"].classifier.predict(latent))

    examples = tf.constant(endpoints.image_examples(images))
    by_example = loaded.signatures["classify_examples"](inputs=examples)
    assert by_example["classes"].dtype == tf.string and by_example["classes"].shape == (len(images), CLASSES)
    assert by_example["classes"].numpy()[0].tolist() == [b"0", b"1", b"2"]
    np.testing.assert_allclose(by_example["scores"].numpy(), want_scores, atol=1e-5)


def test_evaluate_probe_json_has_the_accuracies_and_baselines(exported, capsys):
    models_dir = str(exported["root"] / "models")
    assert aekit_cli.main(["evaluate", "--probe", "--json", "--model-base-path", models_dir,
                           "--dataset", exported["dataset"]]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = {"linear_probe_accuracy", "knn_accuracy", "linear_probe_accuracy_10_per_class", "knn_accuracy_10_per_class"}
    assert keys <= set(report) and report["code_dim"] == 6 and report["test_examples"] == 24
    assert keys <= set(report["baselines"]["pixels"]) and keys <= set(report["baselines"]["pca"])
    assert report["baselines"]["pixels"]["dim"] == 16 and report["baselines"]["pca"]["dim"] == 6
    assert report["baselines"]["pixels"]["linear_probe_accuracy"] == 1.0  # the rows are separable


def test_evaluate_probe_on_unlabelled_data_is_one_line(exported, tmp_path, capsys):
    np.save(tmp_path / "vectors.npy", np.random.default_rng(0).random((40, 16)).astype(np.float32))
    code = aekit_cli.main(["evaluate", "--probe", "--model-base-path", str(exported["root"] / "models"),
                           "--dataset", str(tmp_path / "vectors.npy")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    # a .npy source has (N, 16) vectors, so the shape check speaks first; both are one line
    assert "shape" in err or "labelled source" in err


@pytest.fixture(scope="module")
def server(exported):
    manager = ModelManager()
    core = DataPlane(manager)
    cfg = model_server_config_pb2.ModelServerConfig()
    cfg.model_config_list.config.add(name="ae", base_path=str(exported["root"] / "models"), model_platform="tensorflow")
    manager.configure(cfg)
    (port,) = free_ports(1)
    grpc_server = GrpcServer(core, [f"127.0.0.1:{port}"], [], 4, True)
    rest_server = RestServer(RestApi(core, None, 30.0), "127.0.0.1", 0, 1 << 24, 2)
    grpc_server.start()
    rest_server.start()
    manager.start_polling(0)
    assert manager.initial_load_done.wait(60)
    try:
        yield {"grpc": f"127.0.0.1:{port}", "rest": f"127.0.0.1:{rest_server.port}"}
    finally:
        grpc_server.stop(0)
        rest_server.stop(0)
        manager.stop()


def test_client_classify_over_grpc_and_rest_and_tf_serving_classify(exported, server, capsys):
    images = exported["images"]
    latent = exported["encoder"](images, training=False).numpy()
    want_scores = exported["probe"].classifier.predict_proba(latent)
    for client in (AutoencoderClient(server["grpc"], "ae"), RestAutoencoderClient(server["rest"], "ae")):
        result = client.classify(images)
        assert result["classes"].dtype == np.int64
        np.testing.assert_allclose(result["scores"], want_scores, atol=1e-5)
        client.close()

    examples = [tf.train.Example.FromString(e) for e in endpoints.image_examples(images[:2])]
    request = classification_pb2.ClassificationRequest(
        model_spec=model_pb2.ModelSpec(name="ae", signature_name="classify_examples"),
        input=input_pb2.Input(example_list=input_pb2.ExampleList(examples=examples)))
    with grpc.insecure_channel(server["grpc"]) as channel:
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Classify(request, timeout=30)
    first = reply.result.classifications[0].classes
    assert [c.label for c in first] == ["0", "1", "2"]
    np.testing.assert_allclose([c.score for c in first], want_scores[0], atol=1e-5)

    rest = RestAutoencoderClient(server["rest"], "ae")
    body = {"signature_name": "classify_examples", "examples": [{"images": images[0].ravel().tolist()}]}
    (row,) = rest.request("POST", "/v1/models/ae:classify", body)["results"]
    assert [label for label, _ in row] == ["0", "1", "2"]
    np.testing.assert_allclose([score for _, score in row], want_scores[0], atol=1e-5)
    rest.close()

    np.save(exported["root"] / "two.npy", images[:2])
    for flags in ([], ["--rest"]):
        address = server["rest"] if flags else server["grpc"]
        assert aekit_cli.main(["client", "classify", "--server", address, "--model", "ae", *flags,
                               "--input", str(exported["root"] / "two.npy")]) == 0
        lines = capsys.readouterr().out.rstrip("\n").splitlines()
        predicted = want_scores[:2].argmax(1)
        assert lines == [f"{i:5d}  class {predicted[i]}  confidence {want_scores[i].max():.4f}" for i in range(2)]
