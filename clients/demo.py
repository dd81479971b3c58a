"""`aekit demo` (`make demo`): the whole kit on the built-in MNIST sample, in one command.

    make demo     # or: aekit demo --output-dir demo-output
    # -> demo-output/{summary.json, figures/*.png, models/autoencoder/1, run/}

Trains the conv denoising autoencoder with MirroredStrategy over 2 logical CPU devices, exports a
version, starts `aekit serve` on free ports, calls encode, decode, denoise (on noisy digits, as
in the seed blog), score, compress and decompress through the gRPC client, measures serving
latency with the load generator, writes the figures and summary.json, and stops the server.
The rate-distortion figure puts the served model's compress/decompress point (one byte per latent
dimension) beside PCA at the same bytes and PNG, JPEG and WebP on the same held-out digits
(training/rate_distortion.py; no extra training: PCA and the codecs cost a few CPU-seconds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from clients import loadtest, plots
from clients.grpc_client import AutoencoderClient
from training import rate_distortion as rd

DEMO_NOISE = 0.4  # the seed blog's noise factor
READY_TIMEOUT = 120.0
SCORE = "anomaly_score"  # what the threshold is on (score's is_anomaly); error stays the plain MSE
PCA_SIZES = (16, 32, 64, 128)  # the PCA line of the rate-distortion figure (components at one byte each)
CODEC_QUALITIES = {"png": (), "jpeg": (10, 50, 90), "webp": (10, 50, 90)}  # a few points per codec: seconds


@dataclasses.dataclass
class DemoConfig:
    output_dir: str = "demo-output"  # everything the demo writes (git-ignored)
    epochs: int = 10  # conv on 4,000 digits: about a minute on 2 cores
    smoke: bool = False  # seconds-long run for tests
    model_name: str = "autoencoder"


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.output_dir).resolve()
    train_result, arrays = _train(cfg, out)
    server = _start_server(out / "models" / cfg.model_name, cfg.model_name, out / "server.log")
    try:
        with AutoencoderClient(f"127.0.0.1:{server.port}", cfg.model_name) as client:
            client.wait_until_available(READY_TIMEOUT)
            figures, serving = _call_and_plot(client, arrays, out / "figures", train_result)
        latency = _measure_latency(f"127.0.0.1:{server.port}", cfg)
    finally:
        server.stop()
    summary = _summary(train_result, serving, latency, figures, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_where(summary, out)
    return summary


def _train(cfg: DemoConfig, out: Path):
    from training import data, jobs
    from training.config import TrainConfig

    train_cfg = TrainConfig(dataset="mnist-sample", model="conv", epochs=cfg.epochs, noise_factor=DEMO_NOISE,
                            num_logical_devices=2, workdir=str(out / "run"),
                            model_base_path=str(out / "models" / cfg.model_name), smoke=cfg.smoke)
    print(f"[demo] training conv autoencoder ({train_cfg.epochs} epochs, 2 logical devices)", flush=True)
    result = jobs.train_job(train_cfg)
    arrays = data.load_arrays("mnist-sample")
    return {**result, "history": json.loads((out / "run" / "history.json").read_text())}, arrays


class _Server:
    def __init__(self, proc: subprocess.Popen, port: int, log):
        self.proc, self.port, self._log = proc, port, log

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def _start_server(base_path: Path, model_name: str, log_path: Path) -> _Server:
    from training.multiworker import free_ports

    (port,) = free_ports(1)
    log = open(log_path, "w")
    argv = [sys.executable, "-m", "aekit_cli", "serve", f"--port={port}", f"--model_name={model_name}",
            f"--model_base_path={base_path}", "--enable_grpc_healthcheck_service"]
    print(f"[demo] starting: aekit serve --port={port} --model_name={model_name} --model_base_path={base_path}",
          flush=True)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    return _Server(proc, port, log)


def _call_and_plot(client: AutoencoderClient, arrays, figures: Path, train_result: dict):
    clean = arrays.x_test.astype(np.float32) / 255.0
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0.0, DEMO_NOISE, clean.shape), 0.0, 1.0).astype(np.float32)
    print("[demo] calling the server over gRPC: encode, decode, denoise, score", flush=True)
    latents = client.encode(clean)
    reconstructions = client.decode(latents)
    denoised = client.denoise(noisy)
    scores = client.score(clean)
    anomalies = client.score(rng.random(clean[:200].shape).astype(np.float32))
    # Real structure, not noise: held-out digits turned 90 degrees, a shape the model never saw.
    turned = np.ascontiguousarray(np.rot90(clean[:200], axes=(1, 2)))
    turned_scores = client.score(turned)
    threshold = float(scores["threshold"][0])
    both = np.concatenate([clean, turned])
    written = [
        plots.plot_reconstructions(clean, latents, reconstructions, figures / "reconstructions.png"),
        plots.plot_denoising(noisy, denoised, clean, figures / "denoising.png"),
        plots.plot_latent_space(latents, arrays.y_test, figures / "latent_space.png"),
        plots.plot_training_curves(train_result["history"], figures / "training_curves.png"),
        plots.plot_score_histogram(scores[SCORE], threshold, figures / "anomaly_scores.png", anomalies[SCORE]),
        plots.plot_score_histogram(scores[SCORE], threshold, figures / "anomaly_turned.png", turned_scores[SCORE],
                                   anomaly_label="anomalies (digits turned 90 degrees)"),
        plots.plot_roc_curve(scores[SCORE], turned_scores[SCORE], figures / "anomaly_roc.png", threshold),
        plots.plot_worst_scored(both, np.concatenate([scores["error_map"], turned_scores["error_map"]]),
                                np.concatenate([scores[SCORE], turned_scores[SCORE]]),
                                figures / "anomaly_worst.png"),
    ]
    compression, compression_figures = _compress_and_plot(client, arrays, clean, figures)
    written += compression_figures
    mse = lambda a, b: float(np.mean((a - b) ** 2))  # noqa: E731
    serving = {"compression": compression, "served_mse": mse(reconstructions, clean), "served_noisy_psnr_db": _psnr(mse(noisy, clean)),
               "served_denoised_psnr_db": _psnr(mse(denoised, clean)), "anomaly_threshold": threshold,
               "held_out_flagged_fraction": float(np.mean(scores["is_anomaly"])),
               "noise_images_flagged_fraction": float(np.mean(anomalies["is_anomaly"])),
               "turned_digits_flagged_fraction": float(np.mean(turned_scores["is_anomaly"]))}
    return written, serving


def _compress_and_plot(client: AutoencoderClient, arrays, clean: np.ndarray, figures: Path):
    """The served model's compress/decompress point beside PCA and the image codecs on the same
    held-out digits: the rate-distortion figure and a row of originals over their decompressed images."""
    print("[demo] compress and decompress over gRPC; PCA, PNG, JPEG and WebP on the same digits", flush=True)
    codes = client.compress(clean)
    decompressed = client.decompress(codes)
    ours = {"method": "aekit (served, 8-bit)", "bytes_per_image": int(codes.shape[1]),
            "psnr_db": rd.psnr(clean, decompressed)}
    train_px = arrays.x_train.reshape(len(arrays.x_train), -1).astype(np.float32) / 255.0
    sizes = sorted({*PCA_SIZES, ours["bytes_per_image"]})
    pca = rd.fit_pca(train_px, max(sizes))
    points = [ours, *({"method": "PCA 8-bit", **rd.pca_point(pca, train_px, clean, dim, 8)} for dim in sizes),
              *rd.codec_points(arrays.x_test, CODEC_QUALITIES)]
    png_bytes = [len(rd.encode_image(image, "png", None)) for image in arrays.x_test[:10]]
    written = [plots.plot_rate_distortion(points, figures / "rate_distortion.png",
                                          f"Rate-distortion, {len(clean):,} held-out digits"),
               plots.plot_compressed(clean, png_bytes, decompressed, ours["bytes_per_image"],
                                     figures / "compressed.png")]
    pca_same = next(p for p in points if p["method"] == "PCA 8-bit" and p["bytes_per_image"] == ours["bytes_per_image"])
    summary = {"bytes_per_image": ours["bytes_per_image"], "psnr_db": ours["psnr_db"],
               "pca_psnr_db_same_bytes": pca_same["psnr_db"],
               "points": [rd.json_point(p) for p in points]}
    return summary, written


def _psnr(mse: float) -> float:
    return 10.0 * float(np.log10(1.0 / mse)) if mse > 0 else float("inf")


def _measure_latency(address: str, cfg: DemoConfig) -> dict:
    load = loadtest.LoadConfig(server=address, model=cfg.model_name, concurrency=1,
                               requests=50 if cfg.smoke else 500, duration=30.0)
    report = loadtest.run(load)
    print("[demo] serving latency, single image over gRPC:\n" + loadtest.format_table(report), flush=True)
    return report


def _summary(train_result: dict, serving: dict, latency: dict, figures: list[Path], out: Path) -> dict:
    last = train_result["history"][-1]
    return {
        "held_out": {k: last[k] for k in ("mse", "psnr_db", "noisy_psnr_db", "denoised_psnr_db", "denoise_gain_db")
                     if k in last},
        "serving": serving,
        "serving_latency_ms": latency["latency_ms"],
        "serving_throughput_rps": latency["throughput_rps"],
        "model_version": train_result.get("export"),
        "figures": [str(p.relative_to(out)) for p in figures],
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _print_where(summary: dict, out: Path) -> None:
    held = summary["held_out"]
    print(f"\n[demo] done. Everything is in {out}/")
    print(f"  summary.json        held-out MSE {held['mse']:.5f}, PSNR {held['psnr_db']:.2f} dB, "
          f"denoising gain {held.get('denoise_gain_db', 0):.2f} dB, "
          f"gRPC p50 {summary['serving_latency_ms']['p50']:.2f} ms")
    packed = summary["serving"]["compression"]
    print(f"                      compressed to {packed['bytes_per_image']} B per image at "
          f"{packed['psnr_db']:.2f} dB (PCA at the same bytes {packed['pca_psnr_db_same_bytes']:.2f} dB)")
    for figure in summary["figures"]:
        print(f"  {figure}")
    print(f"  {Path(summary['model_version']).relative_to(out) if summary['model_version'] else ''}"
          "  (the exported SavedModel version)")
