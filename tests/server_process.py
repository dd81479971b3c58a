"""Starts `aekit serve` as a real process on free ports for end-to-end tests; stops it after."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from training.multiworker import free_ports

READY_TIMEOUT = 120.0


def pinned_to(cpus: set[int]):
    """A subprocess `preexec_fn` that pins the child to `cpus` (like taskset -c) before exec, so
    every thread it starts inherits them."""
    return lambda: os.sched_setaffinity(0, cpus)


def self_signed_tls(folder: Path) -> tuple[Path, Path, Path]:
    """(key, cert, ssl.config) for localhost, as `--ssl_config_file` takes them (needs openssl)."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    ssl_config = folder / "ssl.config"
    ssl_config.write_text(f"server_key: {json.dumps(key.read_text())}\nserver_cert: {json.dumps(cert.read_text())}\n")
    return key, cert, ssl_config


class ServerProcess:
    def __init__(self, flags: list[str], log_path: Path, rest: bool = True, cpus: set[int] | None = None):
        self.grpc_port, self.rest_port = free_ports(2)
        argv = [sys.executable, "-m", "aekit_cli", "serve", f"--port={self.grpc_port}", *flags]
        if rest:
            argv.append(f"--rest_api_port={self.rest_port}")
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=pinned_to(cpus) if cpus else None)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_available(self, models: list[str], timeout: float = READY_TIMEOUT) -> None:
        """Polls REST status until every model has an AVAILABLE version."""
        deadline = time.monotonic() + timeout
        pending = list(models)
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"models {pending} not AVAILABLE after {timeout}s:\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.rest_url}/v1/models/{pending[0]}", timeout=2) as r:
                    states = [s["state"] for s in json.load(r)["model_version_status"]]
                if "AVAILABLE" in states:
                    pending.pop(0)
                    continue
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_server(flags: list[str], log_path: Path, models: list[str] | None = None, rest: bool = True,
                   cpus: set[int] | None = None):
    server = ServerProcess(flags, log_path, rest, cpus)
    try:
        if models:
            server.wait_available(models)
        yield server
    finally:
        server.stop()
