"""The REST transport against the one it replaced, side by side, on the autoencoder's `denoise`:

    python -m benchmarks.bench_rest            # or: make bench
    # single-image REST p50 (1 client) and saturation (64 clients sending 64-image bodies): p50, p99,
    # errors; aiohttp (`aekit serve`) vs the standard library's http.server over the same RestApi

Latency percentiles cover the requests that succeeded; a request still unanswered after the load
generator's 10 s deadline is an error, so compare the errors first: http.server let whole groups
of saturating requests wait past it while others were served.

Both servers stay up and the sides take turns, three rounds, medians and their ratios reported:
on 2 shared cores one side measured minutes after the other catches a different machine.
The baseline is the old transport as it was (a thread per connection, ThreadingHTTPServer), kept
here only to be measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from benchmarks.bench_serving import INTRA_OP_THREADS, MODEL, export_model
from tests.server_process import running_server
from training.multiworker import free_ports

SINGLE_REQUESTS = 1000
SATURATION_CLIENTS, SATURATION_BATCH, SATURATION_REQUESTS = 64, 64, 640


def serve_baseline(port: int, flags: list[str]) -> None:
    """The embedded server with REST on http.server, as before the move to aiohttp."""
    from serving.main import EmbeddedServer, parse_flags
    from serving.rest_server import RestApi

    server = EmbeddedServer(parse_flags(flags))
    api = RestApi(server.core, None, 30.0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self):
            self._serve("GET", b"")

        def do_POST(self):
            self._serve("POST", self.rfile.read(int(self.headers.get("Content-Length") or 0)))

        def _serve(self, method, body):
            status, content_type, payload = api.handle(method, self.path.split("?", 1)[0], body)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer.request_queue_size = 1024
    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.daemon_threads = True
    server.start()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    threading.Event().wait()


def wait_ready(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/{MODEL}", timeout=2) as r:
                if "AVAILABLE" in r.read().decode():
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"baseline REST server on :{port} not ready after {timeout}s")


def load(port: int, concurrency: int, requests: int, batch: int) -> dict:
    result = subprocess.run([sys.executable, "-m", "aekit_cli", "loadtest", "--server", f"127.0.0.1:{port}", "--rest",
                             "--model", MODEL, "--concurrency", str(concurrency), "--requests", str(requests),
                             "--batch-size", str(batch), "--duration", "600"],
                            capture_output=True, text=True)
    try:  # the report is printed also when some requests failed (then the exit status is 1)
        return json.loads(result.stdout.splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"loadtest against :{port} failed: {result.stderr[-2000:]}") from None


def measure(port: int) -> dict:
    single = load(port, 1, SINGLE_REQUESTS, 1)
    saturated = load(port, SATURATION_CLIENTS, SATURATION_REQUESTS, SATURATION_BATCH)
    return {"single_p50_ms": single["latency_ms"]["p50"], "single_p99_ms": single["latency_ms"]["p99"],
            "saturation_p50_ms": saturated["latency_ms"]["p50"], "saturation_p99_ms": saturated["latency_ms"]["p99"],
            "saturation_rps": saturated["throughput_rps"], "saturation_errors": saturated["errors"]}


def run(output_dir: str = "bench-output", rounds: int = 3) -> dict:
    out = Path(output_dir)
    root = out / "rest"
    version = export_model(root / "models")
    flags = [f"--model_name={MODEL}", f"--model_base_path={version.parent}",
             f"--tensorflow_intra_op_parallelism={INTRA_OP_THREADS}"]
    (baseline_port,) = free_ports(1)
    baseline = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_rest", "--baseline-server", str(baseline_port),
                                 "--", "--port=0", *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sides = {"aiohttp": [], "http.server": []}
    try:
        with running_server(flags, root / "server.log", [MODEL]) as server:
            wait_ready(baseline_port)
            ports = {"aiohttp": server.rest_port, "http.server": baseline_port}
            for port in ports.values():
                load(port, 4, 200, 1)  # warm-up: connections, kernels
            for i in range(rounds):
                for name, port in ports.items():
                    row = measure(port)
                    sides[name].append(row)
                    print(f"  round {i + 1} {name:11s}: single p50 {row['single_p50_ms']:6.2f} ms | 64 clients x 64 images:"
                          f" p50 {row['saturation_p50_ms']:7.0f} ms p99 {row['saturation_p99_ms']:7.0f} ms "
                          f"{row['saturation_rps']:5.1f} req/s errors {row['saturation_errors']}", flush=True)
    finally:
        baseline.kill()
        baseline.wait()
    medians = {name: {k: float(np.median([r[k] for r in rows])) for k in rows[0]} for name, rows in sides.items()}
    new, old = medians["aiohttp"], medians["http.server"]
    ratios = {k: new[k] / old[k] if old[k] else None for k in new}
    print(f"aiohttp / http.server (median of {rounds} alternating rounds): single-image p50 "
          f"{ratios['single_p50_ms']:.2f}x, saturation p50 {ratios['saturation_p50_ms']:.2f}x, p99 "
          f"{ratios['saturation_p99_ms']:.2f}x, throughput {ratios['saturation_rps']:.2f}x; errors "
          f"{new['saturation_errors']:.0f} vs {old['saturation_errors']:.0f} of {SATURATION_REQUESTS} past the 10 s "
          "client deadline (percentiles leave those out)")
    report = {"rounds": sides, "medians": medians, "ratios_aiohttp_over_http_server": ratios,
              "saturation": {"clients": SATURATION_CLIENTS, "batch": SATURATION_BATCH, "requests": SATURATION_REQUESTS}}
    (out / "rest.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="bench-output")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-server", type=int, metavar="PORT",
                        help="only run the http.server baseline on PORT (flags after --)")
    args, rest = parser.parse_known_args()
    if args.baseline_server:
        serve_baseline(args.baseline_server, [a for a in rest if a != "--"])
    else:
        run(args.output_dir, args.rounds)
