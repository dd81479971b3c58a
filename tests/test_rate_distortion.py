"""The rate-distortion helpers (training/rate_distortion.py) and the benchmark's glue."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import bench_rate_distortion as bench
from clients import plots
from training import quantize
from training import rate_distortion as rd
from training.config import preset_settings


def digits(count: int = 12, seed: int = 0) -> np.ndarray:
    """Digit-like uint8 images [N, 28, 28, 1]: a bright blob on black, some noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    images = []
    for _ in range(count):
        cy, cx = rng.uniform(9, 19, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(8, 30))
        images.append(np.clip(blob * 255 + rng.normal(0, 8, blob.shape), 0, 255))
    return np.asarray(images, np.uint8)[..., None]


def test_png_is_lossless_and_its_psnr_is_inf_and_null_in_json():
    point = rd.codec_point(digits(), "png")
    assert point["psnr_db"] == math.inf and point["method"] == "PNG"
    saved = rd.json_point(point)
    assert saved["psnr_db"] is None and saved["lossless"] is True
    json.dumps(saved, allow_nan=False)  # strict JSON


def test_jpeg_and_webp_bytes_fall_and_psnr_falls_with_quality():
    images = digits()
    for codec in ("jpeg", "webp"):
        points = [rd.codec_point(images, codec, q) for q in (90, 50, 10)]
        sizes, psnrs = [p["bytes_per_image"] for p in points], [p["psnr_db"] for p in points]
        assert sizes[0] > sizes[1] > sizes[2], (codec, sizes)
        assert psnrs[0] > psnrs[2], (codec, psnrs)


def test_codec_bytes_are_whole_files_with_their_container():
    one = rd.codec_point(digits(1), "jpeg", 10)["bytes_per_image"]
    assert one == len(rd.encode_image(digits(1)[0], "jpeg", 10))
    assert rd.container_overhead("jpeg") < one
    assert rd.encode_image(digits(1)[0], "png", None)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("dim", [7, 8])
def test_4bit_packing_round_trips_two_codes_per_byte(dim):
    steps = np.random.default_rng(dim).integers(0, 16, (5, dim)).astype(np.uint8)
    packed = rd.pack_nibbles(steps)
    assert packed.shape == (5, rd.code_bytes(dim, 4)) == (5, math.ceil(dim / 2))
    assert packed[0, 0] == steps[0, 0] * 16 + steps[0, 1]
    np.testing.assert_array_equal(rd.unpack_nibbles(packed, dim), steps)


def test_4bit_packing_refuses_values_over_15():
    with pytest.raises(ValueError, match="0..15"):
        rd.pack_nibbles(np.array([[3, 16]], np.uint8))


def test_8bit_levels_are_the_compress_signatures_quantizer():
    rng = np.random.default_rng(1)
    codes = rng.normal(size=(50, 6)).astype(np.float32)
    ranges = quantize.ranges_of([codes[:40]])
    low, high = rd.code_ranges(codes[:40])
    np.testing.assert_array_equal(rd.quantize_levels(codes, low, high, 8), quantize.quantize_np(codes, ranges))


def test_4bit_levels_on_hand_made_codes():
    low, high = np.array([0.0], np.float32), np.array([15.0], np.float32)
    codes = np.array([[-3.0], [0.0], [4.4], [4.6], [15.0], [99.0]], np.float32)
    steps = rd.quantize_levels(codes, low, high, 4)
    np.testing.assert_array_equal(steps[:, 0], [0, 0, 4, 5, 15, 15])
    np.testing.assert_allclose(rd.dequantize_levels(steps, low, high, 4)[:, 0], [0, 0, 4, 5, 15, 15])


def direct_pca_psnr(train: np.ndarray, test: np.ndarray, dim: int, bits: int) -> float:
    """PCA by numpy's SVD of the centred training pixels, quantized per component over the
    training codes' min..max, reconstructed and clipped: what pca_point must compute."""
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    basis = vt[:dim]
    train_c, test_c = (train - mean) @ basis.T, (test - mean) @ basis.T
    low, high = train_c.min(0), train_c.max(0)
    levels = 2 ** bits - 1
    steps = np.clip(np.round((test_c - low) / (high - low) * levels), 0, levels)
    rebuilt = np.clip((low + steps / levels * (high - low)) @ basis + mean, 0, 1)
    return 10 * math.log10(1 / np.mean((rebuilt - test) ** 2))


@pytest.mark.parametrize("dim, bits", [(4, 8), (10, 8), (10, 4)])
def test_pca_baseline_equals_a_direct_svd_computation(dim, bits):
    pixels = digits(160, seed=3).reshape(160, -1) / 255.0
    train, test = pixels[:120], pixels[120:]
    pca = rd.fit_pca(train, 12)
    point = rd.pca_point(pca, train, test, dim, bits)
    assert point["bytes_per_image"] == rd.code_bytes(dim, bits)
    assert point["psnr_db"] == pytest.approx(direct_pca_psnr(train, test, dim, bits), abs=0.02)


def test_quantized_point_counts_packed_bytes_and_matches_float_at_high_precision():
    rng = np.random.default_rng(2)
    codes = rng.uniform(0.2, 0.8, (30, 9)).astype(np.float32)
    identity = lambda x: np.asarray(x, np.float32)  # noqa: E731
    eight, four = (rd.quantized_point(identity, identity, codes, codes, bits) for bits in (8, 4))
    assert (eight["bytes_per_image"], four["bytes_per_image"]) == (9, 5)
    # one level's rounding error at most: uniform error over a step of span/255 is ~span/255/sqrt(12)
    assert eight["psnr_db"] > four["psnr_db"] + 20 > 40


def test_the_benchmark_trains_each_latent_with_the_compression_preset_and_epochs_override(tmp_path):
    for latent in (16, 32, 64, 128):
        cfg = bench.train_config(latent, None, str(tmp_path))
        preset = preset_settings("compression", latent)
        assert (cfg.latent_dim, cfg.epochs, cfg.batch_size, cfg.loss, cfg.export) == (
            latent, preset["epochs"], preset["batch_size"], preset["loss"], False)
    assert bench.train_config(32, 2, str(tmp_path)).epochs == 2
    recognition = bench.train_config(bench.RECOGNITION_LATENT, None, str(tmp_path), "recognition")
    assert recognition.shift_input_only and recognition.augment_shift > 0 and recognition.latent_dim == 32


def test_rate_distortion_figure_with_a_lossless_point(tmp_path):
    points = [{"method": "PCA 8-bit", "bytes_per_image": b, "psnr_db": 10 + b / 10} for b in (16, 32, 64)]
    points += [rd.codec_point(digits(), "png"), rd.codec_point(digits(), "webp", 10)]
    path = plots.plot_rate_distortion(points, tmp_path / "rd.png")
    assert path.stat().st_size > 5000


def test_table_compares_aekit_with_the_best_pca_at_the_same_bytes():
    points = [{"method": "aekit 8-bit", "latent": 16, "bytes_per_image": 16, "psnr_db": 20.0, "train_cpu_s": 1.0},
              {"method": "PCA 8-bit", "latent": 16, "bytes_per_image": 16, "psnr_db": 15.0},
              {"method": "PCA 4-bit", "latent": 32, "bytes_per_image": 16, "psnr_db": 17.0},
              rd.codec_point(digits(), "png")]
    table = bench.format_table({"test_examples": 12, "dataset": "x", "points": points, "figure": "f", "cpu_s": 1,
                                "container_overhead_bytes": {"png": 67}})
    assert "+3.00" in table and " inf " in table
