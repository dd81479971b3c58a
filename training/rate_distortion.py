"""Rate-distortion points on held-out images: an autoencoder's quantized codes, PCA at the same
bytes, and the PNG, JPEG and WebP codecs through Pillow.

    from training import rate_distortion as rd
    pca = rd.fit_pca(train_pixels, max_dim=128)
    rd.pca_point(pca, train_pixels, test_pixels, dim=32, bits=8)   # {"bytes_per_image": 32, "psnr_db": ...}
    rd.codec_point(test_uint8, "webp", quality=10)                   # bytes = each encoded image's size

Every point is PSNR over the whole split on [0, 1] pixels (training.evaluate.psnr_db of the mean
squared error) against the bytes one image takes. Codes are quantized as `aekit compress` stores
them (training/quantize.py): per-dimension min..max of the TRAINING split's codes, 2**bits evenly
spaced levels, values outside clipped. At 8 bits that is one byte per dimension; at 4 bits it is
16 levels over the same ranges and two codes share a byte (`pack_nibbles`), so a code of D
dimensions takes ceil(D * bits / 8) bytes. PCA (fitted on the training pixels, `fit_pca`) is
quantized the same way and its reconstruction clipped to [0, 1].

A codec point's bytes are the whole encoded file of each image, container included: Pillow's
smallest valid file of a 1-pixel grayscale image is what `container_overhead` returns (measured
with Pillow 13.0: PNG 67 B, JPEG 333 B (its headers and Huffman and quantization tables, at any
quality), WebP 44 B), so on 28x28 digits most of a JPEG file is container: PNG of the same
digits averages 275 B, JPEG at quality 10 401 B.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from training.evaluate import psnr_db

CODECS = ("png", "jpeg", "webp")
PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
CODEC_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WebP"}  # how tables and figures name them
PNG_QUALITY = None  # PNG is lossless: one point, compressed at Pillow's highest zlib level


def code_bytes(dim: int, bits: int) -> int:
    """Bytes one code of `dim` dimensions at `bits` per dimension takes, packed."""
    return math.ceil(dim * bits / 8)


def quantize_levels(codes: np.ndarray, low: np.ndarray, high: np.ndarray, bits: int) -> np.ndarray:
    """float codes [N, D] -> level indices uint8 [N, D] in 0..2**bits-1 over [low, high], clipped
    (at bits=8 the same as training.quantize.quantize_np)."""
    top = np.float32(2 ** bits - 1)
    scaled = (np.asarray(codes, np.float32) - low) / (high - low) * top
    return np.clip(np.round(scaled), 0, top).astype(np.uint8)


def dequantize_levels(steps: np.ndarray, low: np.ndarray, high: np.ndarray, bits: int) -> np.ndarray:
    """Level indices -> float32 codes at the levels' values."""
    return (low + np.asarray(steps).astype(np.float32) / np.float32(2 ** bits - 1) * (high - low)).astype(np.float32)


def code_ranges(train_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension (low, high) of the training codes; a constant dimension still gets a span."""
    low, high = train_codes.min(0).astype(np.float32), train_codes.max(0).astype(np.float32)
    return low, np.maximum(high, low + np.float32(1e-6))


def pack_nibbles(steps: np.ndarray) -> np.ndarray:
    """4-bit level indices [N, D] -> bytes [N, ceil(D / 2)]: dimension 2k in the high nibble of
    byte k, 2k+1 in the low one (a zero nibble pads an odd D)."""
    steps = np.asarray(steps, np.uint8)
    if steps.size and steps.max() > 15:
        raise ValueError(f"4-bit codes must be 0..15; got {int(steps.max())}")
    if steps.shape[1] % 2:
        steps = np.concatenate([steps, np.zeros((len(steps), 1), np.uint8)], 1)
    return ((steps[:, 0::2] << 4) | steps[:, 1::2]).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of `pack_nibbles`: bytes [N, ceil(D / 2)] -> 4-bit level indices [N, dim]."""
    packed = np.asarray(packed, np.uint8)
    steps = np.stack([packed >> 4, packed & 0x0F], axis=2).reshape(len(packed), -1)
    return steps[:, :dim]


def psnr(pixels: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR over the whole set, pixels in [0, 1] (inf when equal)."""
    pixels = np.asarray(pixels, np.float64).reshape(len(pixels), -1)
    diff = np.asarray(reconstruction, np.float64).reshape(len(pixels), -1) - pixels
    return psnr_db(float(np.mean(np.square(diff))))


def quantized_point(encode: Callable, decode: Callable, train_codes: np.ndarray, test_pixels: np.ndarray,
                    bits: int) -> dict:
    """PSNR of decode(dequantize(quantize(encode(x)))) on the held-out pixels at `bits` per dimension;
    the 4-bit codes go through pack/unpack, so the bytes counted are the bytes decoded."""
    low, high = code_ranges(train_codes)
    codes = encode(test_pixels)
    steps = quantize_levels(codes, low, high, bits)
    if bits == 4:
        steps = unpack_nibbles(pack_nibbles(steps), codes.shape[1])
    rebuilt = np.clip(decode(dequantize_levels(steps, low, high, bits)), 0.0, 1.0)
    return {"bytes_per_image": code_bytes(codes.shape[1], bits), "bits": bits, "dim": int(codes.shape[1]),
            "psnr_db": psnr(test_pixels, rebuilt)}


@dataclasses.dataclass(frozen=True)
class PCA:
    """Principal components of the training pixels: mean [P] and components [K, P] (rows, by variance)."""
    mean: np.ndarray
    components: np.ndarray

    def encode(self, pixels: np.ndarray, dim: int) -> np.ndarray:
        return (np.reshape(pixels, (len(pixels), -1)) - self.mean) @ self.components[:dim].T

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return codes @ self.components[:codes.shape[1]] + self.mean


def fit_pca(train_pixels: np.ndarray, max_dim: int) -> PCA:
    """The first `max_dim` principal components: eigenvectors of the centred training pixels'
    scatter matrix by decreasing eigenvalue. Exact like a full SVD (the first k are a k-component
    PCA, so one fit serves every code size) and cheaper for 4,000 x 784 pixels: 784 x 784 eigh
    took 1.8 CPU-s where the SVD took 9.5 (numpy, 2 shared cores)."""
    flat = np.reshape(np.asarray(train_pixels, np.float64), (len(train_pixels), -1))
    mean = flat.mean(0)
    centred = flat - mean
    values, vectors = np.linalg.eigh(centred.T @ centred)
    order = np.argsort(values)[::-1][:min(max_dim, *flat.shape)]
    return PCA(mean, vectors[:, order].T)


def pca_point(pca: PCA, train_pixels: np.ndarray, test_pixels: np.ndarray, dim: int, bits: int) -> dict:
    """PCA with `dim` components, quantized like a code, on the held-out pixels."""
    return quantized_point(lambda x: pca.encode(x, dim), pca.decode, pca.encode(train_pixels, dim),
                           test_pixels, bits)


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 [H, W] or [H, W, 1|3] -> a grayscale or RGB Pillow image."""
    image = np.asarray(image, np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    return Image.fromarray(image)


def encode_image(image: np.ndarray, codec: str, quality: int | None) -> bytes:
    """One image's file bytes in `codec` (png | jpeg | webp) at `quality` (ignored for png)."""
    buffer = io.BytesIO()
    options = {"optimize": True, "compress_level": 9} if codec == "png" else {"quality": int(quality)}
    if codec == "webp":
        options["method"] = 6  # slowest, smallest: the point is the best each codec can do
    to_pil(image).save(buffer, PIL_FORMAT[codec], **options)
    return buffer.getvalue()


def decode_image(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """File bytes -> uint8 pixels in `shape` (grayscale sources come back from WebP as RGB)."""
    image = Image.open(io.BytesIO(data))
    channels = shape[2] if len(shape) == 3 else 1
    image = image.convert("L" if channels == 1 else "RGB")
    return np.asarray(image, np.uint8).reshape(shape)


def codec_point(images: np.ndarray, codec: str, quality: int | None = None) -> dict:
    """Mean encoded bytes per image and PSNR of the decoded images, over uint8 `images` [N, H, W(, C)]."""
    images = np.asarray(images, np.uint8)
    sizes, decoded = [], np.empty_like(images)
    for i, image in enumerate(images):
        data = encode_image(image, codec, quality)
        sizes.append(len(data))
        decoded[i] = decode_image(data, image.shape)
    return {"method": CODEC_NAMES[codec], "codec": codec, "quality": quality, "bytes_per_image": float(np.mean(sizes)),
            "psnr_db": psnr(images / 255.0, decoded / 255.0)}


def container_overhead(codec: str, quality: int = 75) -> int:
    """Bytes of the smallest file `codec` writes: a 1-pixel grayscale image."""
    return len(encode_image(np.zeros((1, 1), np.uint8), codec, quality))


def json_point(point: dict) -> dict:
    """A point as strict JSON: a lossless point's PSNR (inf) becomes null with "lossless": true."""
    point = {k: (float(v) if isinstance(v, np.floating) else v) for k, v in point.items()}
    if not math.isfinite(point["psnr_db"]):
        point.update(psnr_db=None, lossless=True)
    return point


def codec_points(images: np.ndarray, qualities: dict[str, tuple[int, ...]]) -> list[dict]:
    """PNG once (lossless), JPEG and WebP at each of their qualities."""
    points = [codec_point(images, "png")] if "png" in qualities else []
    for codec in ("jpeg", "webp"):
        points += [codec_point(images, codec, q) for q in qualities.get(codec, ())]
    return points
