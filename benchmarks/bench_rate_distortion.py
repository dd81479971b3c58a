"""Rate-distortion and recognition on held-out mnist-sample, in one run on the same 1,000 images:
aekit at several latent sizes (codes at 8 and at 4 bits per dimension), PCA at the same bytes,
and PNG, JPEG and WebP through Pillow at several qualities.

    python -m benchmarks.bench_rate_distortion [--latents 16,32,64,128] [--epochs N] [--no-probe]
    python -m benchmarks.bench_rate_distortion --quick        # 2 epochs, latents 16,32, no probe: ~2 min
    # -> a table per method (bytes per image, PSNR dB), the recognition table, and
    #    OUTPUT_DIR/rate_distortion.json, OUTPUT_DIR/figures/rate_distortion.png

Each aekit point trains with the project's own `train.train_and_evaluate` on mnist-sample's
4,000 training images, with the TrainConfig fields of the compression preset for that latent
size (`aekit train --preset compression`; --epochs overrides it). Codes are quantized as `aekit
compress` stores them, with per-dimension ranges from the TRAINING codes; at 4 bits they are 16
levels over the same ranges, packed two to a byte, so a point takes latent * bits / 8 bytes.
PCA is fitted on the training pixels and quantized the same way. Codec bytes are each encoded
file, container included (training/rate_distortion.py says how much that is). PSNR is over the
whole held-out split on [0, 1] pixels, as training.evaluate.psnr_db. Recognition: the linear
probe and 5-NN of training/probe.py on the float codes, on PCA at the code's size, on the code of
`aekit train --preset recognition` (32-d, trained once more for this table: the input moved by
up to 4 pixels, the target not) and on the raw pixels (all labels, and 10 per class); it costs
minutes of CPU (LogisticRegressionCV and the extra training), hence --no-probe. "train cpu-s" is
the process's CPU time for that point's training; "vs PCA" is against the better of PCA 8-bit
and 4-bit at the same bytes.

Measured 2026-12-02 BEFORE the compression preset (TrainConfig defaults, 10 epochs, 2 shared
cores; 657 CPU-s in all; the preset's own rows are in benchmarks/bench_codes.py):
  aekit 8-bit  16 B 19.13 dB, 32 B 21.35, 64 B 22.57, 128 B 23.10 (PCA 8-bit 15.86, 18.01, 20.85, 24.31)
  aekit 4-bit   8 B 18.61 dB, 16 B 20.72, 32 B 22.06,  64 B 22.80 (PCA 4-bit 15.78, 17.86, 20.53, 23.59)
  WebP q1 114 B 25.09 dB, q10 143 B 28.67; JPEG q10 401 B 22.85; PNG 275 B lossless
  linear probe on codes 16/32/64/128: 0.890/0.912/0.914/0.918 (PCA 0.849/0.891/0.896/0.883,
  pixels 0.901); 10 labels per class 0.791/0.788/0.784/0.784 (PCA 0.687/0.710/0.620/0.518)

Measured 2026-12-03 with the presets (`python -m benchmarks.bench_rate_distortion`, one run,
nothing else running; 1,254 CPU-s in all, probes and the recognition training included):
  aekit 8-bit  16 B 20.71 dB, 32 B 24.37, 64 B 26.75, 128 B 29.17 (train 143/176/183/323 CPU-s)
  aekit 4-bit   8 B 19.69 dB, 16 B 22.76, 32 B 25.15,  64 B 27.62
  PCA 8-bit 15.86 / 18.01 / 20.85 / 24.31; PCA 4-bit 15.78 / 17.86 / 20.53 / 23.59 at 8-64 B
  -> "vs PCA" (the better PCA at the same bytes) +2.85 / +3.84 / +3.17 / +4.86 for 8-bit codes,
     and at equal bytes the 4-bit code of the next larger model beats the 8-bit one
     (32 B 25.15 against 24.37, 64 B 27.62 against 26.75)
  WebP q1 114.5 B 25.09 dB, q10 143.1 B 28.67; JPEG q10 401.4 B 22.85; PNG 275 B (as before)
  linear probe on codes 16/32/64/128: 0.921/0.916/0.917/0.911, 10 per class
  0.846/0.804/0.768/0.740; `--preset recognition` 32-d: 0.964, 10 per class 0.895 (k-NN
  0.959); PCA 32 0.891 / 0.710, raw pixels 0.901 / 0.719
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from clients import plots
from training import data, probe, train
from training import rate_distortion as rd
from training.config import TrainConfig, preset_settings

# The per-latent TrainConfig fields of the aekit points: `aekit train --preset compression`'s
# ({latent_dim: {field: value}}), chosen by measurement in benchmarks/bench_codes.py.

LATENTS = (16, 32, 64, 128)
BITS = (8, 4)
QUALITIES = {"png": (), "jpeg": (5, 10, 30, 50, 75, 90), "webp": (1, 10, 30, 50, 75, 90)}
QUICK = {"latents": (16, 32), "epochs": 2, "qualities": {"png": (), "jpeg": (10, 50), "webp": (10, 50)}}
DATASET = "mnist-sample"
RECOGNITION_LATENT = 32  # the probe table adds `aekit train --preset recognition`'s code of this size


def train_config(latent: int, epochs: int | None, workdir: str, preset: str = "compression") -> TrainConfig:
    """TrainConfig for one aekit point: `preset` at `latent`, then --epochs."""
    fields = {k: v for k, v in preset_settings(preset, latent).items() if k != "latent_dim"}
    if epochs is not None:
        fields["epochs"] = epochs
    return TrainConfig(**{**fields, "dataset": DATASET, "latent_dim": latent, "workdir": workdir, "export": False})


def batched(model, shape: tuple[int, ...], batch: int = 256):
    """numpy in, numpy out, in batches: x [N, ...] reshaped to the model's input shape."""
    def call(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32).reshape(-1, *shape)
        return np.concatenate([model(x[i:i + batch], training=False).numpy() for i in range(0, len(x), batch)])
    return call


def trained(latent: int, epochs: int | None, source: data.Source, preset: str = "compression") -> dict:
    """Trains `preset` at one latent size: its encoder, decoder, codes of both splits, CPU-s, history."""
    with tempfile.TemporaryDirectory() as workdir:
        cfg = train_config(latent, epochs, workdir, preset)
        started = time.process_time()
        state, history = train.train_and_evaluate(cfg, source)
        cpu = time.process_time() - started
    encode = batched(state.encoder, source.input_shape)
    return {"cfg": cfg, "history": history, "cpu_s": round(cpu, 1), "encode": encode,
            "decode": batched(state.decoder, (latent,)),
            "train": probe.split_features(encode, source.train), "test": probe.split_features(encode, source.test)}


def aekit_points(latent: int, epochs: int | None, source: data.Source) -> tuple[list[dict], dict]:
    """Trains one latent size; its quantized points at each of BITS, and its codes for the probe."""
    run = trained(latent, epochs, source)
    points = [{"method": f"aekit {bits}-bit", "latent": latent, "epochs": run["cfg"].epochs,
               "train_cpu_s": run["cpu_s"], "float_psnr_db": run["history"][-1]["psnr_db"],
               **rd.quantized_point(run["encode"], run["decode"], run["train"].codes, run["test"].pixels, bits)}
              for bits in BITS]
    return points, {"train": run["train"], "test": run["test"]}


def pca_points(pca: rd.PCA, train_px: np.ndarray, test_px: np.ndarray, latents) -> list[dict]:
    """PCA at every byte count an aekit point has: dim = bytes * 8 / bits, for each of BITS."""
    points = []
    for latent in latents:
        for bits in BITS:
            points.append({"method": f"PCA {bits}-bit", "latent": latent,
                           **rd.pca_point(pca, train_px, test_px, latent, bits)})
    return points


def recognition_rows(codes: dict[int, dict], pca: rd.PCA, pixels: tuple[np.ndarray, np.ndarray],
                     labels: tuple[np.ndarray, np.ndarray], recognition: dict | None = None) -> list[dict]:
    """Probe accuracies on each latent's codes and on PCA of that size, then on the recognition
    preset's code (when given) and on the raw pixels."""
    def row(name, dim, train_x, test_x):
        return {"input": name, "dim": dim, **probe.classifier_accuracies(train_x, labels[0], test_x, labels[1])}
    rows = []
    for latent, feats in codes.items():
        rows.append(row("aekit code", latent, feats["train"].codes, feats["test"].codes))
        rows.append(row("PCA", latent, pca.encode(pixels[0], latent), pca.encode(pixels[1], latent)))
    if recognition is not None:
        rows.append({**row("aekit recog.", RECOGNITION_LATENT, recognition["train"].codes, recognition["test"].codes),
                     "train_cpu_s": recognition["cpu_s"]})
    rows.append(row("raw pixels", pixels[0].shape[1], *pixels))
    return rows


def run(output_dir: str = "bench-output", latents=LATENTS, epochs: int | None = None, with_probe: bool = True,
        qualities: dict = QUALITIES) -> dict:
    source = data.load_source(DATASET)
    started = time.process_time()
    points, codes = [], {}
    for latent in latents:
        mine, codes[latent] = aekit_points(latent, epochs, source)
        points += mine
        print(json.dumps(mine), flush=True)
    first = next(iter(codes.values()))
    train_px, test_px = first["train"].pixels, first["test"].pixels  # the same split for every latent
    pca = rd.fit_pca(train_px, max(latents))
    points += pca_points(pca, train_px, test_px, latents)
    test_uint8 = np.round(test_px * 255.0).astype(np.uint8).reshape(-1, *source.input_shape)
    points += rd.codec_points(test_uint8, qualities)
    report = {"dataset": DATASET, "test_examples": len(test_px), "points": points,
              "container_overhead_bytes": {c: rd.container_overhead(c) for c in rd.CODECS},
              "settings_per_latent": {str(k): preset_settings("compression", k) for k in latents}}
    if with_probe:
        labels = first["train"].labels, first["test"].labels
        recognition = trained(RECOGNITION_LATENT, epochs, source, "recognition")
        report["settings_recognition"] = preset_settings("recognition", RECOGNITION_LATENT)
        report["recognition"] = recognition_rows(codes, pca, (train_px, test_px), labels, recognition)
    report["cpu_s"] = round(time.process_time() - started, 1)
    out = Path(output_dir)
    report["figure"] = str(plots.plot_rate_distortion(
        points, out / "figures" / "rate_distortion.png", f"Rate-distortion, {len(test_px):,} held-out {DATASET} images"))
    saved = {**report, "points": [rd.json_point(p) for p in points]}
    (out / "rate_distortion.json").write_text(json.dumps(saved, indent=2, default=_json_number) + "\n")
    print(format_table(report))
    return report


def _json_number(value):
    return float(value) if isinstance(value, np.floating) else str(value)


def format_table(report: dict) -> str:
    lines = [f"rate-distortion, {report['test_examples']} held-out {report['dataset']} images "
             f"(PSNR dB on [0, 1] pixels; bytes per image)",
             f"{'method':<12} {'latent':>6} {'quality':>7} {'bytes':>7} {'PSNR dB':>8} {'vs PCA':>7} {'train cpu-s':>11}"]
    pca = {}  # the best PCA point (8- or 4-bit) at each byte count
    for p in report["points"]:
        if p["method"].startswith("PCA"):
            pca[p["bytes_per_image"]] = max(p["psnr_db"], pca.get(p["bytes_per_image"], -math.inf))
    for p in report["points"]:
        gain = p["psnr_db"] - pca[p["bytes_per_image"]] if p["method"].startswith("aekit") else None
        psnr = "inf" if math.isinf(p["psnr_db"]) else f"{p['psnr_db']:.2f}"
        lines.append(f"{p['method']:<12} {p.get('latent', '-'):>6} {str(p.get('quality') or '-'):>7} "
                     f"{p['bytes_per_image']:>7.1f} {psnr:>8} {'' if gain is None else f'{gain:+.2f}':>7} "
                     f"{p.get('train_cpu_s', ''):>11}")
    overhead = ", ".join(f"{rd.CODEC_NAMES[c]} {b} B" for c, b in report["container_overhead_bytes"].items())
    lines.append(f"container of a 1-pixel image: {overhead}")
    if "recognition" in report:
        few = probe.FEW_LABELS
        lines += ["", "recognition, held-out accuracy",
                  f"{'input':<12} {'dim':>4} {'linear':>7} {'k-NN':>6} {f'lin {few}/cls':>11} {f'kNN {few}/cls':>11}"]
        for r in report["recognition"]:
            lines.append(f"{r['input']:<12} {r['dim']:>4} {r['linear_probe_accuracy']:7.3f} {r['knn_accuracy']:6.3f} "
                         f"{r[f'linear_probe_accuracy_{few}_per_class']:11.3f} {r[f'knn_accuracy_{few}_per_class']:11.3f}")
    lines.append(f"figure: {report['figure']}; total cpu-s {report['cpu_s']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="bench-output")
    parser.add_argument("--latents", default=",".join(map(str, LATENTS)), help="code sizes, comma-separated")
    parser.add_argument("--epochs", type=int, default=None, help="override every point's epochs")
    parser.add_argument("--no-probe", action="store_true", help="skip the recognition table (minutes of CPU)")
    parser.add_argument("--quick", action="store_true", help="2 epochs, latents 16,32, fewer qualities, no probe")
    args = parser.parse_args()
    latents = tuple(int(v) for v in args.latents.split(","))
    if args.quick:
        run(args.output_dir, QUICK["latents"], args.epochs or QUICK["epochs"], False, QUICK["qualities"])
    else:
        run(args.output_dir, latents, args.epochs, not args.no_probe)


if __name__ == "__main__":
    main()
