"""The code file: what `aekit compress` writes and `aekit decompress` reads.

Layout (all integers little-endian):

    offset      size  field
    0           8     magic b"AEKCODE\\n"
    8           2     format version, uint16 (FORMAT_VERSION)
    10          4     header length H, uint32
    14          H     header, UTF-8 JSON: model (name), version (int), fingerprint (sha256 hex of the
                      decoder's weights and the quantization ranges, as the export's
                      assets.extra/aekit_compression.json records it), latent_dim, image_shape,
                      count (records), labels (bool), codec ("none" | "zlib" | "lzma")
    14+H        B     body: `count` records through the codec; a record is latent_dim uint8 codes,
                      then the label as int64 when labels is true
    14+H+B      8     end marker b"AEKCEND\\n"
    22+H+B      8     B, uint64
    30+H+B      32    sha256 of every byte before it

A file without the end marker where its trailer should be is truncated; a trailer whose checksum
or body length does not match is corrupt. The checksum is verified over the whole file before any
record is decoded, so a damaged file is refused, never decoded into garbage.
Writing and reading stream: one batch of records in memory at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import struct
import zlib
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from training.config import ConfigError

MAGIC = b"AEKCODE\n"
END_MAGIC = b"AEKCEND\n"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<8sHI")  # magic, format version, header length
TRAILER = struct.Struct("<8sQ32s")  # end marker, body length, sha256
LABEL_DTYPE = np.dtype("<i8")
CODECS = ("none", "zlib", "lzma")
READ_CHUNK = 1 << 16  # bytes read per step when streaming a file


class CodeFileError(ConfigError):
    """A code file that cannot be decoded (not one, damaged, or from another model): one line."""


@dataclasses.dataclass(frozen=True)
class Header:
    model: str  # the model's name (the --model-base-path folder's name)
    version: int  # the model version whose compress signature wrote the codes
    fingerprint: str  # sha256 hex of that version's decoder weights and quantization ranges
    latent_dim: int  # bytes of codes per record
    image_shape: tuple[int, ...]  # the shape of one decoded image (the source's shape)
    count: int  # records in the file
    labels: bool  # whether each record carries an int64 label
    codec: str = "zlib"  # how the body is stored: none | zlib | lzma

    @property
    def record_bytes(self) -> int:
        return self.latent_dim + (LABEL_DTYPE.itemsize if self.labels else 0)


def _compressor(codec: str):
    if codec == "zlib":
        return zlib.compressobj(9)
    if codec == "lzma":
        return lzma.LZMACompressor()
    if codec == "none":
        return None
    raise ConfigError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")


def _decompressor(codec: str):
    return {"zlib": zlib.decompressobj, "lzma": lzma.LZMADecompressor, "none": lambda: None}[codec]()


class Writer:
    """Appends records to a code file; `close` checks the count and writes the trailer.

        with Writer(tf.io.gfile.GFile(path, "wb"), header) as w:
            w.write(codes_uint8, labels)
    """

    def __init__(self, stream, header: Header):
        self.stream, self.header = stream, header
        self.digest, self.body_bytes, self.written = hashlib.sha256(), 0, 0
        self.compressor = _compressor(header.codec)
        encoded = json.dumps(dataclasses.asdict(header), sort_keys=True).encode()
        self._out(PREFIX.pack(MAGIC, FORMAT_VERSION, len(encoded)) + encoded)

    def _out(self, data: bytes, body: bool = False) -> None:
        self.digest.update(data)
        self.stream.write(data)
        self.body_bytes += len(data) if body else 0

    def write(self, codes: np.ndarray, labels: np.ndarray | None = None) -> None:
        codes = np.ascontiguousarray(codes, np.uint8).reshape(len(codes), self.header.latent_dim)
        if self.header.labels:
            labels = np.asarray(labels).astype(LABEL_DTYPE).reshape(len(codes), 1).view(np.uint8)
            codes = np.concatenate([codes, labels], axis=1)
        raw = codes.tobytes()
        self._out(self.compressor.compress(raw) if self.compressor else raw, body=True)
        self.written += len(codes)

    def close(self) -> None:
        if self.compressor:
            self._out(self.compressor.flush(), body=True)
        if self.written != self.header.count:
            raise CodeFileError(f"wrote {self.written} records but the header promised {self.header.count}")
        end = struct.pack("<8sQ", END_MAGIC, self.body_bytes)
        self._out(end)
        self.stream.write(self.digest.digest())
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            self.close()
        else:
            self.stream.close()


def read_header(path: str) -> tuple[Header, int]:
    """The header of the code file at `path` and the body's offset; refuses non-code files in one line."""
    with tf.io.gfile.GFile(path, "rb") as f:
        prefix = f.read(PREFIX.size)
        if len(prefix) < PREFIX.size or prefix[:8] != MAGIC:
            raise CodeFileError(f"{path} is not an aekit code file (no {MAGIC!r} magic); write one with "
                                "`aekit compress`")
        _, version, length = PREFIX.unpack(prefix)
        if version != FORMAT_VERSION:
            raise CodeFileError(f"{path} is code file format {version}; this aekit reads format {FORMAT_VERSION}")
        encoded = f.read(length)
    if len(encoded) < length:
        raise CodeFileError(f"{path} is truncated: it ends inside its header")
    try:
        fields = json.loads(encoded)
        header = Header(**{**fields, "image_shape": tuple(fields["image_shape"])})
    except (ValueError, TypeError, KeyError):
        raise CodeFileError(f"{path} is corrupt: its header is not the JSON of a code file") from None
    if header.codec not in CODECS:
        raise CodeFileError(f"{path} is corrupt: unknown codec {header.codec!r} in its header")
    return header, PREFIX.size + length


def verify(path: str) -> Header:
    """The header, after checking the trailer and the checksum of the whole file (one streamed pass)."""
    header, body_start = read_header(path)
    size = tf.io.gfile.stat(path).length
    if size < body_start + TRAILER.size:
        raise CodeFileError(f"{path} is truncated: it ends before its trailer ({size} bytes)")
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        remaining = size - 32
        while remaining > 0:
            chunk = f.read(min(READ_CHUNK, remaining))
            if not chunk:
                raise CodeFileError(f"{path} is truncated: it shrank while being read")
            digest.update(chunk)
            remaining -= len(chunk)
        f.seek(size - TRAILER.size)
        end, body_bytes, checksum = TRAILER.unpack(f.read(TRAILER.size))
    if end != END_MAGIC:
        raise CodeFileError(f"{path} is truncated: no end marker where its trailer should be ({size} bytes)")
    if body_bytes != size - TRAILER.size - body_start or checksum != digest.digest():
        raise CodeFileError(f"{path} is corrupt: its sha256 checksum does not match its contents")
    return header


def records(path: str, header: Header, body_start: int, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(codes uint8 [n, D], labels int64 [n] or None) in batches of `batch` records; call after `verify`."""
    step, pending, seen = batch * header.record_bytes, bytearray(), 0
    for data in _decoded_body(path, header.codec, body_start):
        pending += data
        while len(pending) >= step:
            yield _split_records(bytes(pending[:step]), header)
            del pending[:step]
            seen += batch
    if len(pending) % header.record_bytes:
        raise CodeFileError(f"{path} is corrupt: its body ends inside a record")
    if pending:
        yield _split_records(bytes(pending), header)
        seen += len(pending) // header.record_bytes
    if seen != header.count:
        raise CodeFileError(f"{path} is corrupt: it holds {seen} records, its header says {header.count}")


def _decoded_body(path: str, codec: str, body_start: int) -> Iterator[bytes]:
    """The body's raw record bytes, chunk by chunk, through the codec."""
    decompressor = _decompressor(codec)
    with tf.io.gfile.GFile(path, "rb") as f:
        f.seek(body_start)
        remaining = tf.io.gfile.stat(path).length - TRAILER.size - body_start
        try:
            while remaining > 0:
                chunk = f.read(min(READ_CHUNK, remaining))
                remaining -= len(chunk)
                yield decompressor.decompress(chunk) if decompressor else chunk
            if codec == "zlib":
                yield decompressor.flush()
        except (zlib.error, lzma.LZMAError):
            raise CodeFileError(f"{path} is corrupt: its {codec} body does not decode") from None


def _split_records(raw: bytes, header: Header) -> tuple[np.ndarray, np.ndarray | None]:
    rows = np.frombuffer(raw, np.uint8).reshape(-1, header.record_bytes)
    codes = rows[:, :header.latent_dim]
    labels = rows[:, header.latent_dim:].copy().view(LABEL_DTYPE)[:, 0] if header.labels else None
    return codes, labels
