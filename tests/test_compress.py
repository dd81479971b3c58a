"""Compression: the quantizer on hand-made codes, the compress/decompress signatures, the code file
format and its refusals, and `aekit compress` / `decompress` / `evaluate --compression` on a tiny model."""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

import aekit_cli
from training import codefile, compress, data, endpoints, export, models, quantize, scoring
from training.evaluate import psnr_db

LATENT = 6


# ---- the quantizer -------------------------------------------------------------------------------

def test_quantize_maps_ranges_to_levels_clips_and_rounds_half_to_even():
    ranges = quantize.Ranges(np.array([0.0, -1.0], np.float32), np.array([1.0, 1.0], np.float32))
    latent = np.array([[0.0, -1.0], [1.0, 1.0], [0.5, 0.0], [2.0, -3.0], [1 / 255, 1.0 / 255]], np.float32)
    # 0.5 of the range is level 127.5 -> 128 (half to even); 1/255 of [-1, 1] is level 128.5 -> 128
    want = np.array([[0, 0], [255, 255], [128, 128], [255, 0], [1, 128]], np.uint8)
    assert np.array_equal(quantize.quantize_np(latent, ranges), want)
    in_graph = quantize.quantize(tf.constant(latent), tf.constant(ranges.low), tf.constant(ranges.high))
    assert in_graph.dtype == tf.uint8 and np.array_equal(in_graph.numpy(), want)
    back = quantize.dequantize_np(want, ranges)
    np.testing.assert_allclose(back[:3], [[0.0, -1.0], [1.0, 1.0], [128 / 255, 1 / 255]], atol=1e-6)
    np.testing.assert_allclose(quantize.dequantize(tf.constant(want), tf.constant(ranges.low),
                                                   tf.constant(ranges.high)).numpy(), back, atol=1e-7)


def test_round_trip_error_is_at_most_half_a_level_inside_the_range():
    rng = np.random.default_rng(0)
    ranges = quantize.ranges_of([rng.normal(size=(100, 4)) * [1, 2, 3, 4] for _ in range(3)])
    latent = rng.uniform(ranges.low, ranges.high, (500, 4)).astype(np.float32)
    error = np.abs(quantize.dequantize_np(quantize.quantize_np(latent, ranges), ranges) - latent)
    assert np.all(error <= (ranges.high - ranges.low) / 510 + 1e-6)


def test_ranges_are_the_streamed_min_and_max_and_a_constant_dimension_gets_a_span():
    batches = [np.array([[1.0, 5.0], [2.0, 5.0]]), np.array([[-3.0, 5.0]])]
    ranges = quantize.ranges_of(batches)
    assert ranges.low.tolist() == [-3.0, 5.0] and ranges.high[0] == 2.0
    assert ranges.high[1] > ranges.low[1]
    assert quantize.quantize_np(np.array([[5.0, 5.0]]), ranges)[0, 1] == 0


# ---- the code file format ------------------------------------------------------------------------

def _write(path, header, codes, labels=None, batch=300):
    with codefile.Writer(tf.io.gfile.GFile(str(path), "wb"), header) as writer:
        for i in range(0, len(codes), batch):
            writer.write(codes[i:i + batch], None if labels is None else labels[i:i + batch])


@pytest.mark.parametrize("codec", codefile.CODECS)
@pytest.mark.parametrize("labels", [False, True])
def test_code_file_round_trips_in_batches(tmp_path, codec, labels):
    rng = np.random.default_rng(1)
    codes, y = rng.integers(0, 256, (1000, LATENT)).astype(np.uint8), rng.integers(-5, 10, 1000)
    header = codefile.Header("ae", 3, "ab" * 32, LATENT, (4, 4, 1), 1000, labels, codec)
    _write(tmp_path / "f", header, codes, y if labels else None)
    assert codefile.verify(str(tmp_path / "f")) == header
    _, start = codefile.read_header(str(tmp_path / "f"))
    batches = list(codefile.records(str(tmp_path / "f"), header, start, 256))
    assert [len(c) for c, _ in batches] == [256, 256, 256, 232]
    assert np.array_equal(np.concatenate([c for c, _ in batches]), codes)
    if labels:
        assert np.array_equal(np.concatenate([b for _, b in batches]), y)
    else:
        assert all(b is None for _, b in batches)


def test_writer_refuses_a_count_other_than_the_header_says(tmp_path):
    header = codefile.Header("ae", 1, "0" * 64, LATENT, (4, 4, 1), 5, False, "none")
    with pytest.raises(codefile.CodeFileError, match="wrote 4 records but the header promised 5"):
        _write(tmp_path / "f", header, np.zeros((4, LATENT), np.uint8))


# ---- a tiny exported model -----------------------------------------------------------------------

def small_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), count // 3).astype(np.int64)
    x = rng.integers(0, 60, (len(y), 4, 4))
    x[np.arange(len(y)), y, :] += 180
    return x.astype(np.uint8), y


def _export(encoder, decoder, source, base, force=False):
    ranges = quantize.ranges_of(encoder(clean, training=False) for _, clean in data.eval_dataset(source.train, 64))
    sample = next(iter(data.eval_dataset(source.test, 8)))[1].numpy()
    threshold = export.calibrate_threshold(np.linspace(0.0, 1.0, 50), 0.1)
    stats = scoring.fit_on_split(encoder, decoder, source.train, "mse")
    return export.export_version(encoder, decoder, str(base), threshold, sample, force=force, ranges=ranges,
                                 stats=stats)[0], ranges


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    (x_train, y_train), (x_test, y_test) = small_images(60, 0), small_images(30, 1)
    np.savez(root / "small.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    dataset = f"npz:{root / 'small.npz'}"
    source = data.load_source(dataset)
    keras.utils.set_random_seed(0)
    encoder, decoder = models.build_autoencoder("dense", source.input_shape, LATENT)
    version_dir, ranges = _export(encoder, decoder, source, root / "ae")
    return {"root": root, "dataset": dataset, "version_dir": version_dir, "ranges": ranges, "encoder": encoder,
            "decoder": decoder, "source": source, "test": data.scale_to_unit(x_test[..., None]).numpy(),
            "y_test": y_test, "base": str(root / "ae")}


def test_signatures_take_and_give_uint8_codes_and_match_numpy_quantization(exported):
    loaded = tf.saved_model.load(exported["version_dir"])
    images = exported["test"]
    compress_fn, decompress_fn = loaded.signatures["compress"], loaded.signatures["decompress"]
    assert compress_fn.structured_input_signature[1]["images"].dtype == tf.float32
    assert decompress_fn.structured_input_signature[1]["codes"].dtype == tf.uint8
    assert decompress_fn.structured_input_signature[1]["codes"].shape.as_list() == [None, LATENT]
    codes = compress_fn(images=tf.constant(images))["codes"]
    assert codes.dtype == tf.uint8 and codes.shape == (len(images), LATENT)
    latent = exported["encoder"](images, training=False).numpy()
    assert np.max(np.abs(codes.numpy().astype(int) - quantize.quantize_np(latent, exported["ranges"]))) <= 1
    decoded = decompress_fn(codes=codes)["images"]
    assert decoded.dtype == tf.float32 and decoded.shape == images.shape
    assert 0.0 <= float(tf.reduce_min(decoded)) and float(tf.reduce_max(decoded)) <= 1.0
    want = exported["decoder"](quantize.dequantize_np(codes.numpy(), exported["ranges"]), training=False)
    np.testing.assert_allclose(decoded.numpy(), want.numpy(), atol=1e-5)


def test_export_records_the_training_ranges_fingerprint_and_warmup(exported):
    metadata = endpoints.read_compression_metadata(exported["version_dir"])
    ranges = exported["ranges"]
    assert metadata["fingerprint"] == quantize.fingerprint(exported["decoder"], ranges)
    assert metadata["low"] == ranges.low.tolist() and metadata["latent_dim"] == LATENT
    assert metadata["image_shape"] == [4, 4, 1]
    warmup = tf.data.TFRecordDataset(f"{exported['version_dir']}/{export.WARMUP_FILE}")
    signatures = [prediction_log_pb2.PredictionLog.FromString(r.numpy()).predict_log.request.model_spec.signature_name
                  for r in warmup]
    assert signatures.count("compress") == signatures.count("decompress") == endpoints.WARMUP_RECORDS_PER_SIGNATURE


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = aekit_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.strip()


def test_compress_then_decompress_gives_the_served_images_and_the_evaluated_psnr(exported, tmp_path, capsys):
    code, out, _ = _cli(capsys, "compress", "--model-base-path", exported["base"], "--dataset", exported["dataset"],
                        "--split", "test", "--output", str(tmp_path / "test.aec"))
    assert code == 0 and json.loads(out)["count"] == 30 and json.loads(out)["labels"] is True
    code, out, _ = _cli(capsys, "decompress", "--model-base-path", exported["base"],
                        "--input", str(tmp_path / "test.aec"), "--output", str(tmp_path / "test.npz"))
    assert code == 0
    with np.load(tmp_path / "test.npz") as f:
        images, labels = f["images"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (30, 4, 4, 1)
    assert np.array_equal(labels, exported["y_test"])
    loaded = tf.saved_model.load(exported["version_dir"])
    served = loaded.signatures["decompress"](codes=loaded.signatures["compress"](images=exported["test"])["codes"])
    assert np.array_equal(images, compress.to_uint8(served["images"].numpy(), (4, 4, 1)))

    code, out, _ = _cli(capsys, "evaluate", "--compression", "--json", "--model-base-path", exported["base"],
                        "--dataset", exported["dataset"])
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and {"bytes_per_image", "psnr_db", "psnr_db_uint8", "float_psnr_db", "latent_dim",
                          "version", "codec"} <= set(report)
    mse = np.mean(np.square(images / 255.0 - exported["test"]))
    assert report["psnr_db_uint8"] == pytest.approx(psnr_db(mse), abs=1e-6)
    assert report["psnr_db"] == pytest.approx(psnr_db(np.mean(np.square(served["images"].numpy() - exported["test"]))),
                                              abs=1e-4)
    unlabelled = codefile.Header("ae", 1, "0" * 64, LATENT, (4, 4, 1), 30, False, "zlib")
    _write(tmp_path / "same.aec", unlabelled, loaded.signatures["compress"](images=exported["test"])["codes"].numpy())
    assert report["bytes_per_image"] == (tmp_path / "same.aec").stat().st_size / 30


@pytest.fixture
def code_file(exported, tmp_path, capsys):
    path = tmp_path / "train.aec"
    assert _cli(capsys, "compress", "--model-base-path", exported["base"], "--dataset", exported["dataset"],
                "--split", "train", "--output", str(path))[0] == 0
    return path


def _refused(capsys, base, path, *extra) -> str:
    code, out, err = _cli(capsys, "decompress", "--model-base-path", base, "--input", str(path),
                          "--output", str(path) + ".npz", *extra)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not (path.parent / (path.name + ".npz")).exists()
    return err


def test_a_truncated_file_is_refused_in_one_line(exported, code_file, capsys):
    code_file.write_bytes(code_file.read_bytes()[:-20])
    assert "is truncated" in _refused(capsys, exported["base"], code_file)
    code_file.write_bytes(code_file.read_bytes()[:30])
    assert "is truncated" in _refused(capsys, exported["base"], code_file)


@pytest.mark.parametrize("keep", ["nothing", "header only", "half", "all but one byte"])
def test_a_file_cut_anywhere_is_refused_in_one_line_before_anything_is_written(exported, code_file, capsys, keep):
    raw = code_file.read_bytes()
    _, body_start = codefile.read_header(str(code_file))
    size = {"nothing": 0, "header only": body_start, "half": len(raw) // 2, "all but one byte": len(raw) - 1}[keep]
    code_file.write_bytes(raw[:size])
    err = _refused(capsys, exported["base"], code_file)
    assert str(code_file) in err and ("is truncated" in err or "is not an aekit code file" in err), err


def test_a_corrupt_file_is_refused_in_one_line(exported, code_file, capsys):
    raw = bytearray(code_file.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    code_file.write_bytes(bytes(raw))
    assert "is corrupt: its sha256 checksum does not match" in _refused(capsys, exported["base"], code_file)


def test_a_file_that_is_no_code_file_is_refused_in_one_line(exported, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros(3))
    assert "is not an aekit code file" in _refused(capsys, exported["base"], tmp_path / "x.npy")


def test_another_model_or_version_or_fingerprint_is_refused_in_one_line(exported, code_file, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(exported["base"], other)
    assert "not by model 'other'" in _refused(capsys, str(other), code_file)

    base = tmp_path / "ae"  # same name, two versions: version 2 has other decoder weights
    shutil.copytree(exported["base"], base)
    keras.utils.set_random_seed(1)
    encoder, decoder = models.build_autoencoder("dense", exported["source"].input_shape, LATENT)
    _export(encoder, decoder, exported["source"], base)
    err = _refused(capsys, str(base), code_file, "--model-version", "2")
    assert "was written by version 1 of model 'ae'; version 2 cannot decode it" in err
    assert _cli(capsys, "decompress", "--model-base-path", str(base), "--input", str(code_file),
                "--output", str(tmp_path / "ok.npz"))[0] == 0  # the version in the file is the default

    forged = tmp_path / "forged.aec"
    header = codefile.Header("ae", 2, endpoints.read_compression_metadata(exported["version_dir"])["fingerprint"],
                             LATENT, (4, 4, 1), 1, False, "zlib")
    _write(forged, header, np.zeros((1, LATENT), np.uint8))
    assert "with decoder fingerprint" in _refused(capsys, str(base), forged)


def test_a_missing_version_is_refused_in_one_line(exported, tmp_path, capsys):
    path = tmp_path / "v9.aec"
    _write(path, codefile.Header("ae", 9, "0" * 64, LATENT, (4, 4, 1), 1, False, "none"), np.zeros((1, LATENT)))
    assert "version 9 is not under" in _refused(capsys, exported["base"], path)


# ---- served: compress / decompress over gRPC and REST --------------------------------------------

@pytest.fixture(scope="module")
def server(exported):
    from tensorflow_serving.config import model_server_config_pb2

    from serving.core import DataPlane
    from serving.grpc_server import GrpcServer
    from serving.manager import ModelManager
    from serving.rest_server import RestApi, RestServer
    from training.multiworker import free_ports

    manager = ModelManager()
    cfg = model_server_config_pb2.ModelServerConfig()
    cfg.model_config_list.config.add(name="ae", base_path=exported["base"], model_platform="tensorflow")
    manager.configure(cfg)
    core = DataPlane(manager)
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


def test_client_compress_and_decompress_over_grpc_and_rest(exported, server, tmp_path, capsys):
    from clients import AutoencoderClient, RestAutoencoderClient

    loaded = tf.saved_model.load(exported["version_dir"])
    want_codes = loaded.signatures["compress"](images=exported["test"])["codes"].numpy()
    want_images = loaded.signatures["decompress"](codes=want_codes)["images"].numpy()
    for client in (AutoencoderClient(server["grpc"], "ae"), RestAutoencoderClient(server["rest"], "ae")):
        codes = client.compress(exported["test"])
        assert codes.dtype == np.uint8 and np.array_equal(codes, want_codes)
        np.testing.assert_allclose(client.decompress(codes), want_images, atol=1e-6)
        client.close()

    np.save(tmp_path / "x.npy", exported["test"])
    for flags, address in (([], server["grpc"]), (["--rest"], server["rest"])):
        common = ["--server", address, "--model", "ae", *flags]
        assert _cli(capsys, "client", "compress", *common, "--input", str(tmp_path / "x.npy"),
                    "--output", str(tmp_path / "codes.npy"))[0] == 0
        assert np.array_equal(np.load(tmp_path / "codes.npy"), want_codes)
        assert _cli(capsys, "client", "decompress", *common, "--input", str(tmp_path / "codes.npy"),
                    "--output", str(tmp_path / "back.npy"))[0] == 0
        np.testing.assert_allclose(np.load(tmp_path / "back.npy"), want_images, atol=1e-6)
        code, _, err = _cli(capsys, "client", "decompress", *common, "--input", str(tmp_path / "x.npy"))
        assert code != 0 and len(err.splitlines()) == 1 and "holds float32 values" in err


def test_decompressed_file_is_the_served_round_trip_over_grpc_and_rest(exported, server, tmp_path, capsys):
    """The bar: `aekit compress` then `aekit decompress` gives the images a served
    decompress(compress(x)) gives (rounded to uint8 as decompress writes them)."""
    from clients import AutoencoderClient, RestAutoencoderClient

    assert _cli(capsys, "compress", "--model-base-path", exported["base"], "--dataset", exported["dataset"],
                "--split", "test", "--output", str(tmp_path / "t.aec"))[0] == 0
    assert _cli(capsys, "decompress", "--model-base-path", exported["base"], "--input", str(tmp_path / "t.aec"),
                "--output", str(tmp_path / "t.npz"))[0] == 0
    with np.load(tmp_path / "t.npz") as f:
        from_file = f["images"]
    for client in (AutoencoderClient(server["grpc"], "ae"), RestAutoencoderClient(server["rest"], "ae")):
        served = client.decompress(client.compress(exported["test"]))
        client.close()
        assert np.array_equal(from_file, compress.to_uint8(served, (4, 4, 1))), type(client).__name__
