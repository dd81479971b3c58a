"""Model management: which versions of which models are loaded, as TF Serving decides it.

Versions are numeric folders under each model's base_path. A poll (at start, every
--file_system_poll_wait_seconds, and on a config reload) compares them with the model's
version policy, loads what is aspired and missing, and unloads what is no longer aspired.
A version that fails to load never replaces the one being served; its status keeps the error.
Requests hold a reference to the Servable they resolved, so an unload never breaks them.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

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


class ModelManager:
    """Holds the model set; `resolve` finds the servable for a request."""

    def __init__(self, loader: Callable[[str, int, str], Servable] = Servable,
                 warmup: Callable[[Servable], int] | None = None,
                 on_event: Callable[[str, str, int], None] | None = None):
        self._loader, self.warmup = loader, warmup
        self.on_event = on_event or (lambda event, name, version: None)
        self._models: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()  # guards _models
        self._poll_lock = threading.Lock()  # one poll at a time: loads are slow
        self._stop = threading.Event()
        self.initial_load_done = threading.Event()

    # ---- config and polling -------------------------------------------------------------
    def reload(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Replaces the whole model set, then loads it; labels must point at available versions."""
        with self._poll_lock:
            self._configure_locked(config)
            self._poll_locked()
        self._check_labels()

    def configure(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Sets the model set without loading (the poller loads it)."""
        with self._poll_lock:
            self._configure_locked(config)

    def _configure_locked(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        check_model_config(config)
        wanted = {m.name: m for m in config.model_config_list.config}
        with self._lock:
            dropped = [e for name, e in self._models.items() if name not in wanted]
            for name, model_config in wanted.items():
                entry = self._models.setdefault(name, ModelEntry(model_config))
                if entry.config.base_path != model_config.base_path:
                    entry.versions = {v: s for v, s in entry.versions.items() if s.state == State.AVAILABLE}
                entry.config = model_config
            self._models = {n: e for n, e in self._models.items() if n in wanted}
        for entry in dropped:
            for state in list(entry.versions.values()):
                if state.state == State.AVAILABLE:
                    self._unload(entry, state)

    def _check_labels(self) -> None:
        with self._lock:
            for entry in self._models.values():
                for version in entry.config.version_labels.values():
                    state = entry.versions.get(version)
                    if state is None or state.state != State.AVAILABLE:
                        raise failed_precondition(
                            f"Request to assign label to version {version} of model {entry.config.name}, "
                            "which is not currently available for inference")

    def poll(self) -> None:
        with self._poll_lock:
            self._poll_locked()

    def _poll_locked(self) -> None:
        with self._lock:
            entries = list(self._models.values())
        for entry in entries:
            self._poll_model(entry)

    def _poll_model(self, entry: ModelEntry) -> None:
        config = entry.config
        on_disk = versions_on_disk(config.base_path)
        if not on_disk and not entry.reported_empty:  # said once, not at every poll
            log.warning("No versions of servable %s found under base path %s", config.name, config.base_path)
        entry.reported_empty = not on_disk
        aspired = aspired_versions(config.model_version_policy, on_disk)
        for version in sorted(aspired):
            known = entry.versions.get(version)
            if known is None or (known.state == State.END and known.error is None):
                self._load(entry, version)
        serving_aspired = any(entry.versions[v].state == State.AVAILABLE for v in aspired if v in entry.versions)
        for version, state in list(entry.versions.items()):
            if version in aspired or state.state != State.AVAILABLE:
                continue
            # Availability first: keep an old version until an aspired one serves, unless it is gone.
            if serving_aspired or version not in on_disk:
                self._unload(entry, state)

    def _load(self, entry: ModelEntry, version: int) -> None:
        name = entry.config.name
        state = VersionState(version, State.LOADING)
        with self._lock:
            entry.versions[version] = state
        path = paths.join(entry.config.base_path, _version_folder(entry.config.base_path, version))
        started = time.monotonic()
        try:
            servable = self._loader(name, version, path)
            if self.warmup:
                self.warmup(servable)
        except Exception as e:  # noqa: BLE001 - any failure becomes the version's status
            message = e.message if isinstance(e, ServingError) else str(e)
            log.error("Loading servable {name: %s version: %d} failed: %s", name, version, message)
            with self._lock:
                state.state, state.error = State.END, invalid_argument(message)
            self.on_event("load_failure", name, version)
            return
        with self._lock:
            state.servable, state.state = servable, State.AVAILABLE
        log.info("Successfully loaded servable version {name: %s version: %d} in %.2fs", name, version,
                 time.monotonic() - started)
        self.on_event("load", name, version)

    def _unload(self, entry: ModelEntry, state: VersionState) -> None:
        with self._lock:
            state.state = State.UNLOADING
            state.servable = None  # requests in flight keep their own reference
            state.state = State.END
        log.info("Unloaded servable version {name: %s version: %d}", entry.config.name, state.version)
        self.on_event("unload", entry.config.name, state.version)

    def start_polling(self, interval_seconds: float) -> None:
        """Loads now (in the background) and then rescans every `interval_seconds` (0: never)."""
        def loop():
            try:
                self.poll()
            finally:
                self.initial_load_done.set()
            self.on_event("poll", "", 0)
            while interval_seconds > 0 and not self._stop.wait(interval_seconds):
                try:
                    self.poll()
                except Exception:  # noqa: BLE001 - a bad scan must not kill the poller
                    log.exception("file system poll failed")
        threading.Thread(target=loop, name="version-poller", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

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


def _version_folder(base_path: str, version: int) -> str:
    """The folder name for `version` ('00000123' and '123' are both version 123)."""
    return paths.version_folders(base_path).get(version, str(version))
