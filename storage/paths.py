"""Paths: is a user's path usable, and how to write to it safely, on local disks and object stores.

Every command passes the paths a user gives (--dataset, --data-dir, --workdir, --model-base-path,
--output, serve's --model_base_path) through here, and every read and write goes through
tf.io.gfile, so one path string works everywhere:

  /data/run, runs/ae     local disk (also file://)
  gs://bucket/run        Google Cloud Storage (built into TensorFlow)
  ram://run              in memory, one process (tests)
  s3://, hdfs://, ...    only when a TensorFlow filesystem plugin registers the scheme

A scheme TensorFlow has no filesystem for is refused before any work, in one line, so a URL is
never taken for a relative local folder (pathlib turns gs://b into the folder gs:/b).
"""

from __future__ import annotations

import os
import posixpath
import socket

import tensorflow as tf
from tensorflow.python.lib.io import file_io  # get_registered_schemes: not re-exported under tf.io

# What to install for a scheme TF 2.21 lacks. Checked on this TF: tensorflow-io 0.37.1 (its
# newest release, built for TF 2.16) fails to load its plugins here (undefined tsl symbols),
# so s3:// has no working plugin for TF 2.21.
SCHEME_HINTS = {
    "s3": "tensorflow-io registers s3://, but its newest release (0.37.1) does not load under "
          "TensorFlow 2.21; mount the bucket as a local folder (e.g. a CSI or s3fs mount) or use gs://",
    "hdfs": "install tensorflow-io on a TensorFlow version it supports, or mount HDFS locally",
    "az": "install tensorflow-io on a TensorFlow version it supports, or mount the container locally",
    "http": "download the data first; TensorFlow cannot list or write http(s) URLs",
    "https": "download the data first; TensorFlow cannot list or write http(s) URLs",
}
LOCAL_SCHEMES = ("", "file")


class PathError(ValueError):
    """A path that cannot be used; the CLI prints it as one line."""

    exit_code = 2


def scheme(path: str) -> str:
    """'gs' for gs://b/x, '' for a local path."""
    head, sep, _ = str(path).partition("://")
    return head.lower() if sep and "/" not in head else ""


def is_local(path: str) -> bool:
    return scheme(path) in LOCAL_SCHEMES


def check(path: str, flag: str) -> str:
    """Returns `path` as a string if TensorFlow has a filesystem for its scheme, else PathError."""
    path = str(path)
    name = scheme(path)
    if name not in LOCAL_SCHEMES and name not in file_io.get_registered_schemes():
        hint = SCHEME_HINTS.get(name, "install the TensorFlow filesystem plugin that registers it")
        raise PathError(f"{flag} {path}: TensorFlow {tf.__version__} has no filesystem for {name}:// ({hint})")
    return path


def join(base: str, *parts: str) -> str:
    """Joins with '/' for URLs and the OS separator for local paths (never through pathlib)."""
    return posixpath.join(base, *parts) if not is_local(base) else os.path.join(base, *parts)


def exists(path: str) -> bool:
    return tf.io.gfile.exists(path)


def isdir(path: str) -> bool:
    return tf.io.gfile.isdir(path)


def listdir(path: str) -> list[str]:
    """Entry names (object stores list 'sub/' for folders: the slash is dropped)."""
    return [name.rstrip("/") for name in tf.io.gfile.listdir(path)]


def version_folders(base: str) -> dict[int, str]:
    """Numeric children of a model base path by version ('007' is version 7), as TF Serving's
    FileSystemStoragePathSource (file_system_storage_path_source.cc, PollFileSystemForServable)
    sees them: any child whose name is a number, whatever it holds. On object stores a child
    "exists" as soon as one object under it does, and GetChildren lists every descendant there,
    which is why it keeps only the first path component, as this does."""
    if not tf.io.gfile.isdir(base):
        return {}
    found = {}
    for name in listdir(base):
        name = name.split("/")[0]
        if name.isdigit():
            found.setdefault(int(name), name)
    return found


def makedirs(path: str) -> str:
    tf.io.gfile.makedirs(path)
    return path


def remove_tree(path: str) -> None:
    """Deletes `path` and everything under it; nothing to delete is fine."""
    try:
        tf.io.gfile.rmtree(path)
    except tf.errors.NotFoundError:
        # ram:// has no folder objects: rmtree deletes the files, then fails on the folder itself
        pass


def read_text(path: str) -> str:
    with tf.io.gfile.GFile(path, "r") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Writes the whole file or nothing. Local: a temporary file renamed over the target (atomic on
    POSIX). Object stores: one object, which readers see only once the upload completes."""
    if not is_local(path):
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(text)
        return
    temporary = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(temporary, "w") as f:
        f.write(text)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def check_writable(path: str, flag: str) -> str:
    """Creates `path` and writes and deletes a probe file in it: fails before a long job, not after."""
    check(path, flag)
    probe = join(path, f".aekit-write-check-{socket.gethostname()}-{os.getpid()}")
    try:
        makedirs(path)
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("ok")
        tf.io.gfile.remove(probe)
    except (tf.errors.OpError, OSError) as e:
        message = getattr(e, "message", None) or str(e)
        raise PathError(f"{flag} {path} is not writable ({message.splitlines()[0]}); "
                        "choose a folder you can write to") from None
    return path


def publish_tree(staging: str, final: str, last: str) -> None:
    """Moves the finished folder `staging` to `final` so that a reader polling `final` never
    finds the file `last` before every other file is complete.

    Local disks rename the folder at once (atomic on one filesystem). Object stores have no
    atomic rename, and a folder there exists as soon as one object under it does, so the files
    are copied one by one with `last` copied after all the others; then the staging copy goes.
    """
    if is_local(staging):
        tf.io.gfile.rename(staging, final)  # raises if `final` exists: the caller picks another name
        return
    files = sorted(_files_under(staging))
    files.sort(key=lambda relative: relative == last)  # `last` after everything else (stable)
    try:
        for relative in files:
            target = join(final, relative)
            makedirs(posixpath.dirname(target))
            tf.io.gfile.copy(join(staging, relative), target, overwrite=True)
    except tf.errors.OpError:
        remove_tree(final)  # without `last` it was never complete; a poller must not keep finding it
        raise
    remove_tree(staging)


def _files_under(root: str) -> list[str]:
    found = []
    for folder, _, names in tf.io.gfile.walk(root):
        relative_folder = posixpath.relpath(folder, root) if folder != root else ""
        found.extend(posixpath.join(relative_folder, name) if relative_folder else name for name in names
                     if tf.io.gfile.exists(posixpath.join(folder, name)))
    # The exists() check: ram:// lists children by bare name prefix, so a SavedModel's assets/
    # also "holds" .extra/tf_serving_warmup_requests (really assets.extra/...), a file that is not there.
    return found
