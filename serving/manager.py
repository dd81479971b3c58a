"""Model management: which versions of which models are loaded, as TF Serving decides it.

Versions are numeric folders under each model's base_path. A poll (at start, every
--file_system_poll_wait_seconds, and on a config reload) compares them with the model's
version policy, loads what is aspired and missing, and unloads what is no longer aspired.
A version that fails to load never replaces the one being served: it stays LOADING while it is
retried (--max_num_load_retries, every --load_retry_interval_micros, as TF Serving), then ends
with the error in its status, and loads again once its files change. A reload is all or nothing.
Requests hold a reference to the Servable they resolved, so an unload never breaks them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable

import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving.errors import (
    ServingError,
    failed_precondition,
    invalid_argument,
    not_found,
    unavailable,
)
from serving.servable import Servable
from storage import paths

log = logging.getLogger(__name__)
State = get_model_status_pb2.ModelVersionStatus.State


@dataclasses.dataclass
class VersionState:
    version: int
    state: int = State.START
    error: ServingError | None = None  # why it failed to load, shown in its status
    servable: Servable | None = None
    failures: int = 0  # failed loads in a row; retried up to max_num_load_retries times
    retry_at: float | None = None  # time.monotonic() of the next retry while LOADING
    files: tuple = ()  # files_stamp() at the last failure: a change is a reason to load again


@dataclasses.dataclass
class ModelEntry:
    config: model_server_config_pb2.ModelConfig
    versions: dict[int, VersionState] = dataclasses.field(default_factory=dict)
    reported_empty: bool = False  # "No versions ... found" was logged for the current empty state


def versions_on_disk(base_path: str) -> list[int]:
    """Numeric children of the base path, on any tf.io.gfile filesystem (local, gs://, ram://)."""
    return sorted(paths.version_folders(base_path))


def aspired_versions(policy,
                     on_disk: list[int]) -> set[int]:
    """The versions the policy wants served: latest N (default 1), all, or specific ones."""
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return set(on_disk)
    if choice == "specific":
        return set(policy.specific.versions) & set(on_disk)
    count = policy.latest.num_versions if choice == "latest" and policy.latest.num_versions > 0 else 1
    return set(on_disk[-count:])


def check_model_config(config: model_server_config_pb2.ModelServerConfig) -> None:
    if config.WhichOneof("config") != "model_config_list":
        raise invalid_argument("ModelServerConfig must have a model_config_list")
    names = set()
    for model in config.model_config_list.config:
        if not model.name:
            raise invalid_argument("a model config has no name")
        if model.name in names:
            raise invalid_argument(f"Illegal to list model {model.name} multiple times in config list")
        if not model.base_path:
            raise invalid_argument(f"model {model.name} has no base_path")
        if model.model_platform not in ("", "tensorflow"):
            raise invalid_argument(f"model {model.name}: model_platform {model.model_platform!r} is not "
                                   "supported; use \"tensorflow\"")
        names.add(model.name)


def _check_labels(entries, aspired: dict[str, set[int]]) -> None:
    """Labels must point at available versions that the policy keeps (TF Serving's
    allow_version_labels_for_unavailable_models is off by default)."""
    for entry in entries:
        for version in entry.config.version_labels.values():
            state = entry.versions.get(version)
            if state is None or state.state != State.AVAILABLE or version not in aspired[entry.config.name]:
                raise failed_precondition(
                    f"Request to assign label to version {version} of model {entry.config.name}, "
                    "which is not currently available for inference")


class ModelManager:
    """Holds the model set; `resolve` finds the servable for a request."""

    def __init__(self, loader: Callable[[str, int, str], Servable] = Servable,
                 warmup: Callable[[Servable], int] | None = None,
                 on_event: Callable[[str, str, int], None] | None = None,
                 max_load_retries: int = 5, load_retry_interval: float = 60.0):
        self._loader, self.warmup = loader, warmup
        # TF Serving's --max_num_load_retries and --load_retry_interval_micros (in seconds here)
        self.max_load_retries, self.load_retry_interval = max_load_retries, load_retry_interval
        self.on_event = on_event or (lambda event, name, version: None)
        self._models: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()  # guards _models
        self._poll_lock = threading.Lock()  # one poll at a time: loads are slow
        self._stop = threading.Event()
        self._wake = threading.Event()  # a retry was scheduled, or stop: the poller looks again
        self.initial_load_done = threading.Event()

    # ---- config and polling -------------------------------------------------------------
    def reload(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Replaces the whole model set, all or nothing: the new set is loaded beside the old one
        (which keeps serving) and takes over only if its labels point at available versions;
        otherwise what it loaded is unloaded and the old set stays as it was."""
        check_model_config(config)
        with self._poll_lock:
            staged = self._staged_models(config)
            aspired = {name: self._poll_model(entry, unload=False) for name, entry in staged.items()}
            try:
                _check_labels(staged.values(), aspired)
            except ServingError:
                self._discard_staged(staged)
                raise
            with self._lock:
                dropped = [e for name, e in self._models.items() if name not in staged]
                self._models = staged
            for entry in dropped:
                self._unload_all(entry)
            self._poll_locked()  # now the superseded versions go

    def configure(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Sets the model set without loading (the poller loads it)."""
        check_model_config(config)
        with self._poll_lock:
            staged = self._staged_models(config)
            with self._lock:
                dropped = [e for name, e in self._models.items() if name not in staged]
                self._models = staged
        for entry in dropped:
            self._unload_all(entry)

    def _staged_models(self, config: model_server_config_pb2.ModelServerConfig) -> dict[str, ModelEntry]:
        """Entries for `config` sharing the current versions of models it keeps (only the
        available ones if a model's base_path changed, so they serve until the new path loads)."""
        staged = {}
        with self._lock:
            for model_config in config.model_config_list.config:
                current = self._models.get(model_config.name)
                versions = {} if current is None else dict(current.versions)
                if current is not None and current.config.base_path != model_config.base_path:
                    versions = {v: s for v, s in versions.items() if s.state == State.AVAILABLE}
                staged[model_config.name] = ModelEntry(model_config, versions, bool(current and current.reported_empty))
        return staged

    def _discard_staged(self, staged: dict[str, ModelEntry]) -> None:
        with self._lock:
            current = {id(s) for e in self._models.values() for s in e.versions.values()}
        for entry in staged.values():
            for state in entry.versions.values():
                if id(state) not in current and state.state == State.AVAILABLE:
                    self._unload(entry, state)

    def _unload_all(self, entry: ModelEntry) -> None:
        for state in list(entry.versions.values()):
            if state.state == State.AVAILABLE:
                self._unload(entry, state)

    def poll(self) -> None:
        with self._poll_lock:
            self._poll_locked()

    def _poll_locked(self) -> None:
        with self._lock:
            entries = list(self._models.values())
        for entry in entries:
            self._poll_model(entry)

    def _poll_model(self, entry: ModelEntry, unload: bool = True) -> set[int]:
        """Loads the versions the policy aspires, then (with `unload`) drops the others; returns
        the aspired versions."""
        config = entry.config
        on_disk = versions_on_disk(config.base_path)
        if not on_disk and not entry.reported_empty:  # said once, not at every poll
            log.warning("No versions of servable %s found under base path %s", config.name, config.base_path)
        entry.reported_empty = not on_disk
        aspired = aspired_versions(config.model_version_policy, on_disk)
        for version in sorted(aspired):
            if self._should_load(entry, entry.versions.get(version)):
                self._load(entry, version)
        if not unload:
            return aspired
        self._cancel_retries(entry, aspired)
        serving_aspired = any(entry.versions[v].state == State.AVAILABLE for v in aspired if v in entry.versions)
        for version, state in list(entry.versions.items()):
            if version in aspired or state.state != State.AVAILABLE:
                continue
            # Availability first: keep an old version until an aspired one serves, unless it is gone.
            if serving_aspired or version not in on_disk:
                self._unload(entry, state)
        return aspired

    def _cancel_retries(self, entry: ModelEntry, aspired: set[int]) -> None:
        """A version waiting for a retry that is no longer aspired stops retrying (TF Serving's
        LoaderHarness::set_cancel_load_retry)."""
        with self._lock:
            for version, state in entry.versions.items():
                if version not in aspired and state.retry_at is not None:
                    state.state, state.retry_at = State.END, None
                    state.error = failed_precondition(f"Load cancelled: version {version} is no longer aspired")

    def _should_load(self, entry: ModelEntry, known: VersionState | None) -> bool:
        """New or unloaded versions load; a failed one when its retry is due or its files changed
        (a version copied in place, or unreadable when first scanned, loads once complete)."""
        if known is None or (known.state == State.END and known.error is None):
            return True
        if known.retry_at is None and known.state != State.END:
            return False  # loading, available or unloading
        if known.retry_at is not None and time.monotonic() >= known.retry_at:
            return True
        folder = self._version_path(entry, known.version)
        return files_stamp(str(folder)) != known.files

    def _version_path(self, entry: ModelEntry, version: int) -> str:
        return paths.join(entry.config.base_path, _version_folder(entry.config.base_path, version))

    def _load(self, entry: ModelEntry, version: int) -> None:
        name = entry.config.name
        with self._lock:
            state = entry.versions.get(version)
            if state is None or state.retry_at is None:  # a first attempt, or files changed: a full budget
                state = entry.versions[version] = VersionState(version, State.LOADING)
            state.state, state.retry_at = State.LOADING, None
        path = self._version_path(entry, version)
        started = time.monotonic()
        try:
            servable = self._loader(name, version, path)
            if self.warmup:
                self.warmup(servable)
        except Exception as e:  # noqa: BLE001 - any failure becomes the version's status
            self._failed(entry, state, path, e.message if isinstance(e, ServingError) else str(e))
            return
        with self._lock:
            state.servable, state.state, state.failures = servable, State.AVAILABLE, 0
        log.info("Successfully loaded servable version {name: %s version: %d} in %.2fs", name, version,
                 time.monotonic() - started)
        self.on_event("load", name, version)

    def _failed(self, entry: ModelEntry, state: VersionState, path: str, message: str) -> None:
        """As TF Serving's LoaderHarness::Load: the version stays LOADING while it has retries
        left (one every load_retry_interval), then ends with the error in its status."""
        name, version = entry.config.name, state.version
        stamp = files_stamp(str(path))
        with self._lock:
            state.failures += 1
            state.files = stamp
            if state.failures <= self.max_load_retries:
                state.retry_at = time.monotonic() + max(self.load_retry_interval, 0.0)
            else:
                state.state, state.error = State.END, invalid_argument(message)
        if state.retry_at is not None:
            log.error("Servable {name: %s version: %d} load failure: %s; retry %d of %d in %.1fs", name, version,
                      message, state.failures, self.max_load_retries, max(self.load_retry_interval, 0.0))
            self._wake.set()
            return
        log.error("Loading servable {name: %s version: %d} failed: %s", name, version, message)
        self.on_event("load_failure", name, version)

    def next_retry_in(self) -> float | None:
        """Seconds until the earliest load retry is due (None: none pending)."""
        with self._lock:
            due = [s.retry_at for e in self._models.values() for s in e.versions.values() if s.retry_at is not None]
        return max(min(due) - time.monotonic(), 0.0) if due else None

    def _unload(self, entry: ModelEntry, state: VersionState) -> None:
        with self._lock:
            state.state = State.UNLOADING
            state.servable = None  # requests in flight keep their own reference
            state.state = State.END
        log.info("Unloaded servable version {name: %s version: %d}", entry.config.name, state.version)
        self.on_event("unload", entry.config.name, state.version)

    def start_polling(self, interval_seconds: float) -> None:
        """Loads now (in the background), then rescans every `interval_seconds` (0: never), and
        whenever a load retry is due."""
        def loop():
            try:
                self.poll()
            finally:
                self.initial_load_done.set()
            self.on_event("poll", "", 0)
            while not self._stop.is_set():
                retry_in = self.next_retry_in()
                waits = [t for t in (interval_seconds if interval_seconds > 0 else None, retry_in) if t is not None]
                self._wake.wait(min(waits) if waits else None)
                self._wake.clear()
                if self._stop.is_set():
                    break
                try:
                    self.poll()
                except Exception:  # noqa: BLE001 - a bad scan must not kill the poller
                    log.exception("file system poll failed")
        threading.Thread(target=loop, name="version-poller", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # ---- queries ------------------------------------------------------------------------
    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable for a ModelSpec: version, label, or the latest available version."""
        if not name:
            raise invalid_argument("ModelSpec has no name specified.")
        with self._lock:
            entry = self._models.get(name)
            if label:
                if entry is None or label not in entry.config.version_labels:
                    raise invalid_argument(f"Unrecognized servable version label: {label}")
                version = entry.config.version_labels[label]
            if entry is not None:
                if version is None:
                    available = [v for v, s in entry.versions.items() if s.state == State.AVAILABLE]
                    if available:
                        return entry.versions[max(available)].servable
                else:
                    state = entry.versions.get(version)
                    if state is not None and state.state == State.AVAILABLE:
                        return state.servable
                if self._loading(entry, version):
                    # Retryable, like TF Serving before its ports open: clients back off and retry.
                    raise unavailable(f"Model {name} is still loading; retry shortly")
        spec = f"Latest({name})" if version is None else f"Specific({name}, {version})"
        raise not_found(f"Servable not found for request: {spec}")

    def _loading(self, entry: ModelEntry, version: int | None) -> bool:
        if version is not None:
            state = entry.versions.get(version)
            return state is not None and state.state == State.LOADING
        return not self.initial_load_done.is_set() or any(s.state == State.LOADING for s in entry.versions.values())

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[VersionState]:
        if not name:
            raise invalid_argument("ModelSpec has no name specified.")
        with self._lock:
            entry = self._models.get(name)
            if entry is None or not entry.versions:
                raise not_found(f"Could not find any versions of model {name}")
            if label:
                if label not in entry.config.version_labels:
                    raise invalid_argument(f"Unrecognized servable version label: {label}")
                version = entry.config.version_labels[label]
            if version is None:
                return [dataclasses.replace(s) for _, s in sorted(entry.versions.items(), reverse=True)]
            if version not in entry.versions:
                raise not_found(f"Could not find version {version} of model {name}")
            return [dataclasses.replace(entry.versions[version])]

    def ready(self) -> bool:
        """True once every configured model has an available version (drives health checks)."""
        if not self.initial_load_done.is_set():
            return False
        with self._lock:
            return bool(self._models) and all(
                any(s.state == State.AVAILABLE for s in e.versions.values()) for e in self._models.values())


def files_stamp(folder: str) -> tuple:
    """What a version folder's files look like (name, size, times, mode): when it changes after a
    failed load (a copy finished, permissions fixed), the version is loaded again."""
    stamp = []
    for root, _, names in tf.io.gfile.walk(folder):  # errors (a folder going away) end the walk
        for name in names:
            path = os.path.join(root, name)
            try:
                stamp.append((path, *_file_signature(path)))
            except (OSError, tf.errors.OpError):
                stamp.append((path, None))
    return tuple(sorted(stamp, key=lambda item: item[0]))


def _file_signature(path: str) -> tuple:
    if "://" in path:  # object stores: what gfile knows
        info = tf.io.gfile.stat(path)
        return info.length, info.mtime_nsec
    info = os.stat(path)  # ctime and mode too: a chmod makes an unreadable file readable
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_mode


def _version_folder(base_path: str, version: int) -> str:
    """The folder name for `version` ('00000123' and '123' are both version 123)."""
    return paths.version_folders(base_path).get(version, str(version))
