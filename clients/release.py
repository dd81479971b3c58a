"""`aekit release`: move a version label (stable, canary) of a model to a version on running servers.

    aekit release --config models.config --model autoencoder --label canary --version 2 \\
        --server dns:///aekit-serving-grpc:8500          # every pod behind a headless Service
    aekit release --config models.config --label stable --version 2 --server ...   # promote
    aekit release --config models.config --label stable --version 1 --server ...   # roll back

Refuses a version that is not AVAILABLE on every server (GetModelStatus) before changing
anything. Then sends each server the edited config (HandleReloadConfigRequest), so the label
moves at once; if one refuses, the others get the old config back. Last it rewrites the config
file, which the servers re-read every --model_config_file_poll_wait_seconds: TF Serving applies
the file at every poll (server.cc PollFilesystemAndReloadConfig), so a label moved only by RPC
would move back. Prints one JSON line: the label, the version, the servers and the file.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import tempfile
from pathlib import Path

from clients.errors import ClientError

# gRPC and TensorFlow Serving's protos are imported where used, so `aekit --help` stays instant.


def add_release_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the model config file the servers poll (models.config)")
    p.add_argument("--model", default="autoencoder")
    p.add_argument("--label", required=True, help="the version label to move, e.g. stable or canary")
    p.add_argument("--version", type=int, required=True, help="the version the label moves to")
    p.add_argument("--server", action="append", required=True,
                   help="gRPC HOST:PORT, dns:///NAME:PORT (every address it resolves to) or "
                        "ipv4:IP:PORT,IP:PORT; repeat for more servers")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")


def release(config_path: str, model: str, label: str, version: int, servers: list[str],
            timeout: float = 30.0) -> dict:
    """Moves `label` of `model` to `version` on every server and in the config file."""
    old = read_config(config_path)
    new = with_label(old, model, label, version)
    targets = [t for server in servers for t in replica_targets(server)]
    for target in targets:
        check_available(target, model, version, timeout)
    moved = []
    for target in targets:
        try:
            reload_config(target, new, timeout)
        except ClientError as e:
            for done in moved:  # all servers or none: put the label back where it was
                reload_config(done, old, timeout)
            raise ClientError(f"{target} refused the label move, which was undone on {len(moved)} other "
                              f"server(s): {e}", e.code) from None
        moved.append(target)
    write_config(config_path, new)
    return {"model": model, "label": label, "version": version, "servers": targets, "config": str(config_path)}


def replica_targets(server: str) -> list[str]:
    """The addresses behind one gRPC target: each needs its own reload, since a channel sends
    one call to one of them."""
    if server.startswith("dns:///"):
        host, _, port = server.removeprefix("dns:///").rpartition(":")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (socket.gaierror, ValueError) as e:
            raise ClientError(f"--server {server}: cannot resolve {host!r} ({e})", "UNAVAILABLE") from None
        addresses = dict.fromkeys(info[4][0] for info in infos)  # ordered, no duplicates
        return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]
    for scheme in ("ipv4:", "ipv6:"):
        if server.startswith(scheme):
            return server.removeprefix(scheme).split(",")
    return [server]


def read_config(path: str | Path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    try:
        return text_format.Parse(Path(path).read_text(), model_server_config_pb2.ModelServerConfig())
    except OSError as e:
        raise ClientError(f"--config {path}: {e.strerror}", "INVALID_ARGUMENT") from None
    except text_format.ParseError as e:
        raise ClientError(f"--config {path} is not a text-format ModelServerConfig: {e}", "INVALID_ARGUMENT") from None


def with_label(config, model: str, label: str, version: int):
    """A copy of `config` with `label` of `model` pointing at `version`."""
    new = type(config)()
    new.CopyFrom(config)
    entries = [c for c in new.model_config_list.config if c.name == model]
    if not entries:
        names = [c.name for c in new.model_config_list.config]
        raise ClientError(f"the config has no model {model!r} (it has {names})", "INVALID_ARGUMENT")
    entries[0].version_labels[label] = version
    return new


def check_available(target: str, model: str, version: int, timeout: float) -> None:
    from clients.grpc_client import AutoencoderClient

    with AutoencoderClient(target, model, timeout=timeout, retries=2) as client:
        try:
            states = client.status(version=version)
        except ClientError as e:
            if e.code != "NOT_FOUND":
                raise
            states = []
    state = states[0]["state"] if states else "not found"
    if state != "AVAILABLE":
        detail = f" ({states[0]['error_message']})" if states and states[0]["error_message"] else ""
        raise ClientError(f"version {version} of {model} is {state}{detail} on {target}, not AVAILABLE: "
                          "a label may only point at a loaded version; wait for it to load, or pick another",
                          "FAILED_PRECONDITION")


def reload_config(target: str, config, timeout: float) -> None:
    import grpc
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc

    from clients.grpc_client import channel_options, code_name

    request = model_management_pb2.ReloadConfigRequest(config=config)
    with grpc.insecure_channel(target, options=channel_options()) as channel:
        try:
            response = model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request,
                                                                                                  timeout=timeout)
        except grpc.RpcError as e:
            raise ClientError(f"{e.code().name}: {e.details()}", e.code().name) from None
    if response.status.error_code != 0:
        code = code_name(response.status.error_code)
        raise ClientError(f"{code}: {response.status.error_message}", code)


def write_config(path: str | Path, config) -> None:
    """Replaces the file atomically (a poll never reads half of it), keeping its leading comments."""
    from google.protobuf import text_format

    path = Path(path)
    lines = path.read_text().splitlines(keepends=True)
    header = "".join(itertools.takewhile(lambda line: line.startswith("#"), lines))
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(header + text_format.MessageToString(config))
    os.chmod(f.name, path.stat().st_mode & 0o777)  # the servers may run as another user
    os.replace(f.name, path)
