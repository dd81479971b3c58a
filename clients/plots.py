"""Figures a person looks at rather than reads (matplotlib, PNG).

    aekit plot --workdir runs/ae --model-base-path models/autoencoder --output-dir figures

reconstructions.png (originals / latent codes / reconstructions, as in the seed blog),
denoising.png (noisy / denoised / clean), latent_space.png (2-D PCA of the codes by label),
training_curves.png (loss, MSE, PSNR per epoch), anomaly_scores.png (error histogram and threshold),
anomaly_roc.png (ROC curve), anomaly_worst.png (worst-scored inputs with their anomaly maps),
rate_distortion.png (PSNR against bytes per image, one line per method) and compressed.png
(originals over their decompressed images, with the bytes each took).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PLOT_EXAMPLES = 1000  # held-out examples scored for the figures (all of mnist-sample's test split)


def _image(ax, image: np.ndarray, title: str | None = None) -> None:
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reconstructions(originals, latents, reconstructions, path, count: int = 10) -> Path:
    """Rows: original, latent code (shown as a small image), reconstruction."""
    count = min(count, len(originals))
    fig, axes = plt.subplots(3, count, figsize=(1.3 * count, 4.2), squeeze=False)
    side = math.ceil(math.sqrt(latents.shape[-1]))
    for i in range(count):
        _image(axes[0, i], originals[i], "original" if i == 0 else None)
        code = np.zeros(side * side, np.float32)
        code[: latents.shape[-1]] = latents[i]
        span = np.ptp(latents) or 1.0
        axes[1, i].imshow(((code - latents.min()) / span).reshape(side, side), cmap="viridis")
        axes[1, i].set_xticks([])
        axes[1, i].set_yticks([])
        if i == 0:
            axes[1, i].set_title(f"latent ({latents.shape[-1]})", fontsize=8)
        _image(axes[2, i], reconstructions[i], "reconstruction" if i == 0 else None)
    fig.suptitle("Autoencoder: originals, codes and reconstructions")
    return _save(fig, Path(path))


def plot_denoising(noisy, denoised, clean, path, count: int = 10) -> Path:
    count = min(count, len(noisy))
    fig, axes = plt.subplots(3, count, figsize=(1.3 * count, 4.2), squeeze=False)
    for i in range(count):
        _image(axes[0, i], noisy[i], "noisy input" if i == 0 else None)
        _image(axes[1, i], denoised[i], "denoised" if i == 0 else None)
        _image(axes[2, i], clean[i], "clean" if i == 0 else None)
    fig.suptitle("Denoising: noisy inputs and the model's outputs")
    return _save(fig, Path(path))


def plot_rate_distortion(points: list[dict], path, title: str = "Rate-distortion, held-out images") -> Path:
    """PSNR (dB) against bytes per image on a log axis, one line per `method`; a lossless point
    (PSNR inf, e.g. PNG) is a vertical dashed line at its bytes."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods = list(dict.fromkeys(p["method"] for p in points))
    for method in methods:
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["bytes_per_image"])
        finite = [p for p in mine if math.isfinite(p["psnr_db"])]
        if finite:
            ax.plot([p["bytes_per_image"] for p in finite], [p["psnr_db"] for p in finite], "o-", label=method,
                    markersize=4 if len(finite) > 1 else 9)  # a lone point (the demo model) stands out
        for p in mine:
            if not math.isfinite(p["psnr_db"]):
                ax.axvline(p["bytes_per_image"], color="gray", linestyle="--", linewidth=1)
                ax.annotate(f"{method} (lossless), {p['bytes_per_image']:.0f} B", (p["bytes_per_image"], 0.02),
                            xycoords=("data", "axes fraction"), rotation=90, fontsize=7, ha="right", va="bottom")
    ax.set_xscale("log")
    sizes = [p["bytes_per_image"] for p in points]
    ax.set_xticks([2 ** k for k in range(int(math.log2(min(sizes))), int(math.log2(max(sizes))) + 2)])
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 16, 32, ... not 2x10^1
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("bytes per image (log scale)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, Path(path))


def plot_compressed(originals, original_bytes, decompressed, code_bytes: int, path, count: int = 10) -> Path:
    """Top row: originals with their PNG size; bottom row: decompress(compress(x)) with the code's size."""
    count = min(count, len(originals))
    fig, axes = plt.subplots(2, count, figsize=(1.3 * count, 3.5), squeeze=False)
    for i in range(count):
        _image(axes[0, i], originals[i], f"PNG {original_bytes[i]} B")
        _image(axes[1, i], decompressed[i], f"code {code_bytes} B")
    fig.suptitle("Originals (top) and decompressed codes (bottom), with the bytes each takes")
    return _save(fig, Path(path))


def pca_2d(latents: np.ndarray) -> np.ndarray:
    centered = latents - latents.mean(axis=0)
    _, _, components = np.linalg.svd(centered, full_matrices=False)
    return centered @ components[:2].T


def plot_latent_space(latents, labels, path) -> Path:
    points = pca_2d(np.asarray(latents, np.float64))
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=6, alpha=0.8)
    fig.colorbar(scatter, ax=ax, label="label")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title("Latent space (PCA of the codes), coloured by label")
    return _save(fig, Path(path))


def plot_training_curves(history: list[dict], path) -> Path:
    epochs = [h["epoch"] for h in history]
    panels = [("loss", "training loss"), ("mse", "held-out MSE"), ("psnr_db", "held-out PSNR (dB)")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=title)
        if key == "psnr_db" and "denoised_psnr_db" in history[0]:
            ax.plot(epochs, [h["denoised_psnr_db"] for h in history], marker="s", label="denoised PSNR (dB)")
            ax.plot(epochs, [h["noisy_psnr_db"] for h in history], linestyle="--", label="noisy input PSNR (dB)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, Path(path))


def plot_score_histogram(normal_errors, threshold: float, path, anomaly_errors=None,
                         anomaly_label: str = "anomalies (noise images)", normal_label: str = "held-out digits",
                         xlabel: str = "anomaly score (score's anomaly_score)") -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    every = np.concatenate([normal_errors, anomaly_errors if anomaly_errors is not None else [], [threshold]])
    lower, upper = min(0.0, float(np.min(every))), float(np.max(every))  # the combined score can be negative
    bins = np.linspace(lower, upper + 0.05 * (upper - lower), 60)
    ax.hist(normal_errors, bins=bins, alpha=0.7, label=normal_label)
    if anomaly_errors is not None:
        ax.hist(anomaly_errors, bins=bins, alpha=0.7, label=anomaly_label)
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.4f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title("Anomaly scores")
    ax.legend()
    return _save(fig, Path(path))


def plot_roc_curve(normal_errors, anomaly_errors, path, threshold: float | None = None) -> Path:
    """False-positive rate against recall over every threshold; a dot at the stored one."""
    from sklearn import metrics

    truth = np.concatenate([np.zeros(len(normal_errors)), np.ones(len(anomaly_errors))])
    scores = np.concatenate([normal_errors, anomaly_errors])
    fpr, tpr, _ = metrics.roc_curve(truth, scores)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUROC {metrics.roc_auc_score(truth, scores):.3f}")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    if threshold is not None:
        ax.plot([np.mean(normal_errors > threshold)], [np.mean(anomaly_errors > threshold)], "o", color="red",
                label=f"stored threshold {threshold:.4f}")
    ax.set_xlabel("false-positive rate (normal inputs flagged)")
    ax.set_ylabel("recall (anomalies flagged)")
    ax.set_title("ROC curve of the anomaly score")
    ax.legend(loc="lower right")
    return _save(fig, Path(path))


def plot_worst_scored(images, error_maps, errors, path, count: int = 8) -> Path:
    """The highest-scored inputs above their anomaly maps (per-pixel squared error)."""
    order = np.argsort(errors)[::-1][:count]
    fig, axes = plt.subplots(2, len(order), figsize=(1.4 * len(order), 3.2), squeeze=False)
    for column, i in enumerate(order):
        _image(axes[0, column], images[i], f"score {errors[i]:.4f}")
        axes[1, column].imshow(error_maps[i][..., 0] if error_maps[i].shape[-1] == 1 else error_maps[i].mean(-1),
                               cmap="inferno")
        axes[1, column].set_xticks([])
        axes[1, column].set_yticks([])
    axes[1, 0].set_title("anomaly map", fontsize=8)
    fig.suptitle("Worst-scored inputs and where they are anomalous")
    return _save(fig, Path(path))


def plot_workdir(workdir: str, output_dir: str, model_base_path: str | None = None,
                 dataset: str = "mnist-sample") -> list[Path]:
    """Training curves from WORKDIR/history.json; with a model, the model figures on the test split."""
    from storage import paths  # workdirs may be local, gs:// or ram://; figures are written locally

    history_path = paths.join(paths.check(workdir, "--workdir"), "history.json")
    if not paths.exists(history_path):
        from training.config import ConfigError

        raise ConfigError(f"{history_path} does not exist; train with --workdir {workdir} first")
    out = Path(output_dir)
    written = [plot_training_curves(json.loads(paths.read_text(history_path)), out / "training_curves.png")]
    if model_base_path:
        written += plot_saved_model(model_base_path, dataset, out)
    return written


def plot_saved_model(model_base_path: str, dataset: str, out: Path, noise_factor: float = 0.4) -> list[Path]:
    """Runs the latest exported version in-process on the test split and draws its figures."""
    import tensorflow as tf

    from training import data
    from training.evaluate import latest_version_dir

    loaded = tf.saved_model.load(str(latest_version_dir(model_base_path)))
    arrays = data.to_arrays(data.load_source(dataset), limit=PLOT_EXAMPLES)
    clean = data.scale_to_unit(tf.constant(arrays.x_test)).numpy()
    call = lambda name, **kw: {k: v.numpy() for k, v in loaded.signatures[name](**kw).items()}  # noqa: E731
    latents = call("encode", images=clean)["latent"]
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0, noise_factor, clean.shape), 0, 1).astype(np.float32)
    scores = call("score", images=clean)
    anomalies = call("score", images=rng.random(clean[:200].shape).astype(np.float32))
    return [
        plot_reconstructions(clean, latents, call("decode", latent=latents)["reconstruction"], out / "reconstructions.png"),
        plot_denoising(noisy, call("denoise", images=noisy)["reconstruction"], clean, out / "denoising.png"),
        plot_latent_space(latents, arrays.y_test, out / "latent_space.png"),
        plot_score_histogram(scores["error"], float(scores["threshold"][0]), out / "anomaly_scores.png",
                             anomalies["error"]),
    ]
