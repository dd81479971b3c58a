"""Devices and workers: which tf.distribute strategy a run uses, and who the chief is.

  one device                       -> the default strategy
  several GPUs, or --num-logical-devices N on CPU -> MirroredStrategy
  TF_CONFIG listing several workers (Kubeflow TFJob, an Indexed Job, --multiworker-local)
                                   -> MultiWorkerMirroredStrategy (ring on CPU, NCCL on GPUs)

The training loop is the same for all three; only this module knows the difference.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from training.config import ConfigError


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


def make_strategy(num_logical_devices: int = 0, collective: str = "auto",
                  collective_timeout_seconds: float = 300.0) -> tf.distribute.Strategy:
    """Picks the strategy from TF_CONFIG and the visible devices (see module doc)."""
    tf_config = read_tf_config()
    if num_workers(tf_config) > 1:
        return _multi_worker_strategy(collective, collective_timeout_seconds)
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if num_logical_devices > 1 and not gpus:
        configure_logical_devices(num_logical_devices)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")[:num_logical_devices]]
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def _multi_worker_strategy(collective: str, timeout_seconds: float) -> tf.distribute.Strategy:
    implementation = {
        "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    }[collective]
    if collective == "nccl" and not tf.config.list_physical_devices("GPU"):
        raise ConfigError("--collective nccl needs GPUs; use ring (or auto) on CPU")
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=implementation, timeout_seconds=timeout_seconds)  # a dead peer fails, not hangs
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """The task that writes summaries and exports: 'chief', else worker 0, else the only process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


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
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 0, 1
    cluster = resolver.cluster_spec().as_dict()
    tasks = [("chief", i) for i in range(len(cluster.get("chief", [])))] + \
            [("worker", i) for i in range(len(cluster.get("worker", [])))]
    return tasks.index((resolver.task_type, resolver.task_id)), len(tasks)


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
