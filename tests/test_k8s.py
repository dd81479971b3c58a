"""Kubernetes manifests, checked offline: render, schema-validate, policy, consistency, and a
simulation that runs the rendered training and serving commands as local processes."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import numpy as np
import pytest
import yaml

from serving.main import parse_flags
from training.distribute import indexed_job_tf_config
from training.multiworker import free_ports

K8S = Path(__file__).resolve().parents[1] / "k8s"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/gpu", "overlays/gpu-tfjob"]
K8S_VERSION = "1.32.0"
TFJOB_SCHEMA = json.loads((K8S / "schemas" / "tfjob-v1.schema.json").read_text())


def render(path: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl (with kustomize) is needed to render k8s/: install kubectl")
    result = subprocess.run(["kubectl", "kustomize", str(K8S / path)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(result.stdout) if d]


RENDERED = {path: render(path) for path in KUSTOMIZATIONS} if shutil.which("kubectl") else {}


def by_kind(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert found, f"no {kind} {name or ''}"
    return found[0]


def pod_specs(docs):
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc["kind"], doc["spec"]["template"]["spec"]
        elif doc["kind"] == "TFJob":
            for replica in doc["spec"]["tfReplicaSpecs"].values():
                yield "TFJob", replica["template"]["spec"]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_renders_and_validates_strictly(path):
    for doc in RENDERED[path]:
        if doc["kind"] == "TFJob":
            jsonschema.validate(doc, TFJOB_SCHEMA)
            for replica in doc["spec"]["tfReplicaSpecs"].values():  # the pod template is core/v1
                template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                            "template": replica["template"]}
                kubernetes_validate.validate(template, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_container_follows_policy(path):
    for kind, spec in pod_specs(RENDERED[path]):
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True and isinstance(pod_security["runAsUser"], int)
        assert pod_security["runAsUser"] > 0
        for container in spec["containers"] + spec.get("initContainers", []):
            image = container["image"]
            assert re.fullmatch(r"[\w./-]+(:[\w.-]+|@sha256:[0-9a-f]{64})", image), f"unpinned image {image}"
            assert not image.endswith(":latest"), image
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][section]), (kind, section)
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_serving_has_probes_named_ports_and_its_companions(path):
    docs = RENDERED[path]
    container = by_kind(docs, "Deployment", "aekit-serving")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("tensorflow/serving:")
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 8500
    assert {(p["name"], p["containerPort"]) for p in container["ports"]} == {("grpc", 8500), ("http", 8501)}
    service = by_kind(docs, "Service", "aekit-serving")
    assert service["spec"]["type"] == "ClusterIP"
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {("grpc", 8500), ("http", 8501)}
    assert by_kind(docs, "HorizontalPodAutoscaler")["apiVersion"] == "autoscaling/v2"
    by_kind(docs, "PodDisruptionBudget")
    policy = by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"aekit-client": "true"}
    by_kind(docs, "ServiceAccount", "aekit")


def test_gpu_overlays_ask_for_gpus_and_use_nccl():
    for path in ("overlays/gpu", "overlays/gpu-tfjob"):
        docs = RENDERED[path]
        serving = by_kind(docs, "Deployment", "aekit-serving")["spec"]["template"]["spec"]["containers"][0]
        assert serving["image"].endswith("-gpu") and serving["resources"]["limits"]["nvidia.com/gpu"] == "1"
        for kind, spec in pod_specs(docs):
            if kind in ("Job", "TFJob"):
                trainer = spec["containers"][0]
                assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "1"
                assert "--collective=nccl" in trainer["args"] and trainer["image"].endswith("-gpu")
    tfjob = by_kind(RENDERED["overlays/gpu-tfjob"], "TFJob")
    assert tfjob["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] == "tensorflow"
    assert not [d for d in RENDERED["overlays/gpu-tfjob"] if d["kind"] == "Job"]
    cpu_trainer = by_kind(RENDERED["overlays/cpu"], "Job")["spec"]["template"]["spec"]["containers"][0]
    assert "--collective=ring" in cpu_trainer["args"] and "nvidia.com/gpu" not in cpu_trainer["resources"]["limits"]


def _arg(args: list[str], flag: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(flag + "="))


def _mount_path_on_volume(spec: dict, container: dict, path: str) -> tuple[str, str]:
    """(claim name, path inside the volume) that `path` in `container` resolves to."""
    for mount in sorted(container["volumeMounts"], key=lambda m: -len(m["mountPath"])):
        if path == mount["mountPath"] or path.startswith(mount["mountPath"] + "/"):
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            inside = (mount.get("subPath", "") + path[len(mount["mountPath"]):]).strip("/")
            return volume["persistentVolumeClaim"]["claimName"], inside
    raise AssertionError(f"{path} is on no volume")


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_serving_reads_what_training_writes(path):
    docs = RENDERED[path]
    serving_spec = by_kind(docs, "Deployment", "aekit-serving")["spec"]["template"]["spec"]
    serving = serving_spec["containers"][0]
    flags = parse_flags([a for a in serving["args"]])  # the same flags `aekit serve` takes
    assert flags.enable_grpc_healthcheck_service and flags.port == 8500 and flags.rest_api_port == 8501
    config_map = by_kind(docs, "ConfigMap")
    models_config = config_map["data"][Path(flags.model_config_file).name]
    name = re.search(r'name: "([^"]+)"', models_config).group(1)
    base_path = re.search(r'base_path: "([^"]+)"', models_config).group(1)
    served = _mount_path_on_volume(serving_spec, serving, base_path)
    for kind, spec in pod_specs(docs):
        if kind in ("Job", "TFJob"):
            trainer = spec["containers"][0]
            written = _mount_path_on_volume(spec, trainer, _arg(trainer["args"], "--model-base-path"))
            assert written == served, (written, served)
            assert Path(_arg(trainer["args"], "--model-base-path")).name == name


def test_indexed_job_tf_config_lists_the_headless_service_names():
    docs = RENDERED["overlays/cpu"]
    job = by_kind(docs, "Job", "aekit-train")
    service = by_kind(docs, "Service", "aekit-train")
    spec = job["spec"]["template"]["spec"]
    args = spec["containers"][0]["args"]
    count = int(_arg(args, "--num-workers"))
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == count
    assert spec["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    port = int(_arg(args, "--worker-port"))
    assert {p["port"] for p in service["spec"]["ports"]} == {port}
    for index in range(count):
        config = indexed_job_tf_config(index, count, _arg(args, "--worker-host-pattern"), port)
        # Indexed Job pods are named <job>-<index> and resolvable under the Service's subdomain.
        assert config["cluster"]["worker"] == [f"{job['metadata']['name']}-{i}.{service['metadata']['name']}:{port}"
                                               for i in range(count)]
        assert config["task"] == {"type": "worker", "index": index}


def test_dockerfile_structure():
    text = (K8S / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"tensorflow/tensorflow:\d+\.\d+\.\d+", base)  # official, pinned
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    assert re.search(r'^ENTRYPOINT \["aekit"\]$', text, re.M)
    tags = {c["image"] for docs in RENDERED.values() for _, spec in pod_specs(docs) for c in spec["containers"]
            if c["image"].startswith("ghcr.io/aekit/aekit")}
    assert tags == {"ghcr.io/aekit/aekit:0.1.0", "ghcr.io/aekit/aekit:0.1.0-gpu"}
    for name in ("pyproject.toml", "aekit_cli.py", "training", "serving", "clients"):
        assert name in text and (K8S.parent / name).exists()


@pytest.mark.slow
def test_simulation_the_manifests_own_commands_train_and_serve(tmp_path):
    """Runs the rendered Indexed Job's pods as local processes (hosts mapped to 127.0.0.1 ports,
    the volume to a folder, --smoke to finish in seconds), then serves the export with the
    rendered serving flags and calls it."""
    docs = RENDERED["overlays/cpu"]
    job = by_kind(docs, "Job", "aekit-train")
    container = job["spec"]["template"]["spec"]["containers"][0]
    data_dir = tmp_path / "volume"
    count = job["spec"]["completions"]
    ports = free_ports(count)
    args = container["args"]
    pattern, port = _arg(args, "--worker-host-pattern"), int(_arg(args, "--worker-port"))
    real = indexed_job_tf_config(0, count, pattern, port)["cluster"]["worker"]
    local = {host: f"127.0.0.1:{p}" for host, p in zip(real, ports)}
    procs = []
    for index in range(count):
        # What the pod computes from JOB_COMPLETION_INDEX, with its hosts mapped to loopback.
        tf_config = indexed_job_tf_config(index, count, pattern, port)
        tf_config["cluster"]["worker"] = [local[h] for h in tf_config["cluster"]["worker"]]
        pod_args = [a.replace("/data", str(data_dir)) for a in args
                    if not a.startswith(("--indexed-job", "--num-workers", "--worker-host-pattern", "--worker-port"))]
        env = {"TF_CONFIG": json.dumps(tf_config), "JOB_COMPLETION_INDEX": str(index), "TF_CPP_MIN_LOG_LEVEL": "2",
               "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
        procs.append(subprocess.Popen([sys.executable, "-m", "aekit_cli", *pod_args, "--smoke"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    versions = list((data_dir / "models" / "autoencoder").iterdir())
    assert [v.name for v in versions] == ["1"]  # the chief exported once

    deployment = by_kind(docs, "Deployment", "aekit-serving")["spec"]["template"]["spec"]
    serving_args = deployment["containers"][0]["args"]
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for file_name, text in by_kind(docs, "ConfigMap")["data"].items():
        (config_dir / file_name).write_text(text.replace('"/models/', f'"{data_dir}/models/'))
    grpc_port, rest_port = free_ports(2)
    local_args = [a.replace("/config/", f"{config_dir}/").replace("--port=8500", f"--port={grpc_port}")
                  .replace("--rest_api_port=8501", f"--rest_api_port={rest_port}") for a in serving_args]
    server = subprocess.Popen([sys.executable, "-m", "aekit_cli", "serve", *local_args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from clients import AutoencoderClient

        client = AutoencoderClient(f"127.0.0.1:{grpc_port}", "autoencoder", retries=60, backoff=0.5)
        images = np.random.default_rng(0).random((3, 28, 28, 1)).astype(np.float32)
        assert client.denoise(images).shape == (3, 28, 28, 1)
        assert client.status()[0]["version"] == 1
    finally:
        server.terminate()
        server.wait(30)
    assert shlex.join(["aekit", *args])  # the command a user reads in the manifest
