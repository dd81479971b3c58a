"""End to end: `aekit train` exports, `aekit serve` serves, clients and CLI call it over gRPC and REST."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clients import AutoencoderClient, ClientError, RestAutoencoderClient, loadtest, plots
from tests.model_fixtures import write_tf2
from tests.server_process import ServerProcess, running_server
from training import data
from training.multiworker import free_ports

pytestmark = pytest.mark.slow


def aekit(*args, check=True, timeout=600):
    result = subprocess.run([sys.executable, "-m", "aekit_cli", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"aekit {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    aekit("train", "--smoke", "--model", "conv", "--latent-dim", "16", "--noise-factor", "0.3",
          "--num-logical-devices", "2", "--workdir", str(root / "run"), "--model-base-path", str(root / "models"))
    assert sorted(p.name for p in (root / "models").iterdir()) == ["1"]
    return root


@pytest.fixture(scope="module")
def server(trained):
    flags = ["--model_name=autoencoder", f"--model_base_path={trained / 'models'}", "--enable_batching"]
    with running_server(flags, trained / "server.log", ["autoencoder"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def images():
    arrays = data.load_arrays("mnist-sample")
    return arrays.x_test[:40].astype(np.float32) / 255.0


def test_grpc_and_rest_equal_the_in_process_saved_model(trained, server, images):
    loaded = tf.saved_model.load(str(trained / "models" / "1"))
    expected_latent = loaded.signatures["encode"](images=images)["latent"].numpy()
    expected = {
        "encode": expected_latent,
        "decode": loaded.signatures["decode"](latent=expected_latent)["reconstruction"].numpy(),
        "denoise": loaded.signatures["denoise"](images=images)["reconstruction"].numpy(),
    }
    expected_score = {k: v.numpy() for k, v in loaded.signatures["score"](images=images).items()}
    for client in (AutoencoderClient(server.grpc_address, "autoencoder"),
                   RestAutoencoderClient(f"127.0.0.1:{server.rest_port}", "autoencoder")):
        np.testing.assert_allclose(client.encode(images), expected["encode"], atol=1e-5)
        np.testing.assert_allclose(client.decode(expected_latent), expected["decode"], atol=1e-5)
        np.testing.assert_allclose(client.denoise(images), expected["denoise"], atol=1e-5)
        score = client.score(images)
        np.testing.assert_allclose(score["error"], expected_score["error"], rtol=1e-4)
        np.testing.assert_array_equal(score["is_anomaly"], expected_score["is_anomaly"])
        assert client.status()[0]["state"] == "AVAILABLE"


def test_big_inputs_are_chunked_and_reassembled_in_order(server, images):
    whole = AutoencoderClient(server.grpc_address, "autoencoder").denoise(images)
    chunked_client = AutoencoderClient(server.grpc_address, "autoencoder", max_chunk_bytes=5 * 28 * 28 * 4)
    np.testing.assert_allclose(chunked_client.denoise(images), whole, atol=1e-6)  # 8 chunks of 5


def test_wait_until_available(server):
    assert AutoencoderClient(server.grpc_address, "autoencoder").wait_until_available(10) == 1
    with pytest.raises(ClientError, match="no AVAILABLE version"):
        RestAutoencoderClient(f"127.0.0.1:{server.rest_port}", "nope").wait_until_available(0.5)


def test_names_come_from_metadata(server):
    signatures = AutoencoderClient(server.grpc_address, "autoencoder").signatures()
    assert signatures["encode"].input_alias == "images" and list(signatures["encode"].outputs) == ["latent"]
    assert signatures["decode"].input_alias == "latent"


def test_client_errors_are_one_clear_line(server, images):
    client = AutoencoderClient(server.grpc_address, "nope", retries=0)
    with pytest.raises(ClientError, match="NOT_FOUND: Servable not found for request: Latest\\(nope\\)"):
        client.denoise(images)
    with pytest.raises(ClientError, match=r"must have shape \(N, 28, 28, 1\)"):
        AutoencoderClient(server.grpc_address, "autoencoder").denoise(np.zeros((2, 5, 5, 1)))
    (closed_port,) = free_ports(1)
    with pytest.raises(ClientError, match="UNAVAILABLE: cannot reach a model server"):
        AutoencoderClient(f"127.0.0.1:{closed_port}", retries=1, backoff=0.05).status()
    with pytest.raises(ClientError, match="UNAVAILABLE"):
        RestAutoencoderClient(f"127.0.0.1:{closed_port}", retries=1, backoff=0.05).status()


def test_client_retries_until_a_late_server_is_up(tmp_path):
    base = tmp_path / "m"
    write_tf2(base / "1")
    server = ServerProcess([f"--model_base_path={base}"], tmp_path / "late.log", rest=False)
    server.stop()  # the port is known but nothing listens yet
    client = AutoencoderClient(f"127.0.0.1:{server.grpc_port}", "default", retries=60, backoff=0.5)
    result = {}
    caller = threading.Thread(target=lambda: result.setdefault("y", client.predict("serving_default", [[2.0]])["y"]))
    caller.start()
    late = subprocess.Popen([sys.executable, "-m", "aekit_cli", "serve", f"--port={server.grpc_port}",
                             f"--model_base_path={base}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        caller.join(120)
        assert result["y"].tolist() == [[3.0]]
    finally:
        late.terminate()
        late.wait(30)


def test_cli_on_npy_and_png(trained, server, images, tmp_path):
    np.save(tmp_path / "x.npy", images[:3])
    aekit("client", "denoise", "--server", server.grpc_address, "--model", "autoencoder",
          "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"))
    assert np.load(tmp_path / "y.npy").shape == (3, 28, 28, 1)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i in range(2):
        Image.fromarray((images[i, ..., 0] * 255).astype(np.uint8)).resize((56, 56)).save(pngs / f"{i}.png")
    aekit("client", "denoise", "--rest", "--server", f"127.0.0.1:{server.rest_port}", "--model", "autoencoder",
          "--input", str(pngs), "--output", str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.png", "00001.png"]
    result = aekit("client", "score", "--server", server.grpc_address, "--model", "autoencoder",
                   "--input", str(tmp_path / "x.npy"))
    assert "threshold" in result.stdout and result.stdout.count("error") == 3
    aekit("client", "score", "--server", server.grpc_address, "--model", "autoencoder",
          "--input", str(tmp_path / "x.npy"), "--error-map", str(tmp_path / "maps"))
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    aekit("client", "score", "--rest", "--server", f"127.0.0.1:{server.rest_port}", "--model", "autoencoder",
          "--input", str(tmp_path / "x.npy"), "--error-map", str(tmp_path / "maps.npy"))
    maps = np.load(tmp_path / "maps.npy")
    np.testing.assert_allclose(maps, (trained_model_reconstruction(trained, images[:3]) - images[:3]) ** 2, atol=1e-5)
    status = json.loads(aekit("client", "status", "--server", server.grpc_address, "--model", "autoencoder").stdout)
    assert status[0]["state"] == "AVAILABLE"
    assert status[0]["threshold_fpr"] == pytest.approx(0.01) and status[0]["anomaly_threshold"] > 0
    assert status[0]["anomaly_score"] == "combined"  # the default, read through the score signature


def trained_model_reconstruction(trained, images):
    version = sorted((trained / "models").iterdir())[-1]
    return tf.saved_model.load(str(version)).signatures["denoise"](images=images)["reconstruction"].numpy()


def test_cli_errors_exit_non_zero_with_one_line(server, tmp_path):
    result = aekit("client", "status", "--server", server.grpc_address, "--model", "nope", check=False)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("aekit: error: NOT_FOUND")
    result = aekit("client", "denoise", "--server", server.grpc_address, "--model", "autoencoder",
                   "--input", str(tmp_path / "missing.npy"), check=False)
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = aekit("train", "--dataset", "nope", check=False)
    assert result.returncode == 2 and "unknown dataset" in result.stderr and "Traceback" not in result.stderr
    np.save(tmp_path / "table.npy", np.random.default_rng(0).random((40, 6)))
    for flags, said in ((["--dataset", str(tmp_path / "table.npy"), "--normal-classes", "1"], "labelled source"),
                        (["--normal-classes", "12"], "no training examples of class 12"),
                        (["--threshold-fpr", "0.7"], "--threshold-fpr must be in")):
        result = aekit("train", "--model", "dense", *flags, "--workdir", str(tmp_path / "w"), check=False)
        assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr


def test_loadtest_grpc_and_rest(server):
    for rest, address in ((False, server.grpc_address), (True, f"127.0.0.1:{server.rest_port}")):
        report = loadtest.run(loadtest.LoadConfig(server=address, model="autoencoder", rest=rest,
                                                  concurrency=4, requests=40))
        assert (report["ok"], report["errors"]) == (40, 0)
        assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    result = aekit("loadtest", "--server", server.grpc_address, "--model", "nope", "--requests", "5",
                   "--concurrency", "2", check=False)
    assert result.returncode != 0


def test_loadtest_pins_itself_to_the_cpus_asked(server):
    result = aekit("loadtest", "--server", server.grpc_address, "--model", "autoencoder", "--requests", "20",
                   "--concurrency", "2", "--cpus", "0")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["ok"], report["client_cpus"]) == (20, [0])
    for bad, said in (("x", "expected CPU numbers"), ("4096", "may only use CPUs")):
        result = aekit("loadtest", "--server", server.grpc_address, "--cpus", bad, check=False)
        assert result.returncode == 1 and said in result.stderr and "Traceback" not in result.stderr


def test_evaluate_export_and_plot_commands(trained, tmp_path):
    result = aekit("evaluate", "--model-base-path", str(trained / "models"), "--noise-factor", "0.3", "--json")
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"mse", "psnr_db", "noisy_psnr_db", "denoised_psnr_db", "version"} <= set(metrics)
    models = tmp_path / "models"
    aekit("export", "--workdir", str(trained / "run"), "--model-base-path", str(models))
    assert [p.name for p in models.iterdir()] == ["1"]
    result = aekit("evaluate", "--anomaly", "--model-base-path", str(models), "--normal-classes", "1", "--json")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"auroc", "average_precision", "fpr", "recall", "precision", "f1"} <= set(report)
    assert report["threshold_fpr"] == pytest.approx(0.01)
    result = aekit("evaluate", "--model-base-path", str(models), "--normal-classes", "1", check=False)
    assert result.returncode == 2 and "need --anomaly" in result.stderr
    figures = tmp_path / "figures"
    aekit("plot", "--workdir", str(trained / "run"), "--model-base-path", str(models), "--output-dir", str(figures))
    names = sorted(p.name for p in figures.iterdir())
    assert names == ["anomaly_scores.png", "denoising.png", "latent_space.png", "reconstructions.png",
                     "training_curves.png"]
    for name in names:
        with Image.open(figures / name) as image:
            assert image.size[0] > 300 and image.size[1] > 200
            assert np.asarray(image.convert("L")).std() > 5  # not a blank canvas


def test_plot_functions_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((6, 28, 28, 1)).astype(np.float32)
    latents = rng.normal(size=(50, 8))
    paths = [plots.plot_reconstructions(x, latents[:6], x, tmp_path / "r.png"),
             plots.plot_latent_space(latents, rng.integers(0, 10, 50), tmp_path / "l.png"),
             plots.plot_score_histogram(rng.random(100), 0.9, tmp_path / "h.png", rng.random(20) + 1),
             plots.plot_roc_curve(rng.random(100), rng.random(20) + 0.5, tmp_path / "roc.png", 0.9),
             plots.plot_worst_scored(x, x ** 2, rng.random(6), tmp_path / "worst.png")]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_demo_smoke(tmp_path):
    out = tmp_path / "demo"
    result = aekit("demo", "--smoke", "--output-dir", str(out))
    summary = json.loads((out / "summary.json").read_text())
    assert {"mse", "psnr_db", "denoise_gain_db"} <= set(summary["held_out"])
    assert summary["serving_latency_ms"]["p50"] > 0
    assert len(summary["figures"]) == 10 and all((out / f).stat().st_size > 5000 for f in summary["figures"])
    compression = summary["serving"]["compression"]  # the served model's point beside PCA and the codecs
    assert {"figures/rate_distortion.png", "figures/compressed.png"} <= set(summary["figures"])
    assert compression["bytes_per_image"] > 0 and compression["psnr_db"] > 0
    assert {p["method"] for p in compression["points"]} >= {"PCA 8-bit", "PNG", "JPEG", "WebP"}
    assert "Everything is in" in result.stdout
