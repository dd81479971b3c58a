"""`aekit loadtest`: bounded load against a model server; throughput, latency percentiles, errors.

    aekit loadtest --server localhost:8500 --model autoencoder --concurrency 64 --requests 10000
    aekit loadtest --server localhost:8501 --rest --model autoencoder --duration 30

Stops at --requests or --duration, whichever comes first. gRPC load runs on grpc.aio (one
thread, many requests in flight), REST load on one keep-alive connection per worker thread.
The request (random inputs of the signature's shape) is built once from the model's metadata.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import gc
import http.client
import os
import threading
import time

import numpy as np

from clients.base import LOAD_BALANCING_POLICIES
from clients.errors import HTTP_TO_CODE, ClientError

# TensorFlow-backed modules are imported where used, so `aekit --help` stays instant.


def _flag(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class LoadConfig:
    server: str = dataclasses.field(metadata={"help": "HOST:PORT (the REST port with --rest); gRPC also "
                                                      "dns:///HOST:PORT, ipv4:IP:PORT,IP:PORT"})
    model: str = _flag("autoencoder", "model name on the server")
    rest: bool = _flag(False, "call REST :predict instead of gRPC Predict")
    concurrency: int = _flag(16, "requests in flight")
    requests: int = _flag(1000, "stop after this many requests ...")
    duration: float = _flag(60.0, "... or after this many seconds")
    batch_size: int = _flag(1, "rows per request")
    signature: str = _flag("denoise", "signature to call")
    timeout: float = _flag(10.0, "per-request deadline, seconds")
    load_balancing: str = _flag("pick_first", "gRPC: pick_first | round_robin (spread over every address "
                                "--server resolves to)")
    # A load generator on the server's cores slows the server it measures; on one machine, give
    # each its own cores (the server with taskset, this with --cpus).
    cpus: str = _flag("", "run the load generator only on these CPUs, as taskset -c takes them: 0 | 0,2 | 1-3")

    def validate(self) -> None:
        for name in ("concurrency", "requests", "batch_size"):
            if getattr(self, name) < 1:
                raise ClientError(f"--{name.replace('_', '-')} must be at least 1", "INVALID_ARGUMENT")
        if self.duration <= 0:
            raise ClientError("--duration must be positive", "INVALID_ARGUMENT")
        parse_cpus(self.cpus)
        if self.load_balancing not in LOAD_BALANCING_POLICIES:
            raise ClientError(f"--load-balancing {self.load_balancing!r}: expected one of "
                              f"{', '.join(LOAD_BALANCING_POLICIES)}", "INVALID_ARGUMENT")
        if self.rest and self.load_balancing != "pick_first":
            raise ClientError("--load-balancing is for gRPC: REST load goes over one HTTP connection per worker",
                              "INVALID_ARGUMENT")


def parse_cpus(text: str) -> set[int]:
    """'0', '0,2' or '1-3' as a set of CPU numbers; '' is every CPU this process may use."""
    allowed = os.sched_getaffinity(0)
    if not text:
        return allowed
    cpus = set()
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ClientError(f"--cpus {text!r}: expected CPU numbers such as 0 | 0,2 | 1-3",
                          "INVALID_ARGUMENT") from None
    if not cpus or not cpus <= allowed:
        raise ClientError(f"--cpus {text!r}: this process may only use CPUs {sorted(allowed)}",
                          "INVALID_ARGUMENT")
    return cpus


def add_loadtest_flags(p: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(LoadConfig):
        flag, help_text = "--" + field.name.replace("_", "-"), field.metadata["help"]
        if field.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=help_text)
        elif field.default is dataclasses.MISSING:
            p.add_argument(flag, required=True, help=help_text)
        else:
            p.add_argument(flag, type=type(field.default), default=field.default,
                           help=f"{help_text} (default: {field.default})" if field.default != "" else help_text)


class _Recorder:
    def __init__(self, limit: int):
        self.latencies, self.errors = [], collections.Counter()
        self.limit, self.issued = limit, 0
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.issued >= self.limit:
                return False
            self.issued += 1
            return True

    def record(self, seconds: float, error: str | None) -> None:
        with self.lock:
            if error:
                self.errors[error] += 1
            else:
                self.latencies.append(seconds)


def run(cfg: LoadConfig, own_process: bool = False) -> dict:
    """Runs the load; `own_process` (the CLI) lets it tune the process for measuring."""
    cfg.validate()  # before the (slow) TensorFlow-backed imports
    from clients.grpc_client import AutoencoderClient
    from clients.rest_client import RestAutoencoderClient

    if own_process:
        # TensorFlow's ~400k long-lived objects (imported with the serving API's protos) would be
        # walked by every full collection that parsing a large REST response triggers (~70 ms
        # each): the load generator would time Python's collector, not the server.
        gc.freeze()

    if cfg.cpus:
        # The calling thread and every thread it starts from here on (gRPC's included).
        os.sched_setaffinity(0, parse_cpus(cfg.cpus))
    client_class = RestAutoencoderClient if cfg.rest else AutoencoderClient
    lb = {} if cfg.rest else {"load_balancing": cfg.load_balancing}
    shape = client_class(cfg.server, cfg.model, timeout=cfg.timeout, **lb).input_shape(cfg.signature)
    batch = np.random.default_rng(0).random((cfg.batch_size, *shape[1:])).astype(np.float32)
    recorder = _Recorder(cfg.requests)
    started = time.perf_counter()
    deadline = started + cfg.duration
    if cfg.rest:
        _run_rest(cfg, batch, recorder, deadline)
    else:
        asyncio.run(_run_grpc(cfg, batch, recorder, deadline))
    return _report(cfg, recorder, time.perf_counter() - started)


async def _run_grpc(cfg: LoadConfig, batch: np.ndarray, recorder: _Recorder, deadline: float) -> None:
    import grpc
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc

    from clients.grpc_client import AutoencoderClient, channel_options
    from serving.tensors import ndarray_to_proto

    options = channel_options(cfg.load_balancing)
    async with grpc.aio.insecure_channel(cfg.server, options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        signatures = AutoencoderClient(cfg.server, cfg.model, load_balancing=cfg.load_balancing).signatures()
        request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=cfg.model, signature_name=cfg.signature))
        request.inputs[signatures[cfg.signature].input_alias].CopyFrom(ndarray_to_proto(batch, tensor_content=True))

        async def worker():
            while time.perf_counter() < deadline and recorder.take():
                t0 = time.perf_counter()
                try:
                    await stub.Predict(request, timeout=cfg.timeout)
                    recorder.record(time.perf_counter() - t0, None)
                except grpc.aio.AioRpcError as e:
                    recorder.record(0.0, e.code().name)

        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))


def _run_rest(cfg: LoadConfig, batch: np.ndarray, recorder: _Recorder, deadline: float) -> None:
    host, _, port = cfg.server.removeprefix("http://").rpartition(":")
    from serving.tensors import dumps

    body = dumps({"signature_name": cfg.signature, "instances": batch})
    path = f"/v1/models/{cfg.model}:predict"

    def worker():
        connection = http.client.HTTPConnection(host, int(port), timeout=cfg.timeout)
        while time.perf_counter() < deadline and recorder.take():
            t0 = time.perf_counter()
            try:
                connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                error = None if response.status == 200 else HTTP_TO_CODE.get(response.status, "UNKNOWN")
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection(host, int(port), timeout=cfg.timeout)
                error = "UNAVAILABLE"
            recorder.record(time.perf_counter() - t0, error)
        connection.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(cfg.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _report(cfg: LoadConfig, recorder: _Recorder, elapsed: float) -> dict:
    latencies = np.asarray(recorder.latencies) * 1000.0
    ok, errors = len(latencies), sum(recorder.errors.values())

    def pct(q):
        return float(np.percentile(latencies, q)) if ok else float("nan")

    return {"protocol": "rest" if cfg.rest else "grpc", "signature": cfg.signature, "batch_size": cfg.batch_size,
            "concurrency": cfg.concurrency, "client_cpus": sorted(os.sched_getaffinity(0)),
            "requests": ok + errors, "ok": ok, "errors": errors,
            "errors_by_code": dict(recorder.errors), "duration_s": elapsed,
            "throughput_rps": (ok + errors) / elapsed if elapsed else 0.0,
            "rows_per_s": ok * cfg.batch_size / elapsed if elapsed else 0.0,
            "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99),
                           "mean": float(latencies.mean()) if ok else float("nan"),
                           "max": float(latencies.max()) if ok else float("nan")}}


def format_table(report: dict) -> str:
    lat = report["latency_ms"]
    lines = [f"{report['protocol']} {report['signature']}  batch {report['batch_size']}  "
             f"concurrency {report['concurrency']}",
             f"  requests {report['requests']}  ok {report['ok']}  errors {report['errors']} "
             f"{report['errors_by_code'] or ''}",
             f"  throughput {report['throughput_rps']:.1f} req/s  ({report['rows_per_s']:.1f} rows/s) "
             f"over {report['duration_s']:.2f}s",
             f"  latency ms  p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}  "
             f"mean {lat['mean']:.3f}  max {lat['max']:.3f}"]
    return "\n".join(lines)
