"""Devices and workers: which tf.distribute strategy a run uses, and who the chief is.

  one device                       -> the default strategy
  several GPUs, or --num-logical-devices N on CPU -> MirroredStrategy
  TF_CONFIG listing several workers (Kubeflow TFJob, an Indexed Job, --multiworker-local)
                                   -> MultiWorkerMirroredStrategy (ring on CPU, NCCL on GPUs)

The training loop is the same for all three; only this module knows the difference.

Several workers first meet (rendezvous): each says every few seconds whom it still waits for,
gives up after --rendezvous-timeout-seconds naming them, and a SIGTERM meanwhile ends it at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time

import tensorflow as tf
from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2

from training.config import ConfigError

REPORT_EVERY_SECONDS = 5.0  # a waiting line this often while workers are missing
CONNECT_SECONDS = 60.0  # TensorFlow's own connect, once every worker answered; SIGTERM waits for it
# A silent peer must be found by the coordination heartbeat (at most 2x the timeout, see
# configure_coordination), never by a collective's own timer: that timer completes the op while
# its ring transfers are still in flight (tensorflow/core/common_runtime/base_collective_executor.cc,
# BaseCollectiveExecutor::ExecuteAsync: StartAbort then done), and the cut-off worker then died
# in SIGSEGV inside the aborted RingReduce (issue 19: 4 of 13 link-down runs under MALLOC_PERTURB_,
# 0 of 20 with this backstop). The heartbeat's error instead aborts every collective through
# StartAbort and lets each finish itself (context_distributed_manager.cc, EnableCollectiveOps).
# The timer stays as a backstop for a peer that heartbeats but never joins an all-reduce. (The
# strategy's first broadcast of the initial weights takes no timeout at all:
# collective_all_reduce_strategy.py, _get_variable_creator_initial_value.)
BACKSTOP_MARGIN_SECONDS = 10.0  # the heartbeat reports up to ~2 s after its timeout (1 s sleep, 1 s checks)


def heartbeat_timeout_seconds(silent_peer_seconds: float) -> float:
    """TensorFlow's heartbeat timeout for --collective-timeout-seconds (see configure_coordination)."""
    return 2 * silent_peer_seconds


def collective_backstop_seconds(silent_peer_seconds: float) -> float:
    """3x the setting, and always at least BACKSTOP_MARGIN_SECONDS after the heartbeat's timeout."""
    return heartbeat_timeout_seconds(silent_peer_seconds) + max(silent_peer_seconds, BACKSTOP_MARGIN_SECONDS)


class RendezvousFailed(RuntimeError):
    """The workers never all met; nothing was trained. Start the missing ones, or rerun.

    Nothing is left to save, so the CLI ends the process right after the message
    (abandon_process) instead of waiting seconds for TensorFlow's teardown.
    """

    exit_code = 75  # EX_TEMPFAIL: a rerun goes through once every worker runs
    abandon_process = True


class StoppedWhileWaiting(RendezvousFailed):
    """SIGTERM arrived while the workers were meeting: stop now, there is nothing to save."""

    exit_code = 143


class LostAtStartup(RendezvousFailed):
    """Every worker answered, then TensorFlow's own connect failed: a peer went away meanwhile."""

    exit_code = 1


def configure_logical_devices(count: int) -> None:
    """Splits the CPU into `count` logical devices. Must run before TensorFlow initialises."""
    if count <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * count
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have < count:
            raise ConfigError(f"TensorFlow is already initialised with {have} CPU device(s); "
                              f"--num-logical-devices {count} must be set before anything uses TF") from None


def read_tf_config(environ=None) -> dict | None:
    """The parsed, checked TF_CONFIG, or None when unset. Errors name the bad field."""
    raw = (environ if environ is not None else os.environ).get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e}); expected "
                          '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}') from None
    if not isinstance(config, dict):
        raise ConfigError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise ConfigError("TF_CONFIG field 'cluster' is missing or empty; it maps job names to host:port lists")
    for job, hosts in cluster.items():
        if not isinstance(hosts, list) or not hosts or not all(_is_host_port(h) for h in hosts):
            raise ConfigError(f"TF_CONFIG field 'cluster.{job}' must be a non-empty list of 'host:port' strings; got {hosts!r}")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ConfigError("TF_CONFIG field 'task' must be an object with 'type' and 'index'")
    if task["type"] not in cluster:
        raise ConfigError(f"TF_CONFIG field 'task.type' is {task['type']!r}, not a job in cluster ({sorted(cluster)})")
    if not isinstance(task["index"], int) or not 0 <= task["index"] < len(cluster[task["type"]]):
        raise ConfigError(f"TF_CONFIG field 'task.index' is {task['index']!r}; job {task['type']!r} has "
                          f"{len(cluster[task['type']])} task(s)")
    return config


def _is_host_port(value) -> bool:
    if not isinstance(value, str) or ":" not in value:
        return False
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def num_workers(tf_config: dict | None) -> int:
    if not tf_config:
        return 1
    cluster = tf_config["cluster"]
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def task_of(tf_config: dict | None) -> str:
    """'worker-1' for TF_CONFIG's own task, as task_name() says once the strategy exists."""
    if num_workers(tf_config) <= 1:
        return "local"
    return f"{tf_config['task']['type']}-{tf_config['task']['index']}"


def is_chief_task(tf_config: dict | None) -> bool:
    """is_chief() before any strategy exists: read from TF_CONFIG alone."""
    if num_workers(tf_config) <= 1:
        return True
    task, cluster = tf_config["task"], tf_config["cluster"]
    return task["type"] == "chief" or (task["type"] == "worker" and task["index"] == 0 and "chief" not in cluster)


def make_strategy(num_logical_devices: int = 0, collective: str = "auto",
                  collective_timeout_seconds: float = 300.0,
                  rendezvous_timeout_seconds: float = 900.0) -> tf.distribute.Strategy:
    """Picks the strategy from TF_CONFIG and the visible devices (see module doc)."""
    tf_config = read_tf_config()
    if num_workers(tf_config) > 1:
        return _multi_worker_strategy(tf_config, collective, collective_timeout_seconds, rendezvous_timeout_seconds)
    gpus = tf.config.list_physical_devices("GPU")
    enable_memory_growth(gpus)
    if len(gpus) > 1:
        # NCCL all-reduce between GPUs; the CPU paths keep MirroredStrategy's own default.
        return tf.distribute.MirroredStrategy(cross_device_ops=tf.distribute.NcclAllReduce())
    if num_logical_devices > 1 and not gpus:
        configure_logical_devices(num_logical_devices)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")[:num_logical_devices]]
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def enable_memory_growth(gpus) -> None:
    """GPU memory allocated as needed, not all at start: a trainer and a server can share a GPU node."""
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            return  # TensorFlow already used the GPUs: their memory setting is fixed for this process


def _multi_worker_strategy(tf_config: dict, collective: str, timeout_seconds: float,
                           rendezvous_seconds: float) -> tf.distribute.Strategy:
    implementation = {
        "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    }[collective]
    if collective == "nccl" and not tf.config.list_physical_devices("GPU"):
        raise ConfigError("--collective nccl needs GPUs; use ring (or auto) on CPU")
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=implementation, timeout_seconds=collective_backstop_seconds(timeout_seconds))
    wait_for_workers(tf_config, rendezvous_seconds)
    configure_coordination(tf_config, timeout_seconds, min(CONNECT_SECONDS, rendezvous_seconds))
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except (tf.errors.OpError, RuntimeError) as e:
        detail = (e.message if isinstance(e, tf.errors.OpError) else str(e)).strip().splitlines()
        raise LostAtStartup(f"{task_of(tf_config)}: a peer worker failed or became unreachable while the workers "
                            f"connected ({type(e).__name__}: {detail[0][:200] if detail else ''}); "
                            "restart the job") from None


def configure_coordination(tf_config: dict, silent_peer_seconds: float, connect_seconds: float) -> None:
    """TensorFlow's coordination service, set up as MultiWorkerMirroredStrategy would, with our timeouts.

    The strategy configures the service only when nobody did (collective_all_reduce_strategy.py,
    CollectiveAllReduceExtended._initialize_multi_worker), with a 10 s heartbeat timeout that
    fails a job 5-10 s into a partition whatever the collective timeout says. The agent sends a
    heartbeat every heartbeat_timeout / 2 and gives each that long to arrive
    (coordination_service_agent.cc, StartSendingHeartbeats), so with twice our setting a peer
    silent for less than silent_peer_seconds is always ridden out and one silent for more than
    twice that always fails the job (7-13 s after a link was taken down, with 6 s); the
    all-reduces wait longer still (collective_backstop_seconds). A link flap counts longer than
    it lasts: TCP's retransmission backoff may resend up to about the flap's length after the
    link is back, so only flaps under half the setting are always ridden out.
    cluster_register_timeout bounds TensorFlow's own wait in Connect() (default one hour): every
    worker answered in wait_for_workers already, so only one that died since is waited for.
    """
    cluster = tf_config["cluster"]
    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(cluster[job]))
            for job in ("chief", "worker") if job in cluster]
    # The strategy's own hooks: no public API sets these timeouts.
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    context.context().configure_coordination_service(
        service_type="standalone", service_leader=multi_worker_util.coordination_leader(cluster),
        coordinated_jobs=jobs, heartbeat_timeout_in_ms=int(1000 * heartbeat_timeout_seconds(silent_peer_seconds)),
        cluster_register_timeout_in_ms=int(1000 * connect_seconds))
    # Without the barrier the leader waits for a task that never registers forever, whatever the
    # timeout says (seen with a peer killed right after it answered); the Python API has no argument.
    context.context().coordination_service.cluster_register_with_barrier = True


def wait_for_workers(tf_config: dict, timeout_seconds: float, report_every: float = REPORT_EVERY_SECONDS) -> None:
    """Returns once every other worker's port answers, saying every few seconds whom it waits for.

    This runs before TensorFlow connects, because TensorFlow's connect holds the Python lock
    (no report, no timeout of ours could run) and takes SIGTERM with its own handler
    (context_distributed_manager.cc, EnableCollectiveOps: PreemptionNotifier "sigterm").
    Meanwhile this worker's own port listens, so that the others see it arrive; the kernel
    completes their probes without an accept(). The caller holds SIGTERM blocked
    (aekit_cli.cmd_train), so a SIGTERM here is taken synchronously and ends the wait.
    """
    me = task_of(tf_config)
    with _listening(_own_address(tf_config)):
        started = time.monotonic()
        next_report = started + min(2.0, report_every)
        while missing := missing_peers(tf_config):
            elapsed = time.monotonic() - started
            if elapsed >= timeout_seconds:
                raise RendezvousFailed(f"{me}: gave up after {elapsed:.0f}s waiting for {_describe(missing, tf_config)}; "
                                       "start them (check TF_CONFIG and the network between hosts) or raise "
                                       "--rendezvous-timeout-seconds")
            if time.monotonic() >= next_report:
                print(f"{me}: waiting for {_describe(missing, tf_config)} "
                      f"({elapsed:.0f}s of --rendezvous-timeout-seconds {timeout_seconds:.0f})", flush=True)
                next_report += report_every
            if _sigterm_within(0.5):
                raise StoppedWhileWaiting(f"{me}: stopped by SIGTERM while waiting for the other workers; "
                                          "nothing was trained")
    print(f"{me}: all {num_workers(tf_config)} workers answer; connecting", flush=True)


def _own_address(tf_config: dict) -> str:
    task = tf_config["task"]
    return tf_config["cluster"][task["type"]][task["index"]]


@contextlib.contextmanager
def _listening(address: str):
    port = int(address.rpartition(":")[2])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("0.0.0.0", port))
    except OSError as e:
        listener.close()
        raise ConfigError(f"this worker's port {port} (TF_CONFIG {address}) cannot be bound: {e.strerror}; "
                          "another process holds it, or TF_CONFIG lists the wrong port") from None
    listener.listen(64)
    try:
        yield
    finally:
        listener.close()  # before TensorFlow binds the same port


def _sigterm_within(seconds: float) -> bool:
    """Waits up to `seconds`; True if a SIGTERM (held blocked by the caller) arrived meanwhile."""
    if signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, []):
        time.sleep(seconds)  # not held (a test calling in-process): the usual handler sees it
        return False
    return signal.sigtimedwait([signal.SIGTERM], seconds) is not None


def missing_peers(tf_config: dict) -> list[str]:
    """The other workers' host:port that do not accept a TCP connection yet."""
    me = tf_config["task"]
    peers = [address for job, hosts in tf_config["cluster"].items() for index, address in enumerate(hosts)
             if (job, index) != (me["type"], me["index"])]
    return [address for address in peers if not _answers(address)]


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def _describe(missing: list[str], tf_config: dict) -> str:
    total = num_workers(tf_config)
    if not missing:
        return f"the other workers to finish joining (all {total} answer)"
    return f"{len(missing)} of {total} workers: {', '.join(missing)}"


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """The task that writes summaries and exports: 'chief', else worker 0, else the only process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def worker_ids(strategy: tf.distribute.Strategy) -> list[str]:
    """Every task's name in TensorFlow's order (chief first), or ["local"] for one process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return ["local"]
    cluster = resolver.cluster_spec().as_dict()
    return [f"{job}-{index}" for job in ("chief", "worker") if job in cluster for index in range(len(cluster[job]))]


def task_name(strategy: tf.distribute.Strategy) -> str:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "local"
    return f"{resolver.task_type}-{resolver.task_id}"


def indexed_job_tf_config(index: int, num_workers: int, host_pattern: str, port: int) -> dict:
    """TF_CONFIG for pod `index` of a Kubernetes Indexed Job behind a headless Service.

    `host_pattern` has `{index}`, e.g. "aekit-train-{index}.aekit-train" (the pod hostname
    `<job>-<index>` under the Service's subdomain), so plain Kubernetes needs no operator.
    """
    if num_workers < 1:
        raise ConfigError(f"--num-workers must be at least 1, got {num_workers}")
    if "{index}" not in host_pattern:
        raise ConfigError(f"--worker-host-pattern must contain '{{index}}'; got {host_pattern!r}")
    if not 0 <= index < num_workers:
        raise ConfigError(f"JOB_COMPLETION_INDEX is {index}, outside 0..{num_workers - 1} (--num-workers)")
    hosts = [f"{host_pattern.format(index=i)}:{port}" for i in range(num_workers)]
    return {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}


def worker_part(strategy: tf.distribute.Strategy) -> tuple[int, int]:
    """(this worker's index, number of workers): chief first, then the workers in order."""
    workers = worker_ids(strategy)
    return workers.index(task_name(strategy)), len(workers)


def sum_over_workers(strategy: tf.distribute.Strategy, values) -> tf.Tensor:
    """Sums a float vector over workers with the strategy's collectives (all workers must call)."""
    if worker_part(strategy)[1] == 1:
        return tf.constant(values, tf.float64)
    local_replicas = len(strategy.extended.worker_devices)  # each replica holds this worker's copy

    @tf.function
    def all_reduce(vector):
        per_replica = strategy.run(lambda v: v / local_replicas, args=(vector,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return all_reduce(tf.constant(values, tf.float64))
