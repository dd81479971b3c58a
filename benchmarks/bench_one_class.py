"""One-class anomaly detection, the protocol of Ruff et al. (ICML 2018, "Deep One-Class Classification").

    python -m benchmarks.bench_one_class [--epochs 20] [--digits 0,1,...]   # ~2.5 CPU-minutes for ten digits
    # -> bench-output/one_class.json, bench-output/figures/one_class_*.png

For each digit d: train on the training digits of class d only (`aekit train --normal-classes d`),
score the whole held-out split through the exported `score` signature, AUROC for "not d".
Our mnist-sample has ~400 training images per class; the paper trains on ~6,000 (full MNIST),
so its rows are a reference, not a like-for-like comparison.

Two scores are measured on the same model: `served` is the score signature's reconstruction MSE
(what `aekit evaluate --anomaly` reports); `latent_mahalanobis` is the Mahalanobis distance of
the encode signature's code to the training codes' Gaussian, computed here and not served.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

from training import anomaly, data, jobs
from training.config import TrainConfig
from training.evaluate import latest_version_dir

# Ruff et al. 2018, Table 1, MNIST AUROC (%), one row per method, digits 0..9.
REFERENCE = {
    "Ruff et al. one-class Deep SVDD": [98.0, 99.7, 91.7, 91.9, 94.9, 88.5, 98.3, 94.6, 93.9, 96.5],
    "Ruff et al. DCAE (conv autoencoder)": [97.6, 98.3, 85.4, 86.7, 86.5, 78.2, 94.6, 92.3, 86.5, 90.4],
}
GOAL = 0.97  # mean AUROC over the ten digits
SHRINKAGE = 1e-3  # added to the codes' covariance diagonal: 128 dimensions from ~400 codes


def run_digit(digit: int, out: Path, epochs: int, batch_size: int) -> dict:
    cfg = TrainConfig(normal_classes=str(digit), epochs=epochs, batch_size=batch_size,
                      workdir=str(out / f"digit{digit}" / "run"), model_base_path=str(out / f"digit{digit}" / "models"))
    jobs.train_job(cfg)
    report = anomaly.evaluate_anomaly(cfg.model_base_path, "mnist-sample", normal_classes=str(digit))
    return {"digit": digit, "served": report["auroc"], "latent_mahalanobis": latent_mahalanobis_auroc(cfg, digit),
            "average_precision": report["average_precision"], "fpr": report["fpr"], "recall": report["recall"]}


def latent_mahalanobis_auroc(cfg: TrainConfig, digit: int) -> float:
    import tensorflow as tf

    encode = tf.saved_model.load(str(latest_version_dir(cfg.model_base_path))).signatures["encode"]
    arrays = data.load_arrays("mnist-sample")
    codes = lambda x: np.concatenate([encode(images=b)["latent"].numpy()  # noqa: E731
                                      for b, _ in data.make_dataset(x, 256, training=False)])
    train, test = codes(arrays.x_train[arrays.y_train == digit]), codes(arrays.x_test)
    precision = np.linalg.inv(np.cov(train.T) + SHRINKAGE * np.eye(train.shape[1]))
    centred = test - train.mean(axis=0)
    distance = np.einsum("ij,jk,ik->i", centred, precision, centred)
    normal = arrays.y_test == digit
    return anomaly.detection_metrics(distance[normal], distance[~normal], np.inf)["auroc"]


def format_table(rows: list[dict]) -> str:
    header = "method".ljust(40) + "".join(f"{d:>6}" for d in range(10)) + "   mean"
    lines = [header]
    for name, values in REFERENCE.items():
        lines.append(name.ljust(40) + "".join(f"{v / 100:6.3f}" for v in values) + f"  {np.mean(values) / 100:.3f}")
    for key in ("served", "latent_mahalanobis"):
        by_digit = {r["digit"]: r[key] for r in rows}
        cells = "".join(f"{by_digit[d]:6.3f}" if d in by_digit else "     -" for d in range(10))
        lines.append(f"aekit conv AE, {key}".ljust(40) + cells + f"  {np.mean(list(by_digit.values())):.3f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="bench-output")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    args = parser.parse_args()
    out = Path(args.output_dir)
    start = time.monotonic()
    rows = [run_digit(int(d), out / "one_class", args.epochs, args.batch_size) for d in args.digits.split(",")]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {"rows": rows, "mean_auroc_served": float(np.mean([r["served"] for r in rows])),
              "mean_auroc_latent_mahalanobis": float(np.mean([r["latent_mahalanobis"] for r in rows])),
              "goal_mean_auroc": GOAL, "epochs": args.epochs, "batch_size": args.batch_size,
              "wall_seconds": time.monotonic() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime,
              "load_average": list(os.getloadavg())}
    print(format_table(rows))
    print(f"wall {report['wall_seconds']:.0f} s, CPU (user+sys) {report['cpu_seconds']:.0f} s, "
          f"load {report['load_average'][0]:.1f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "one_class.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
