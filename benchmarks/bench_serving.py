"""Serving latency and throughput for the autoencoder's `denoise` on 28x28 images, side by side:

    python -m benchmarks.bench_serving            # or: make bench
    # in-process signature calls (the ceiling) | gRPC | REST, batch 1 and 64, concurrency 1/16/64,
    # server batching off and on; server memory after 1,000 vs 100,000 requests; Predict outputs
    # in typed float_val (TF Serving's default, the grid's) vs tensor_content
    python -m benchmarks.bench_serving --serialization-only   # just that last comparison

Targets: single-image gRPC p50 at most 1 ms above the in-process call; with batching on, 64
concurrent single-image gRPC clients get >= 2x the throughput of batching off; server memory
after 100,000 requests within 10 % of after 1,000.

The grid runs the load generator on the same 2 cores as the server, so its absolute numbers are
pessimistic. The latency target is measured as a client on another host would see it: the
server and the in-process ceiling each get the same one core, the load generator the other
(`isolated_single_image`). Sharing the cores adds ~0.3 ms to a gRPC call here, all of it the
two processes' threads waiting for each other's CPU; both figures are reported.

Both targets compare two things measured in alternation (ceiling and gRPC; batching off and on,
with both servers up), median of the rounds: the same server's throughput here moves by 10-20 %
from one minute to the next, and two sides measured minutes apart each catch a different drift.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import numpy as np
import tensorflow as tf

from clients import loadtest
from tests.server_process import pinned_to, running_server
from training import export, models, scoring

MODEL = "autoencoder"
# One batch thread: on 2 shared cores a second model call in parallel only adds contention.
# Timeout 0: batches form while the model is busy, without delaying a lone request.
# No allowed_batch_sizes: padding up to powers of two computed ~40 % throw-away rows here (mean
# batch 20 padded to 28) and cost ~15 % of the throughput; the model's batch dimension is free.
BATCHING = ("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 0 }\nnum_batch_threads { value: 1 }\n"
            "max_enqueued_batches { value: 1000 }\n")
# The same TF threading in-process and in the server, so the in-process row is a fair ceiling:
# for a 28x28 conv, one thread per op is faster than splitting it (0.8 vs 1.2 ms here).
INTRA_OP_THREADS = 1


def export_model(base: Path) -> Path:
    """An (untrained) conv autoencoder: latency does not depend on the weights."""
    encoder, decoder = models.build_autoencoder("conv", (28, 28, 1), 128)
    sample = np.random.default_rng(0).random((8, 28, 28, 1)).astype(np.float32)
    stats = scoring.fit_on_split(encoder, decoder, sample, "mse")
    return export.export_version(encoder, decoder, base, export.Threshold(0.02, 0.01, len(sample)), sample,
                                 stats=stats)


def in_process(version_dir: Path, batch: int, concurrency: int, requests: int) -> dict:
    denoise = tf.saved_model.load(str(version_dir)).signatures["denoise"]
    images = tf.constant(np.random.default_rng(0).random((batch, 28, 28, 1)).astype(np.float32))
    for _ in range(20):
        denoise(images=images)

    def call(_):
        t0 = time.perf_counter()
        denoise(images=images)["reconstruction"].numpy()
        return time.perf_counter() - t0

    started = time.perf_counter()
    with futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = np.array(list(pool.map(call, range(requests)))) * 1000
    elapsed = time.perf_counter() - started
    return {"protocol": "in-process", "batch_size": batch, "concurrency": concurrency, "requests": requests,
            "errors": 0, "throughput_rps": requests / elapsed, "rows_per_s": requests * batch / elapsed,
            "latency_ms": {"p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99))}}


def isolated_single_image(version_dir: Path, flags: list[str], root: Path, requests: int,
                          rounds: int = 3) -> dict | None:
    """Single-image latency with the load generator off the server's core: the in-process ceiling
    and the server on one core, the load generator (`aekit loadtest --cpus`) on another. Ceiling
    and gRPC alternate `rounds` times (the server idles while the ceiling runs); the gap is the
    median of the rounds' gaps."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("  (one CPU: no isolated latency measurement)")
        return None
    server_cpus, client_cpu = {cpus[-1]}, str(cpus[0])

    def ceiling() -> dict:
        result = subprocess.run([sys.executable, "-m", "benchmarks.bench_serving", "--ceiling-of", str(version_dir),
                                 "--requests", str(requests)], preexec_fn=pinned_to(server_cpus),
                                capture_output=True, text=True, check=True)
        return json.loads(result.stdout.splitlines()[-1])

    def load(address: str, rest: bool, n: int) -> dict:
        result = subprocess.run([sys.executable, "-m", "aekit_cli", "loadtest", "--server", address, "--model", MODEL,
                                 "--concurrency", "1", "--requests", str(n), "--cpus", client_cpu]
                                + (["--rest"] if rest else []), capture_output=True, text=True, check=True)
        return json.loads(result.stdout.splitlines()[-1])

    rounds_out = []
    with running_server(flags, root / "server-isolated.log", [MODEL], cpus=server_cpus) as server:
        load(server.grpc_address, False, 500)  # warm-up
        for _ in range(rounds):
            rounds_out.append({"in-process": ceiling(), "grpc": load(server.grpc_address, False, requests)})
        rest = load(f"127.0.0.1:{server.rest_port}", True, requests)
    for i, row in enumerate(rounds_out):
        print(f"  isolated round {i + 1}: in-process p50 {_p50(row['in-process']):5.2f} ms, gRPC p50 "
              f"{_p50(row['grpc']):5.2f} ms (p99 {row['grpc']['latency_ms']['p99']:5.2f})  "
              f"(CPUs: server/ceiling {sorted(server_cpus)}, client {client_cpu})", flush=True)
    print(f"  isolated REST p50 {_p50(rest):5.2f} ms  p99 {rest['latency_ms']['p99']:5.2f} ms", flush=True)
    gap = float(np.median([_p50(r["grpc"]) - _p50(r["in-process"]) for r in rounds_out]))
    return {"rounds": rounds_out, "rest": rest, "grpc_p50_minus_in_process_ms": gap}


def _p50(row: dict) -> float:
    return row["latency_ms"]["p50"]


def server_rows(server, batching: bool, requests: int, duration: float) -> list[dict]:
    # Warm-up, not reported: connections, and the kernels for every batch shape the server will see.
    loadtest.run(loadtest.LoadConfig(server=server.grpc_address, model=MODEL, concurrency=64, requests=2000))
    rows = []
    for protocol, address in (("grpc", server.grpc_address), ("rest", f"127.0.0.1:{server.rest_port}")):
        for batch in (1, 64):
            for concurrency in (1, 16, 64):
                # 64 clients need more requests than one for a steady state: 2,000 single-image
                # requests at 64 in flight last ~1 s, much of it ramp-up and drain.
                count = (requests if batch == 1 else requests // 4) * (4 if concurrency == 64 else 1)
                report = loadtest.run(loadtest.LoadConfig(
                    server=address, model=MODEL, rest=protocol == "rest", concurrency=concurrency,
                    requests=count, duration=duration, batch_size=batch))
                report["batching"] = batching
                rows.append(report)
                print(f"  {protocol:4s} batching {'on ' if batching else 'off'} batch {batch:2d} conc {concurrency:2d}: "
                      f"{report['throughput_rps']:8.1f} req/s  p50 {report['latency_ms']['p50']:7.2f} ms  "
                      f"p99 {report['latency_ms']['p99']:7.2f} ms  errors {report['errors']}", flush=True)
    return rows


def batching_gain(off, on, requests: int, rounds: int = 3) -> dict:
    """64 single-image gRPC clients against the batching-off and -on servers in turn, `rounds`
    times each; the gain is the ratio of the medians, every run is reported."""
    runs = {"off": [], "on": []}
    for _ in range(rounds):
        for name, server in (("off", off), ("on", on)):
            report = loadtest.run(loadtest.LoadConfig(server=server.grpc_address, model=MODEL, concurrency=64,
                                                      requests=requests, duration=3600))
            if report["errors"]:
                raise RuntimeError(f"batching {name}: {report['errors_by_code']} errors")
            runs[name].append(report["throughput_rps"])
    print(f"  alternating runs, 64 single-image gRPC clients: batching off {_rates(runs['off'])} req/s, "
          f"on {_rates(runs['on'])} req/s", flush=True)
    return {"requests_per_run": requests, "off_rps": runs["off"], "on_rps": runs["on"],
            "gain": float(np.median(runs["on"]) / np.median(runs["off"]))}


def serialization_comparison(typed, content, requests: int, rounds: int = 3) -> dict:
    """64-image gRPC Predicts (one client) against a server writing outputs in the typed float_val
    (TF Serving's default) and one started with --enable_serialization_as_tensor_content, in turn;
    medians of `rounds` runs each."""
    runs = {"typed": [], "tensor_content": []}
    for _ in range(rounds):
        for name, server in (("typed", typed), ("tensor_content", content)):
            report = loadtest.run(loadtest.LoadConfig(server=server.grpc_address, model=MODEL, concurrency=1,
                                                      requests=requests, duration=3600, batch_size=64))
            if report["errors"]:
                raise RuntimeError(f"{name}: {report['errors_by_code']} errors")
            runs[name].append(report["latency_ms"]["p50"])
    medians = {name: float(np.median(values)) for name, values in runs.items()}
    print(f"  64-image gRPC p50, alternating runs: typed float_val {_ms(runs['typed'])} ms, tensor_content "
          f"{_ms(runs['tensor_content'])} ms (median ratio {medians['typed'] / medians['tensor_content']:.2f})",
          flush=True)
    return {"requests_per_run": requests, "p50_ms": runs, "typed_over_tensor_content": medians["typed"]
            / medians["tensor_content"]}


def serialization_of(typed, flags: list[str], root: Path, requests: int) -> dict:
    """The grid's rows use TF Serving's default typed fields; this compares them with tensor_content."""
    content_flags = flags + ["--enable_serialization_as_tensor_content"]
    with running_server(content_flags, root / "server-tensor-content.log", [MODEL]) as content:
        return serialization_comparison(typed, content, requests)


def _rates(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def _ms(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_growth(server, total: int) -> dict:
    """RSS after 1,000 requests and after `total`, single-image gRPC at concurrency 16."""
    load = lambda n: loadtest.run(loadtest.LoadConfig(server=server.grpc_address, model=MODEL,  # noqa: E731
                                                      concurrency=16, requests=n, duration=3600))
    load(1000)
    after_1k = rss_mib(server.proc.pid)
    load(total - 1000)
    after_total = rss_mib(server.proc.pid)
    return {"rss_mib_after_1000": after_1k, f"rss_mib_after_{total}": after_total,
            "growth_ratio": after_total / after_1k}


def run(output_dir: str = "bench-output", requests: int = 2000, duration: float = 8.0,
        memory_requests: int = 100_000) -> dict:
    tf.config.threading.set_intra_op_parallelism_threads(INTRA_OP_THREADS)  # before any TF op
    out = Path(output_dir)
    root = out / "serving"
    version = export_model(root / "models")
    gc.freeze()  # as `aekit serve` and `aekit loadtest` do: see serving/main.py
    rows = [in_process(version, b, c, requests if b == 1 else requests // 4) for b in (1, 64) for c in (1, 16, 64)]
    for row in rows:
        print(f"  in-process batch {row['batch_size']:2d} conc {row['concurrency']:2d}: {row['throughput_rps']:8.1f} "
              f"req/s  p50 {row['latency_ms']['p50']:7.2f} ms  p99 {row['latency_ms']['p99']:7.2f} ms", flush=True)
    flags = [f"--model_name={MODEL}", f"--model_base_path={version.parent}",
             f"--tensorflow_intra_op_parallelism={INTRA_OP_THREADS}"]
    isolated = isolated_single_image(version, flags, root, requests)
    (root / "batching.config").write_text(BATCHING)
    batching_flags = ["--enable_batching", f"--batching_parameters_file={root / 'batching.config'}"]
    # Both servers stay up (the idle one uses no CPU) so the gain can alternate between them.
    with running_server(flags, root / "server-off.log", [MODEL]) as off, \
            running_server(flags + batching_flags, root / "server-on.log", [MODEL]) as on:
        rows += server_rows(off, False, requests, duration)
        memory = memory_growth(off, memory_requests)
        rows += server_rows(on, True, requests, duration)
        gain = batching_gain(off, on, 4 * requests)
        serialization = serialization_of(off, flags, root, requests // 4)

    def find(protocol, batch, concurrency, batching=None):
        return next(r for r in rows if r["protocol"] == protocol and r["batch_size"] == batch
                    and r["concurrency"] == concurrency and r.get("batching", batching) == batching)

    shared_gap = _p50(find("grpc", 1, 1, False)) - _p50(find("in-process", 1, 1))
    report = {
        "rows": rows, "memory": memory, "isolated_single_image": isolated,
        "grpc_p50_minus_in_process_ms": isolated["grpc_p50_minus_in_process_ms"] if isolated else shared_gap,
        "grpc_p50_minus_in_process_ms_shared_cores": shared_gap,
        "batching_throughput_gain_64_clients": gain["gain"],
        "batching_gain_runs": gain,
        "serialization": serialization,
        "batching_throughput_gain_64_clients_grid": find("grpc", 1, 64, True)["throughput_rps"]
        / find("grpc", 1, 64, False)["throughput_rps"],
    }
    print(f"single-image gRPC p50 - in-process p50: {report['grpc_p50_minus_in_process_ms']:.2f} ms (goal <= 1; "
          f"load generator on its own core) | {shared_gap:.2f} ms with client and server sharing both cores")
    print(f"batching on / off, 64 concurrent single-image gRPC clients: "
          f"{report['batching_throughput_gain_64_clients']:.2f}x (goal >= 2; median of {len(gain['on_rps'])} "
          f"alternating runs each) | {report['batching_throughput_gain_64_clients_grid']:.2f}x in the grid above")
    print(f"server RSS after 1,000 requests {memory['rss_mib_after_1000']:.1f} MiB, after {memory_requests:,}: "
          f"{memory[f'rss_mib_after_{memory_requests}']:.1f} MiB (ratio {memory['growth_ratio']:.3f}, goal <= 1.10)")
    (out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="bench-output")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--memory-requests", type=int, default=100_000)
    parser.add_argument("--ceiling-of", metavar="VERSION_DIR",
                        help="only print the in-process single-image row for this export, as JSON")
    parser.add_argument("--serialization-only", action="store_true",
                        help="only compare typed *_val and tensor_content Predict responses (64 images)")
    args = parser.parse_args()
    if args.serialization_only:
        root = Path(args.output_dir) / "serving"
        version = export_model(root / "models")
        flags = [f"--model_name={MODEL}", f"--model_base_path={version.parent}",
                 f"--tensorflow_intra_op_parallelism={INTRA_OP_THREADS}"]
        with running_server(flags, root / "server-typed.log", [MODEL]) as typed:
            print(json.dumps(serialization_of(typed, flags, root, args.requests // 4)))
    elif args.ceiling_of:
        tf.config.threading.set_intra_op_parallelism_threads(INTRA_OP_THREADS)
        gc.freeze()
        print(json.dumps(in_process(Path(args.ceiling_of), 1, 1, args.requests)))
    else:
        run(args.output_dir, args.requests, args.duration, args.memory_requests)
