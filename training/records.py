"""The TFRecord schema aekit reads and writes: one tf.train.Example per example.

  image examples   "image": bytes, either the raw uint8 pixels (row-major H x W x C) or an
                   encoded PNG/JPEG; "shape": int64 [H, W, C] (required for raw bytes)
  vector examples  "x": float list of length D, values in [0, 1] (tabular data)
  both             "label": int64, optional (used only to colour plots)

`aekit data convert` writes raw bytes with their shape (exact, and decoded per batch with one
decode_raw); TFDS shards hold encoded PNGs under their image feature's name, which this reads too.
A batch of serialized records is parsed and decoded at once (`parse_batch`), never one by one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

IMAGE_KEY, SHAPE_KEY, VECTOR_KEY, LABEL_KEY = "image", "shape", "x", "label"


class RecordError(ValueError):
    """Records that do not follow the schema; the message says which file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class RecordFormat:
    """How to turn a batch of serialized examples into a [batch, *shape] tensor."""
    kind: str  # "image" (uint8) or "vector" (float32)
    shape: tuple[int, ...]
    encoded: bool = False  # image bytes are PNG/JPEG rather than raw pixels
    image_key: str = IMAGE_KEY

    @property
    def dtype(self) -> tf.DType:
        return tf.uint8 if self.kind == "image" else tf.float32

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict) -> RecordFormat:
        return cls(value["kind"], tuple(value["shape"]), value.get("encoded", False),
                   value.get("image_key", IMAGE_KEY))


def image_example(image: np.ndarray, label: int = 0) -> bytes:
    """A raw-bytes image example: exact, and the fastest to decode."""
    image = np.ascontiguousarray(image, np.uint8)
    return tf.train.Example(features=tf.train.Features(feature={
        IMAGE_KEY: _bytes(image.tobytes()), SHAPE_KEY: _ints(image.shape), LABEL_KEY: _ints([label])})
    ).SerializeToString()


def vector_example(vector: np.ndarray, label: int = 0) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature={
        VECTOR_KEY: tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(vector, np.float32))),
        LABEL_KEY: _ints([label])})).SerializeToString()


def example_for(x: np.ndarray, label: int) -> bytes:
    return image_example(x, label) if x.dtype == np.uint8 else vector_example(x, label)


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _ints(values) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def detect_format(serialized: bytes, where: str, image_key: str | None = None) -> RecordFormat:
    """The format of a file's records, read from its first record."""
    try:
        feature = tf.train.Example.FromString(serialized).features.feature
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise RecordError(f"{where}: records are not tf.train.Example protos") from None
    if VECTOR_KEY in feature and feature[VECTOR_KEY].float_list.value:
        return RecordFormat("vector", (len(feature[VECTOR_KEY].float_list.value),))
    key = image_key or IMAGE_KEY
    if key not in feature or not feature[key].bytes_list.value:
        raise RecordError(f"{where}: examples have neither an '{IMAGE_KEY}' bytes feature nor an "
                          f"'{VECTOR_KEY}' float feature (found {sorted(feature)}); see `aekit data convert`")
    data = feature[key].bytes_list.value[0]
    shape = tuple(feature[SHAPE_KEY].int64_list.value) if SHAPE_KEY in feature else ()
    if shape and len(data) == int(np.prod(shape)):
        return RecordFormat("image", shape, encoded=False, image_key=key)
    try:
        decoded = tf.io.decode_image(data, expand_animations=False)
    except tf.errors.OpError:
        raise RecordError(f"{where}: '{key}' is neither raw pixels matching 'shape' {list(shape)} nor "
                          "a PNG/JPEG image") from None
    return RecordFormat("image", tuple(decoded.shape), encoded=True, image_key=key)


def parse_batch(serialized: tf.Tensor, fmt: RecordFormat) -> tf.Tensor:
    """[batch] serialized examples -> [batch, *shape] uint8 images or float32 vectors."""
    if fmt.kind == "vector":
        spec = {VECTOR_KEY: tf.io.FixedLenFeature(fmt.shape, tf.float32)}
        return tf.io.parse_example(serialized, spec)[VECTOR_KEY]
    spec = {fmt.image_key: tf.io.FixedLenFeature([], tf.string)}
    images = tf.io.parse_example(serialized, spec)[fmt.image_key]
    if not fmt.encoded:  # one op for the whole batch
        return tf.reshape(tf.io.decode_raw(images, tf.uint8), [-1, *fmt.shape])
    # PNG/JPEG decoding has no batched kernel: one map_fn inside the batch's single tf.data element.
    return tf.map_fn(lambda s: tf.ensure_shape(tf.io.decode_image(s, channels=fmt.shape[-1],
                                                                  expand_animations=False), fmt.shape),
                     images, fn_output_signature=tf.TensorSpec(fmt.shape, tf.uint8))


def parse_labels(serialized: tf.Tensor) -> tf.Tensor:
    spec = {LABEL_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=0)}
    return tf.io.parse_example(serialized, spec)[LABEL_KEY]


def first_record(path: str) -> bytes | None:
    for record in tf.data.TFRecordDataset(path).take(1):
        return record.numpy()
    return None


def count_records(path: str) -> int:
    """Reads the file once (bytes only, nothing parsed)."""
    return int(tf.data.TFRecordDataset(path, buffer_size=1 << 20).reduce(tf.constant(0, tf.int64),
                                                                          lambda n, _: n + 1))
