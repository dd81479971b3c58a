"""Multi-worker training on one machine, and TF_CONFIG for a Kubernetes Indexed Job.

    aekit train --multiworker-local 2 --dataset mnist-sample --epochs 2
    # two worker processes on 127.0.0.1, MultiWorkerMirroredStrategy, output prefixed [worker-i]

The workers run `aekit train` itself with a generated TF_CONFIG: the same code path as on
several hosts, where TF_CONFIG comes from Kubeflow's TFJob or from `--indexed-job`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from training.config import ConfigError, TrainConfig
from training.distribute import indexed_job_tf_config


def free_ports(count: int) -> list[int]:
    """Ports the OS says are free now (held open together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def local_cluster(count: int) -> dict:
    return {"worker": [f"127.0.0.1:{port}" for port in free_ports(count)]}


def worker_command(config_path: str) -> list[str]:
    return [sys.executable, "-m", "aekit_cli", "train", "--config", config_path]


def run_local_workers(count: int, cfg: TrainConfig, cluster: dict | None = None) -> int:
    """Runs `count` workers; streams their output; if one fails, stops the rest and fails."""
    if count < 2:
        raise ConfigError(f"--multiworker-local needs at least 2 workers, got {count}")
    cluster = cluster or local_cluster(count)
    cfg = dataclasses.replace(cfg, num_logical_devices=0)  # one device per worker process
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="aekit-mw-", delete=False) as f:
        json.dump(dataclasses.asdict(cfg), f)
    try:
        procs = [_start_worker(i, cluster, f.name) for i in range(count)]
        return _supervise(procs)
    finally:
        os.unlink(f.name)


def _start_worker(index: int, cluster: dict, config_path: str) -> subprocess.Popen:
    env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(worker_command(config_path), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    threading.Thread(target=_stream, args=(proc, f"[worker-{index}] "), daemon=True).start()
    return proc


def _stream(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def _supervise(procs: list[subprocess.Popen]) -> int:
    """Waits for all; forwards SIGTERM (workers save, then exit); one failure stops the others."""
    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward) if threading.current_thread() is threading.main_thread() else None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                time.sleep(5)  # let peers report their own error and save if they were told to
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                for p in procs:
                    p.wait()
                index, code = failed[0]
                print(f"aekit: error: worker-{index} {_ended(code)}; stopped the others", file=sys.stderr)
                return exit_status(code)
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def exit_status(returncode: int) -> int:
    """A shell's status for a child's return code: 128 + N for a child killed by signal N (-N)."""
    return 128 - returncode if returncode < 0 else returncode


def _ended(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name} (exit status {exit_status(returncode)})"
    return f"exited with status {returncode}"


def set_tf_config_from_indexed_job(num_workers: int | None, host_pattern: str | None, port: int,
                                   environ=os.environ) -> dict:
    """Sets TF_CONFIG from JOB_COMPLETION_INDEX (set by Kubernetes on Indexed Job pods)."""
    if not num_workers or not host_pattern:
        raise ConfigError("--indexed-job needs --num-workers and --worker-host-pattern")
    raw = environ.get("JOB_COMPLETION_INDEX")
    if raw is None or not raw.isdigit():
        raise ConfigError(f"--indexed-job needs JOB_COMPLETION_INDEX (an integer) in the environment; got {raw!r}")
    config = indexed_job_tf_config(int(raw), num_workers, host_pattern, port)
    environ["TF_CONFIG"] = json.dumps(config)
    return config

