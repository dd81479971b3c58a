"""Reading client inputs (.npy, an image, a folder of images) and writing outputs (.npy or PNGs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from clients.errors import ClientError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def load_input(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 batch for a signature input of `shape` (-1 = batch): images are resized to the
    model's H x W, converted to its channel count and scaled to [0, 1]."""
    path = Path(path)
    if not path.exists():
        raise ClientError(f"input {path} does not exist", "INVALID_ARGUMENT")
    if path.suffix == ".npy":
        return _load_npy(path, shape)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files or files[0].suffix.lower() not in IMAGE_SUFFIXES:
        raise ClientError(f"input {path} is not a .npy file, a PNG/JPEG image or a folder of them",
                          "INVALID_ARGUMENT")
    if len(shape) != 4:
        raise ClientError(f"the model expects vectors of shape {shape[1:]}, not images; pass a .npy file",
                          "INVALID_ARGUMENT")
    return np.stack([_load_image(f, shape[1], shape[2], shape[3]) for f in files])


def _load_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    array = np.load(path, allow_pickle=False)
    if array.ndim == len(shape) - 1:  # one example without the batch axis
        array = array[None]
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    return array.astype(np.float32, copy=False)


def _load_image(path: Path, height: int, width: int, channels: int) -> np.ndarray:
    try:
        image = Image.open(path)
        image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
    except OSError as e:
        raise ClientError(f"cannot read image {path}: {e}", "INVALID_ARGUMENT") from None
    array = np.asarray(image, np.float32) / 255.0
    return array.reshape(height, width, channels)


def save_output(array: np.ndarray, path: str | Path) -> list[Path]:
    """.npy keeps everything; a .png path (one image) or a folder gets one PNG per image."""
    path = Path(path)
    if path.suffix == ".npy":
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, array)
        return [path]
    if array.ndim != 4:
        raise ClientError(f"output of shape {array.shape} is not images; write it to a .npy file",
                          "INVALID_ARGUMENT")
    if path.suffix.lower() == ".png":
        if len(array) != 1:
            raise ClientError(f"{len(array)} images cannot go into one file {path}; give a folder", "INVALID_ARGUMENT")
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_png(array[0], path)
        return [path]
    path.mkdir(parents=True, exist_ok=True)
    written = [path / f"{i:05d}.png" for i in range(len(array))]
    for image, target in zip(array, written):
        _save_png(image, target)
    return written


def _save_png(image: np.ndarray, path: Path) -> None:
    pixels = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)
