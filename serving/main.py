"""`aekit serve`: TF Serving's command line, served by a real tensorflow_model_server or the embedded one.

    aekit serve --port=8500 --rest_api_port=8501 --model_name=autoencoder \\
        --model_base_path=/models/autoencoder --enable_grpc_healthcheck_service
    aekit serve --model_config_file=models.config --enable_batching --batching_parameters_file=batching.config

Flags have tensorflow_model_server's names, forms and defaults, so manifests and docs use one
command line for both. `--engine auto` (the default) execs a tensorflow_model_server found on
PATH with the same flags, else runs the embedded server. SIGTERM drains requests and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import grpc

from serving import config_files
from serving.batching import BatchingOptions, BatchScheduler
from serving.core import DataPlane
from serving.grpc_server import GrpcServer
from serving.manager import ModelManager
from serving.metrics import ServerMetrics
from serving.rest_server import RestApi, RestServer
from storage import paths

log = logging.getLogger("aekit.serve")
TF_SERVING_BINARY = "tensorflow_model_server"
SHUTDOWN_GRACE_SECONDS = 10.0


def _bool(value: str) -> bool:
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


@dataclasses.dataclass
class ServerConfig:
    port: int = 8500  # gRPC; 0 picks a free port
    grpc_socket_path: str = ""  # also serve gRPC on this unix socket
    rest_api_port: int = 0  # 0 = REST off (as TF Serving); -1 picks a free port
    rest_api_timeout_in_ms: int = 30000  # per REST request
    rest_api_num_threads: int = 0  # accepted for compatibility; the REST server uses a thread per connection
    grpc_max_threads: int = 0  # threads for model calls and non-Predict methods; 0 = 4 x CPU cores
    grpc_channel_arguments: str = ""  # k=v,k2=v2 server channel options
    model_name: str = "default"
    model_base_path: str = ""
    model_config_file: str = ""  # text-format ModelServerConfig; wins over model_name/base_path
    model_config_file_poll_wait_seconds: int = 0  # 0 = read once
    file_system_poll_wait_seconds: int = 1  # rescan version folders
    enable_batching: bool = False
    batching_parameters_file: str = ""
    monitoring_config_file: str = ""
    ssl_config_file: str = ""
    enable_model_warmup: bool = True
    enable_grpc_healthcheck_service: bool = False
    max_num_load_retries: int = 5  # accepted for compatibility; a failed version stays failed
    tensorflow_intra_op_parallelism: int = 0  # threads one op may use (0 = TF's default: all cores)
    tensorflow_inter_op_parallelism: int = 0  # ops run at once in one call (0 = TF's default)
    # aekit additions (tensorflow_model_server ignores nothing it does not know: these are
    # stripped before exec'ing it)
    engine: str = "auto"  # auto | embedded | tfserving
    host: str = "0.0.0.0"  # bind address for both ports
    max_request_bytes: int = 2**31 - 1  # larger requests: RESOURCE_EXHAUSTED / HTTP 429

AEKIT_ONLY_FLAGS = ("engine", "host", "max_request_bytes")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aekit serve", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    for field in dataclasses.fields(ServerConfig):
        flag = f"--{field.name}"
        if field.type in ("bool", bool):
            parser.add_argument(flag, type=_bool, nargs="?", const=True, default=field.default)
        else:
            kind = int if field.type in ("int", int) else str
            parser.add_argument(flag, type=kind, default=field.default)
    return parser


def parse_flags(argv: list[str]) -> ServerConfig:
    args = build_arg_parser().parse_args(argv)
    cfg = ServerConfig(**vars(args))
    if cfg.engine not in ("auto", "embedded", "tfserving"):
        raise config_files.ConfigFileError(f"--engine must be auto, embedded or tfserving; got {cfg.engine!r}")
    if not cfg.model_config_file and not cfg.model_base_path:
        raise config_files.ConfigFileError("Both server_options.model_base_path and "
                                           "server_options.model_config_file are empty! "
                                           "(give --model_base_path or --model_config_file)")
    return cfg


def tf_serving_argv(argv: list[str]) -> list[str]:
    """The flags to hand a real tensorflow_model_server: ours minus the aekit additions."""
    drop = tuple(f"--{name}" for name in AEKIT_ONLY_FLAGS)
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith(drop):
            skip = "=" not in arg
            continue
        kept.append(arg)
    return kept


def channel_options(cfg: ServerConfig) -> list[tuple]:
    options = [("grpc.max_receive_message_length", cfg.max_request_bytes),
               ("grpc.max_send_message_length", 2**31 - 1)]
    for item in filter(None, cfg.grpc_channel_arguments.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise config_files.ConfigFileError(f"--grpc_channel_arguments item {item!r} is not key=value")
        options.append((key.strip(), int(value) if value.strip().lstrip("-").isdigit() else value.strip()))
    return options


def model_server_config(cfg: ServerConfig):
    if cfg.model_config_file:
        return config_files.parse_text(cfg.model_config_file, config_files.ModelServerConfig)
    base = cfg.model_base_path
    try:
        paths.check(base, "--model_base_path")
    except paths.PathError as e:
        raise config_files.ConfigFileError(str(e)) from None
    # Local paths are made absolute as TF Serving logs them; a URL (gs://, ram://) is kept as given.
    return config_files.single_model_config(cfg.model_name, os.path.abspath(base) if paths.is_local(base) else base)


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    if not cfg.ssl_config_file:
        return None
    ssl = config_files.parse_text(cfg.ssl_config_file, config_files.SSLConfig)
    if not ssl.server_key or not ssl.server_cert:
        raise config_files.ConfigFileError(f"{cfg.ssl_config_file}: server_key and server_cert are required")
    return grpc.ssl_server_credentials([(ssl.server_key.encode(), ssl.server_cert.encode())],
                                       root_certificates=ssl.custom_ca.encode() or None,
                                       require_client_auth=ssl.client_verify)


def configure_tf_threads(intra_op: int, inter_op: int) -> None:
    """TF Serving's --tensorflow_*_op_parallelism. Small models answer single requests faster
    with intra_op 1: requests then run side by side instead of splitting tiny ops over cores."""
    import tensorflow as tf

    if intra_op > 0:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if inter_op > 0:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)


class EmbeddedServer:
    """The embedded model server: manager + core + gRPC and REST adapters. Start, then stop."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        configure_tf_threads(cfg.tensorflow_intra_op_parallelism, cfg.tensorflow_inter_op_parallelism)
        self.metrics = ServerMetrics()
        batcher = None
        if cfg.enable_batching:
            params = (config_files.parse_text(cfg.batching_parameters_file, config_files.BatchingParameters)
                      if cfg.batching_parameters_file else config_files.BatchingParameters())
            try:
                options = BatchingOptions.from_proto(params)
            except ValueError as e:
                raise config_files.ConfigFileError(f"{cfg.batching_parameters_file}: {e}") from None
            batcher = BatchScheduler(options, self.metrics.observe_batch)
        self.manager = ModelManager(on_event=self._on_event)
        self.core = DataPlane(self.manager, self.metrics, batcher)
        if cfg.enable_model_warmup:
            self.manager.warmup = self.core.warmup  # the core replays the records; it needs the manager first
        self.manager.configure(model_server_config(cfg))
        self.monitoring_path = config_files.prometheus_path(
            config_files.parse_text(cfg.monitoring_config_file, config_files.MonitoringConfig)
            if cfg.monitoring_config_file else None)
        self.grpc = self._build_grpc()
        self.health = self.grpc.health
        self.rest = None
        if cfg.rest_api_port:
            api = RestApi(self.core, self.monitoring_path, cfg.rest_api_timeout_in_ms / 1000)
            self.rest = RestServer(api, cfg.host, max(cfg.rest_api_port, 0), cfg.max_request_bytes)
        self._stopped = threading.Event()

    def _build_grpc(self) -> GrpcServer:
        cfg = self.cfg
        addresses = [f"{cfg.host}:{cfg.port}"] + ([f"unix:{cfg.grpc_socket_path}"] if cfg.grpc_socket_path else [])
        threads = cfg.grpc_max_threads or 4 * (os.cpu_count() or 1)
        server = GrpcServer(self.core, addresses, channel_options(cfg), threads,
                            cfg.enable_grpc_healthcheck_service, server_credentials(cfg))
        self.grpc_port = server.ports[0]
        return server

    def _on_event(self, event: str, name: str, version: int) -> None:
        if event in ("load", "unload", "load_failure"):
            self.metrics.observe_load_event(event, name, version)
        if self.health is not None:
            self.health.update()

    def start(self) -> None:
        # What exists now (TensorFlow's modules, protos, the server) lives until exit. Moved out
        # of the collector's sight, it is no longer walked by every full collection, which the
        # ~50k lists of a 64-image JSON request trigger: parsing one went from ~70 ms to ~6 ms.
        # Models load after this, so an unloaded version is still collected.
        gc.freeze()
        self.grpc.start()
        log.info("Running gRPC ModelServer at %s:%d ...", self.cfg.host, self.grpc_port)
        if self.rest:
            self.rest.start()
            log.info("Exporting HTTP/REST API at:%s:%d ...", self.cfg.host, self.rest.port)
        self.manager.start_polling(self.cfg.file_system_poll_wait_seconds)
        if self.cfg.model_config_file and self.cfg.model_config_file_poll_wait_seconds > 0:
            threading.Thread(target=self._watch_config_file, daemon=True, name="config-poller").start()

    def _watch_config_file(self) -> None:
        last = Path(self.cfg.model_config_file).read_text()
        while not self._stopped.wait(self.cfg.model_config_file_poll_wait_seconds):
            try:
                text = Path(self.cfg.model_config_file).read_text()
                if text != last:
                    self.manager.reload(config_files.parse_model_config_text(text))
                    last = text
                    log.info("Reloaded model config from %s", self.cfg.model_config_file)
            except Exception as e:  # noqa: BLE001 - keep serving the old set; say why
                log.error("Not reloading %s: %s", self.cfg.model_config_file, e)

    def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stops taking requests, lets the ones in flight finish, then exits."""
        self._stopped.set()
        if self.health:
            self.health.shutdown()
        self.manager.stop()
        if self.rest:
            self.rest.stop(grace)
        self.grpc.stop(grace)
        if self.core.batcher:
            self.core.batcher.stop()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s] %(message)s",
                        stream=sys.stderr)
    try:
        cfg = parse_flags(argv)
        if cfg.engine in ("auto", "tfserving"):
            binary = shutil.which(TF_SERVING_BINARY)
            if binary:
                os.execv(binary, [binary, *tf_serving_argv(argv)])
            if cfg.engine == "tfserving":
                raise config_files.ConfigFileError(f"--engine tfserving: {TF_SERVING_BINARY} is not on PATH")
        server = EmbeddedServer(cfg)
    except config_files.ConfigFileError as e:
        print(f"aekit serve: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    stop.wait()
    log.info("Shutting down: draining requests in flight")
    started = time.monotonic()
    server.stop()
    log.info("Stopped after %.2fs", time.monotonic() - started)
    return 0
