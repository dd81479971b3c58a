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
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from serving import config_files
from serving.batching import BatchingOptions, BatchScheduler
from serving.core import DataPlane
from serving.errors import ServingError, StartupError
from serving.grpc_server import GrpcServer
from serving.manager import ModelManager, check_model_config
from serving.metrics import ServerMetrics
from serving.rest_server import RestApi, RestServer
from serving.servable import Servable
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
    # Every flag of tensorflow_model_server (tensorflow_serving/model_servers/main.cc, main()'s
    # flag_list), with its name and default, so a TF Serving command line parses here unchanged.
    port: int = 8500  # gRPC; 0 picks a free port
    grpc_socket_path: str = ""  # also serve gRPC on this unix socket
    rest_api_port: int = 0  # 0 = REST off (as TF Serving); -1 picks a free port
    rest_api_timeout_in_ms: int = 30000  # per REST request
    rest_api_num_threads: int = 0  # threads for REST model calls; 0 = 4 x CPU cores (TF Serving server.h)
    rest_api_enable_cors_support: bool = False  # ignored (warning): no CORS headers are sent
    grpc_max_threads: int = 0  # threads for model calls and non-Predict methods; 0 = 4 x CPU cores
    grpc_channel_arguments: str = ""  # k=v,k2=v2 server channel options
    model_name: str = "default"
    model_base_path: str = ""
    model_config_file: str = ""  # text-format ModelServerConfig; wins over model_name/base_path
    model_config_file_poll_wait_seconds: int = 0  # 0 = read once
    file_system_poll_wait_seconds: int = 1  # rescan version folders
    allow_version_labels_for_unavailable_models: bool = False  # ignored (warning): labels need an AVAILABLE version
    enable_batching: bool = False
    batching_parameters_file: str = ""
    enable_per_model_batching_parameters: bool = False  # ignored (warning): one batching config for all models
    monitoring_config_file: str = ""
    ssl_config_file: str = ""
    use_alts_credentials: bool = False  # refused when true: no ALTS here, and serving without it is insecure
    enable_model_warmup: bool = True
    num_request_iterations_for_warmup: int = 1  # ignored (warning): each warmup record is replayed once
    enable_grpc_healthcheck_service: bool = False
    enable_serialization_as_tensor_content: bool = False  # Predict outputs in tensor_content, not *_val
    max_num_load_retries: int = 5  # retries of a failed load, then it ends failed (TF Serving's)
    load_retry_interval_micros: int = 60_000_000  # between load retries; negative = no wait
    num_load_threads: int = 0  # ignored (warning): versions load one at a time
    num_unload_threads: int = 0  # ignored (warning)
    flush_filesystem_caches: bool = True  # ignored (warning): nothing to flush
    tensorflow_session_parallelism: int = 0  # both thread pools below, where those are 0
    tensorflow_intra_op_parallelism: int = 0  # threads one op may use (0 = TF's default: all cores)
    tensorflow_inter_op_parallelism: int = 0  # ops run at once in one call (0 = TF's default)
    tensorflow_session_config_file: str = ""  # ignored (warning): use the --tensorflow_*_parallelism flags
    platform_config_file: str = ""  # refused: it replaces how models load; use the flags above
    per_process_gpu_memory_fraction: float = 0.0  # ignored (warning): TensorFlow sizes GPU memory itself
    saved_model_tags: str = "serve"  # only "serve" (refused otherwise: another MetaGraph would be served)
    remove_unused_fields_from_bundle_metagraph: bool = True  # ignored (warning): a memory saving only
    prefer_tflite_model: bool = False  # ignored (warning): the SavedModel is served, TF Serving's fallback
    num_tflite_pools: int = 1  # ignored (warning), as prefer_tflite_model
    num_tflite_interpreters_per_pool: int = 1  # ignored (warning), as prefer_tflite_model
    enable_signature_method_name_check: bool = False  # Classify/Regress need signatures of that method_name
    xla_cpu_compilation_enabled: bool = False  # ignored (warning): models run as exported
    xla_gpu_compilation_enabled: bool = False  # ignored (warning), as xla_cpu_compilation_enabled
    enable_profiler: bool = True  # ignored (warning) when false; there is no profiler service to turn off
    thread_pool_factory_config_file: str = ""  # ignored (warning): requests share TensorFlow's thread pools
    mixed_precision: str = ""  # ignored (warning): models run in the precision they were exported in
    skip_initialize_tpu: bool = False  # ignored (warning): no TPU support
    # aekit additions (tensorflow_model_server ignores nothing it does not know: these are
    # stripped before exec'ing it)
    engine: str = "auto"  # auto | embedded | tfserving
    host: str = "0.0.0.0"  # bind address for both ports
    max_request_bytes: int = 2**31 - 1  # larger requests: RESOURCE_EXHAUSTED / HTTP 413

AEKIT_ONLY_FLAGS = ("engine", "host", "max_request_bytes")

# Flags that change nothing here. A pasted TF Serving command line should still start, so a value
# other than the default is one warning line, not an error: each only tunes performance, memory,
# a feature with no equivalent here, or relaxes a check that is relaxed already.
IGNORED_FLAGS = (
    "rest_api_enable_cors_support", "allow_version_labels_for_unavailable_models",
    "enable_per_model_batching_parameters", "num_request_iterations_for_warmup", "num_load_threads",
    "num_unload_threads", "flush_filesystem_caches", "tensorflow_session_config_file",
    "per_process_gpu_memory_fraction", "remove_unused_fields_from_bundle_metagraph", "prefer_tflite_model",
    "num_tflite_pools", "num_tflite_interpreters_per_pool",
    "xla_cpu_compilation_enabled", "xla_gpu_compilation_enabled", "enable_profiler",
    "thread_pool_factory_config_file", "mixed_precision", "skip_initialize_tpu",
)


class _FlagParser(argparse.ArgumentParser):
    """Reports a bad command line in one line (main() prints it), never argparse's usage dump."""

    def error(self, message: str):
        raise config_files.ConfigFileError(f"{message} (flags are tensorflow_model_server's; aekit serve --help)")


def _version() -> str:
    from importlib import metadata

    return f"TensorFlow ModelServer: aekit embedded server\nTensorFlow Library: {metadata.version('tensorflow')}"


def build_arg_parser() -> argparse.ArgumentParser:
    parser = _FlagParser(prog="aekit serve", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter)  # keeps --version on two lines
    kinds = {"int": int, "float": float, "str": str}
    for field in dataclasses.fields(ServerConfig):
        flag = f"--{field.name}"
        if field.type == "bool":
            parser.add_argument(flag, type=_bool, nargs="?", const=True, default=field.default)
        else:
            parser.add_argument(flag, type=kinds[field.type], default=field.default)
    parser.add_argument("--version", action="version", version=_version())  # as TF Serving: print, exit 0
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
    _refuse_unsupported(cfg)
    for name in IGNORED_FLAGS:
        if getattr(cfg, name) != _DEFAULTS[name]:
            log.warning("--%s=%s has no effect on the embedded server; ignoring it", name, getattr(cfg, name))
    # As TF Serving's server.cc: session parallelism sets both pools, each overridden by its own flag.
    if min(cfg.tensorflow_session_parallelism, cfg.tensorflow_intra_op_parallelism,
           cfg.tensorflow_inter_op_parallelism) > 0:
        raise config_files.ConfigFileError(
            "Either configure server_options.tensorflow_session_parallelism or "
            "(server_options.tensorflow_intra_op_parallelism, server_options.tensorflow_inter_op_parallelism) "
            "separately. You cannot configure all.")
    if cfg.tensorflow_session_parallelism > 0:
        cfg.tensorflow_intra_op_parallelism = cfg.tensorflow_intra_op_parallelism or cfg.tensorflow_session_parallelism
        cfg.tensorflow_inter_op_parallelism = cfg.tensorflow_inter_op_parallelism or cfg.tensorflow_session_parallelism
    return cfg


_DEFAULTS = {field.name: field.default for field in dataclasses.fields(ServerConfig)}


def _refuse_unsupported(cfg: ServerConfig) -> None:
    """Flags whose request cannot be met and must not be silently dropped."""
    if cfg.use_alts_credentials:
        raise config_files.ConfigFileError("--use_alts_credentials is not supported by the embedded server; "
                                           "use --ssl_config_file for TLS")
    if cfg.platform_config_file:
        raise config_files.ConfigFileError("--platform_config_file is not supported by the embedded server; use "
                                           "--enable_batching/--batching_parameters_file and "
                                           "--tensorflow_*_parallelism instead")
    if set(filter(None, cfg.saved_model_tags.split(","))) - {"serve"}:
        raise config_files.ConfigFileError(f"--saved_model_tags={cfg.saved_model_tags}: the embedded server loads "
                                           "only the MetaGraph tagged 'serve'")


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
        config = config_files.parse_text(cfg.model_config_file, config_files.ModelServerConfig)
    else:
        base = cfg.model_base_path
        try:
            paths.check(base, "--model_base_path")
        except paths.PathError as e:
            raise config_files.ConfigFileError(str(e)) from None
        # Local paths are made absolute as TF Serving logs them; a URL (gs://, ram://) is kept as given.
        config = config_files.single_model_config(cfg.model_name, os.path.abspath(base) if paths.is_local(base) else base)
    try:
        check_model_config(config)  # duplicate names, a missing base_path: one line, not a traceback
    except ServingError as e:
        raise config_files.ConfigFileError(f"{cfg.model_config_file or '--model_name'}: {e.message}") from None
    return config


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    if not cfg.ssl_config_file:
        return None
    ssl = config_files.parse_text(cfg.ssl_config_file, config_files.SSLConfig)
    if not ssl.server_key or not ssl.server_cert:
        raise config_files.ConfigFileError(f"{cfg.ssl_config_file}: server_key and server_cert are required")
    check_pem(cfg.ssl_config_file, ssl)
    return grpc.ssl_server_credentials([(ssl.server_key.encode(), ssl.server_cert.encode())],
                                       root_certificates=ssl.custom_ca.encode() or None,
                                       require_client_auth=ssl.client_verify)


def check_pem(path: str, ssl_config) -> None:
    """Refuses keys and certificates that are not PEM, or do not match, before gRPC sees them
    (it would only fail to bind, which reads like a port in use). OpenSSL checks, via `ssl`."""
    with tempfile.TemporaryDirectory() as folder:
        key, cert = Path(folder, "key.pem"), Path(folder, "cert.pem")
        key.write_text(ssl_config.server_key)
        cert.write_text(ssl_config.server_cert)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as e:
            raise config_files.ConfigFileError(
                f"{path}: server_key and server_cert must be a matching PEM private key and certificate "
                f"(-----BEGIN ...-----); OpenSSL says: {e.reason or 'not PEM'}") from None
        if ssl_config.custom_ca:
            try:
                context.load_verify_locations(cadata=ssl_config.custom_ca)
            except ssl.SSLError as e:
                raise config_files.ConfigFileError(f"{path}: custom_ca is not a PEM certificate; "
                                                   f"OpenSSL says: {e.reason or 'not PEM'}") from None


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
        self.manager = ModelManager(loader=self.metrics.timed_loader(Servable), on_event=self._on_event,
                                    max_load_retries=max(cfg.max_num_load_retries, 0),
                                    load_retry_interval=cfg.load_retry_interval_micros / 1e6)
        self.core = DataPlane(self.manager, self.metrics, batcher, cfg.enable_serialization_as_tensor_content,
                              cfg.enable_signature_method_name_check)
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
            self.rest = self._build_rest()
        self._stopped = threading.Event()

    def _build_grpc(self) -> GrpcServer:
        cfg = self.cfg
        if not 0 <= cfg.port <= 65535:  # grpc would take 70000 modulo 65536 and listen on 4464
            raise StartupError(f"--port={cfg.port} is not a TCP port: use 1-65535 (0 picks a free one)")
        addresses = [f"{cfg.host}:{cfg.port}"] + ([f"unix:{cfg.grpc_socket_path}"] if cfg.grpc_socket_path else [])
        threads = cfg.grpc_max_threads or 4 * (os.cpu_count() or 1)
        server = GrpcServer(self.core, addresses, channel_options(cfg), threads,
                            cfg.enable_grpc_healthcheck_service, server_credentials(cfg))
        self.grpc_port = server.ports[0]
        return server

    def _build_rest(self) -> RestServer:
        cfg = self.cfg
        if not -1 <= cfg.rest_api_port <= 65535:
            raise config_files.ConfigFileError(f"--rest_api_port={cfg.rest_api_port} is out of range: give 1-65535, "
                                               "0 for no REST server or -1 for a free port")
        api = RestApi(self.core, self.monitoring_path, cfg.rest_api_timeout_in_ms / 1000)
        threads = cfg.rest_api_num_threads or 4 * (os.cpu_count() or 1)
        try:
            return RestServer(api, cfg.host, max(cfg.rest_api_port, 0), cfg.max_request_bytes, threads)
        except OSError as e:
            raise config_files.ConfigFileError(f"--rest_api_port={cfg.rest_api_port}: cannot listen on "
                                               f"{cfg.host}:{cfg.rest_api_port}: {e.strerror}") from None

    def _on_event(self, event: str, name: str, version: int) -> None:
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
                if text == last:
                    continue
                # Tried once per edit: a reload that fails (all or nothing) would otherwise load
                # and discard the new models at every poll.
                last = text
                self.manager.reload(config_files.parse_model_config_text(text))
                log.info("Reloaded model config from %s", self.cfg.model_config_file)
            except Exception as e:  # noqa: BLE001 - keep serving the old set; say why
                log.error("Not reloading %s: %s", self.cfg.model_config_file, e)

    def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Health says NOT_SERVING, both ports refuse new requests at once, the ones in flight
        get `grace` seconds to finish, then batching stops."""
        self._stopped.set()
        if self.health:
            self.health.shutdown()
        self.manager.stop()
        grpc_drained = self.grpc.begin_stop(grace)  # before REST's drain: no new gRPC calls meanwhile
        if self.rest:
            self.rest.stop(grace)
        grpc_drained()
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
    except (config_files.ConfigFileError, StartupError) as e:
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
