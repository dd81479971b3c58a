"""Prometheus metrics, served at the path --monitoring_config_file names (prometheus-client).

Names follow TF Serving's `:tensorflow:serving:` prefix so existing dashboards find them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        labels = ["model_name", "version", "signature_name", "api", "status"]
        self.requests = Counter(":tensorflow:serving:request_count", "Requests by model, version, "
                                "signature, API and status code", labels, registry=self.registry)
        self.latency = Histogram(":tensorflow:serving:request_latency_seconds", "Request latency in the "
                                 "server", labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(":tensorflow:serving:batching_session:batch_size", "Rows per batched "
                                    "model call (before padding)", buckets=BATCH_BUCKETS, registry=self.registry)
        self.padded_batch_size = Histogram(":tensorflow:serving:batching_session:padded_batch_size",
                                           "Rows per batched model call after padding",
                                           buckets=BATCH_BUCKETS, registry=self.registry)
        self.load_events = Counter(":tensorflow:serving:model_load_events", "Version loads, unloads and "
                                   "load failures", ["model_name", "version", "event"], registry=self.registry)
        self.available = Gauge(":tensorflow:serving:available_versions", "Versions AVAILABLE per model",
                               ["model_name"], registry=self.registry)

    def observe_request(self, model: str, version: str, signature: str, api: str, status: str,
                        seconds: float) -> None:
        self.requests.labels(model, version, signature, api, status).inc()
        self.latency.labels(model, version, signature, api, status).observe(seconds)

    def observe_batch(self, rows: int, padded: int) -> None:
        self.batch_size.observe(rows)
        self.padded_batch_size.observe(padded)

    def observe_load_event(self, event: str, model: str, version: int) -> None:
        self.load_events.labels(model, str(version), event).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
