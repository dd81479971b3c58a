"""Prometheus metrics with TF Serving's names, types, units and labels (prometheus-client).

Served at the path --monitoring_config_file names. TF Serving exports TensorFlow's monitoring
cells with every character outside [a-zA-Z0-9_] turned into ':' (util/prometheus_exporter.cc,
GetPrometheusMetricName), so `/tensorflow/serving/request_count` is
`:tensorflow:serving:request_count`; samplers are histograms and, like TF Serving's, latencies
are in MICROSECONDS. Counters keep TF Serving's bare names (no `_total` added) and no series
has a `_created` twin. Each metric below names the TF Serving source that records it:

  :tensorflow:serving:request_count{model_name,status}            counter    servables/tensorflow/util.cc
      RecordModelRequestCount, called for every Predict/Classify/Regress whatever its status (an
      unknown model too) by model_servers/prediction_service_impl.cc; here also every REST
      predict/classify/regress, status and metadata call
  :tensorflow:serving:request_latency{model_name,API,entrypoint}  histogram  util.cc RecordRequestLatency,
      successful requests only (prediction_service_impl.cc); API Predict|Classify|Regress (REST
      also GetModelStatus|GetModelMetadata), entrypoint GRPC|REST; buckets Exponential(10, 1.8, 33)
  :tensorflow:serving:runtime_latency{model_name,API,runtime}     histogram  util.cc RecordRuntimeLatency,
      the model run alone (predict_util.cc RunPredict, classifier.cc, regressor.cc); runtime "TF1"
  :tensorflow:serving:request_example_counts{model}               histogram  util.cc RecordRequestExampleCount,
  :tensorflow:serving:request_example_count_total{model}          counter      tf.Examples per Classify/Regress
  :tensorflow:serving:model_warmup_latency{model_path,status}     histogram  servables/tensorflow/
      saved_model_warmup_util.cc RunSavedModelWarmup, when a warmup file exists; status "OK" or the error
  :tensorflow:serving:batching_session:queuing_latency{thread_pool_name}  histogram  batching/
      batching_session.cc: microseconds each request waited for its batch
  :tensorflow:serving:batching_session:wrapped_run_count          counter    batching_session.cc: batched runs
  :tensorflow:serving:batching_session:input_batch_size           histogram  rows per batch before and
  :tensorflow:serving:batching_session:processed_batch_size       histogram    after padding, and the
  :tensorflow:serving:batching_session:padding_size{execution_batch_size}      padding (names, help and
      labels as batching/batching_session_test.cc checks them)
  :tensorflow:cc:saved_model:load_attempt_count{model_path,status}  counter  TensorFlow's own
  :tensorflow:cc:saved_model:load_latency{model_path}              counter    tensorflow/cc/saved_model/
      loader.cc (status success|fail; latency: microseconds summed over successful loads), which a
      TF Serving metrics page shows as it exports every TensorFlow metric

Left out, and why:
  - the three batching_session batch sizes are Percentile samplers in TF Serving, and its exporter
    writes only histogram values as histograms (util/prometheus_exporter.cc SerializeMetric; the
    rest go to its scalar writer); prometheus-client has no percentile type, so here they are
    histograms under the same names (their _bucket/_sum/_count series are TF Serving's only by name)
  - `:tensorflow:cc:saved_model:load_latency_by_stage` (restore vs init stages): a load here is one
    step (tf.saved_model.load or a Session load), with no stages to time apart
  - `:tensorflow:serving:model_warmup_records_read`: not found in TF Serving's source; the warmup
    record count is logged at load instead
  - TensorFlow runtime metrics a TF Serving page also carries (`:tensorflow:core:*`, graph
    optimization, XLA, ...): they belong to TensorFlow's C++ runtime, whose registry Python does
    not export
  - no `available_versions` gauge and no load-event counter: TF Serving has neither; a version's
    state is what GetModelStatus and `GET /v1/models/NAME` report
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.registry import Collector

PREFIX = ":tensorflow:serving:"
RUNTIME = "TF1"  # the runtime label TF Serving's TensorFlow session paths write (predict_util.cc)
BATCH_THREAD_POOL = "batch_threads"  # BasicBatchScheduler::Options::thread_pool_name's default (TensorFlow)


# Counters whose TF Serving name has no _total; prometheus-client appends one (see exposition).
BARE_COUNTERS = (PREFIX + "request_count", PREFIX + "batching_session:wrapped_run_count",
                 ":tensorflow:cc:saved_model:load_attempt_count", ":tensorflow:cc:saved_model:load_latency")


def exponential_buckets(scale: float, growth: float, count: int) -> tuple[float, ...]:
    """TensorFlow's monitoring::Buckets::Exponential: `count` limits scale * growth**i (+Inf after)."""
    return tuple(scale * growth**i for i in range(count))


LATENCY_BUCKETS_US = exponential_buckets(10, 1.8, 33)  # util.cc: 10 us to ~20 minutes
QUEUING_BUCKETS_US = exponential_buckets(100, 1.2, 52)  # batching_session.cc: 100 us to ~1 s
EXAMPLE_BUCKETS = exponential_buckets(1, 2, 15)  # util.cc request_example_counts: 1 to 16384
BATCH_BUCKETS = exponential_buckets(1, 2, 14)  # 1 to 8192 rows (the percentiles TF Serving keeps)


def _us(seconds: float) -> float:
    return seconds * 1e6


class ServerMetrics:
    """The server's metrics; the core and the adapters call the `observe_*` methods."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_count = Counter(BARE_COUNTERS[0], "The total number of requests.",
                                     ["model_name", "status"], registry=r)
        self.request_latency = Histogram(
            PREFIX + "request_latency", "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ["model_name", "API", "entrypoint"], buckets=LATENCY_BUCKETS_US, registry=r)
        self.runtime_latency = Histogram(
            PREFIX + "runtime_latency", "Distribution of wall time (in microseconds) for Tensorflow runtime.",
            ["model_name", "API", "runtime"], buckets=LATENCY_BUCKETS_US, registry=r)
        self.example_counts = Histogram(PREFIX + "request_example_counts",
                                        "The number of tensorflow.Examples per request.", ["model"],
                                        buckets=EXAMPLE_BUCKETS, registry=r)
        self.example_count_total = Counter(PREFIX + "request_example_count_total",
                                           "The total number of tensorflow.Examples.", ["model"], registry=r)
        self.warmup_latency = Histogram(
            PREFIX + "model_warmup_latency", "Distribution of wall time (in microseconds) for warming up the model.",
            ["model_path", "status"], buckets=LATENCY_BUCKETS_US, registry=r)
        batching = PREFIX + "batching_session:"
        self.queuing_latency = Histogram(batching + "queuing_latency",
                                         "Distribution of wall time spent (in microseconds) in queuing",
                                         ["thread_pool_name"], buckets=QUEUING_BUCKETS_US, registry=r)
        self.wrapped_run_count = Counter(BARE_COUNTERS[1],
                                         "Total count of run calls on the wrapped session", registry=r)
        self.input_batch_size = Histogram(batching + "input_batch_size",
                                          "Tracks the batch size distribution on the inputs.",
                                          buckets=BATCH_BUCKETS, registry=r)
        self.processed_batch_size = Histogram(batching + "processed_batch_size",
                                              "Tracks the batch size distribution on processing.",
                                              buckets=BATCH_BUCKETS, registry=r)
        self.padding_size = Histogram(batching + "padding_size", "Tracks the padding size distribution on batches.",
                                      ["execution_batch_size"], buckets=(0, *BATCH_BUCKETS), registry=r)
        self.load_attempt_count = Counter(BARE_COUNTERS[2],
                                          "The number of times a SavedModel was successfully loaded.",
                                          ["model_path", "status"], registry=r)
        self.load_latency = Counter(BARE_COUNTERS[3],
                                    "Latency in microseconds for SavedModels that were successfully loaded.",
                                    ["model_path"], registry=r)

    def observe_request(self, model_name: str, api: str, entrypoint: str, status: str, seconds: float) -> None:
        """One client request: counted whatever its status, timed only when it succeeded (as TF Serving)."""
        self.request_count.labels(model_name, status).inc()
        if status == "OK":
            self.request_latency.labels(model_name, api, entrypoint).observe(_us(seconds))

    def observe_runtime(self, model_name: str, api: str, seconds: float) -> None:
        self.runtime_latency.labels(model_name, api, RUNTIME).observe(_us(seconds))

    def observe_examples(self, model_name: str, count: int) -> None:
        self.example_counts.labels(model_name).observe(count)
        self.example_count_total.labels(model_name).inc(count)

    def observe_warmup(self, model_path: str, status: str, seconds: float) -> None:
        self.warmup_latency.labels(model_path, status).observe(_us(seconds))

    def observe_batch(self, rows: int, padded: int, queued_seconds: Iterable[float] = ()) -> None:
        """One batched model run: its rows before and after padding, and each request's wait."""
        self.wrapped_run_count.inc()
        self.input_batch_size.observe(rows)
        self.processed_batch_size.observe(padded)
        self.padding_size.labels(str(padded)).observe(padded - rows)
        queuing = self.queuing_latency.labels(BATCH_THREAD_POOL)
        for seconds in queued_seconds:
            queuing.observe(_us(seconds))

    def timed_loader(self, load: Callable):
        """`load(name, version, path)` counted and timed as TensorFlow's SavedModel loader does."""
        def timed(name, version, path):
            started = time.perf_counter()
            try:
                servable = load(name, version, path)
            except Exception:
                self.load_attempt_count.labels(str(path), "fail").inc()
                raise
            self.load_attempt_count.labels(str(path), "success").inc()
            self.load_latency.labels(str(path)).inc(_us(time.perf_counter() - started))
            return servable
        return timed

    def exposition(self) -> bytes:
        """The Prometheus text page, with TF Serving's series names.

        prometheus-client writes a counter `c` as `c_total` (OpenMetrics naming) and cannot be told
        otherwise, so the counters TF Serving names without `_total` are renamed back here.
        """
        text = generate_latest(_WithoutCreated(self.registry)).decode()
        for name in BARE_COUNTERS:
            text = text.replace(f"{name}_total", name)
        return text.encode()


class _WithoutCreated(Collector):
    """The registry without prometheus-client's `_created` series, which TF Serving does not have.
    (prometheus_client.disable_created_metrics() would do it process-wide, for every registry.)"""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
