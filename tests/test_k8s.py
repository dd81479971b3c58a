"""Kubernetes manifests, checked offline: render, schema-validate, policy, consistency, and
simulations that run the rendered commands (training pods, the serving pod's init container and
server, the aekit image's entrypoint) as local processes, plus the gRPC load spreading and the
label releases the manifests rely on, against real `aekit serve` processes."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import numpy as np
import pytest
import yaml

import aekit_cli
from serving.main import parse_flags
from tests.model_fixtures import write_tf2
from tests.server_process import running_server
from training.distribute import indexed_job_tf_config
from training.multiworker import free_ports

K8S = Path(__file__).resolve().parents[1] / "k8s"
SERVING_KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/gpu", "overlays/gpu-tfjob"]  # aekit's own serving
KUSTOMIZATIONS = SERVING_KUSTOMIZATIONS + ["overlays/kserve", "overlays/kserve/inferenceservice"]
K8S_VERSION = "1.32.0"
TFJOB_SCHEMA = json.loads((K8S / "schemas" / "tfjob-v1.schema.json").read_text())
ISVC_SCHEMA = json.loads((K8S / "schemas" / "inferenceservice-v1beta1.schema.json").read_text())
# The model container's fields that are KServe's, not core/v1 Container's.
ISVC_MODEL_FIELDS = ("modelFormat", "runtime", "runtimeVersion", "storageUri", "protocolVersion")


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


def pod_templates(docs):
    """(kind, pod template) of every pod the manifests make; KServe's predictor as the pod it becomes."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc["kind"], doc["spec"]["template"]
        elif doc["kind"] == "TFJob":
            for replica in doc["spec"]["tfReplicaSpecs"].values():
                yield "TFJob", replica["template"]
        elif doc["kind"] == "InferenceService":
            yield "InferenceService", {"metadata": {"labels": {"serving.kserve.io/inferenceservice":
                                                               doc["metadata"]["name"]}},
                                       "spec": isvc_pod_spec(doc)}


def pod_specs(docs):
    for kind, template in pod_templates(docs):
        yield kind, template["spec"]


def isvc_pod_spec(doc: dict) -> dict:
    """The predictor's pod: its inlined PodSpec fields plus the model container, whose image is
    the runtime's (tensorflow/serving) at runtimeVersion."""
    predictor = dict(doc["spec"]["predictor"])
    model = predictor.pop("model")
    container = {k: v for k, v in model.items() if k not in ISVC_MODEL_FIELDS}
    container.update(name="kserve-container", image=f"tensorflow/serving:{model['runtimeVersion']}")
    pod = {k: v for k, v in predictor.items() if k not in ("minReplicas", "maxReplicas", "canaryTrafficPercent")}
    return {**pod, "containers": [container]}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_renders_and_validates_strictly(path):
    for doc in RENDERED[path]:
        if doc["kind"] in ("TFJob", "InferenceService"):
            jsonschema.validate(doc, TFJOB_SCHEMA if doc["kind"] == "TFJob" else ISVC_SCHEMA)
            for _, pod in pod_templates([doc]):  # the pod template is core/v1
                template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": pod}
                kubernetes_validate.validate(template, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _security(spec: dict, container: dict, key: str):
    """A container's securityContext setting, else the pod's (as Kubernetes resolves it)."""
    return container.get("securityContext", {}).get(key, spec.get("securityContext", {}).get(key))


def _selected_by_a_network_policy(docs: list[dict], template: dict) -> bool:
    labels = template.get("metadata", {}).get("labels", {})
    return any(doc["kind"] == "NetworkPolicy" and
               doc["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items() for doc in docs)


# The Kubernetes rules of common scanners (checkov's ids), as checks over every rendered pod:
# id -> (what it asks, check(docs, kind, template, container, is_init)).
POLICY = {
    "CKV_K8S_8": ("liveness probe", lambda d, k, t, c, init: init or "livenessProbe" in c),
    "CKV_K8S_9": ("readiness probe", lambda d, k, t, c, init: init or "readinessProbe" in c),
    "CKV_K8S_10": ("CPU request", lambda d, k, t, c, init: "cpu" in c["resources"]["requests"]),
    "CKV_K8S_11": ("CPU limit", lambda d, k, t, c, init: "cpu" in c["resources"]["limits"]),
    "CKV_K8S_12": ("memory request", lambda d, k, t, c, init: "memory" in c["resources"]["requests"]),
    "CKV_K8S_13": ("memory limit", lambda d, k, t, c, init: "memory" in c["resources"]["limits"]),
    "CKV_K8S_14": ("image tag pinned, not latest",
                   lambda d, k, t, c, init: re.fullmatch(r"[\w./-]+(:[\w.-]+|@sha256:[0-9a-f]{64})", c["image"])
                   and not c["image"].endswith(":latest")),
    "CKV_K8S_43": ("image by digest", lambda d, k, t, c, init: "@sha256:" in c["image"]),
    "CKV_K8S_15": ("imagePullPolicy Always", lambda d, k, t, c, init: c.get("imagePullPolicy") == "Always"),
    "CKV_K8S_16": ("not privileged", lambda d, k, t, c, init: not _security(t["spec"], c, "privileged")),
    "CKV_K8S_17": ("no host PID", lambda d, k, t, c, init: not t["spec"].get("hostPID")),
    "CKV_K8S_18": ("no host IPC", lambda d, k, t, c, init: not t["spec"].get("hostIPC")),
    "CKV_K8S_19": ("no host network", lambda d, k, t, c, init: not t["spec"].get("hostNetwork")),
    "CKV_K8S_20": ("no privilege escalation",
                   lambda d, k, t, c, init: c["securityContext"].get("allowPrivilegeEscalation") is False),
    "CKV_K8S_21": ("not the default namespace", lambda d, k, t, c, init: False),
    "CKV_K8S_22": ("read-only root filesystem",
                   lambda d, k, t, c, init: c["securityContext"].get("readOnlyRootFilesystem") is True),
    "CKV_K8S_23": ("runs as non-root", lambda d, k, t, c, init: _security(t["spec"], c, "runAsNonRoot") is True),
    "CKV_K8S_40": ("UID above 10000 (no clash with host users)",
                   lambda d, k, t, c, init: (_security(t["spec"], c, "runAsUser") or 0) >= 10000),
    "CKV_K8S_37": ("all capabilities dropped, none added",
                   lambda d, k, t, c, init: c["securityContext"].get("capabilities") == {"drop": ["ALL"]}),
    "CKV_K8S_26": ("no hostPort", lambda d, k, t, c, init: not any("hostPort" in p for p in c.get("ports", []))),
    "CKV_K8S_27": ("no hostPath volume (docker socket)",
                   lambda d, k, t, c, init: not any("hostPath" in v for v in t["spec"].get("volumes", []))),
    "CKV_K8S_29": ("pod securityContext", lambda d, k, t, c, init: bool(t["spec"].get("securityContext"))),
    "CKV_K8S_30": ("container securityContext", lambda d, k, t, c, init: bool(c.get("securityContext"))),
    "CKV_K8S_31": ("seccomp RuntimeDefault", lambda d, k, t, c, init: (_security(t["spec"], c, "seccompProfile")
                                                                       or {}).get("type") == "RuntimeDefault"),
    "CKV_K8S_35": ("secrets as files, not environment variables",
                   lambda d, k, t, c, init: not any("secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", []))),
    "CKV_K8S_38": ("service account token not mounted",
                   lambda d, k, t, c, init: t["spec"].get("automountServiceAccountToken") is False),
    "CKV_K8S_41": ("not the default service account",
                   lambda d, k, t, c, init: t["spec"].get("serviceAccountName", "default") != "default"),
    "CKV2_K8S_6": ("selected by a NetworkPolicy", lambda d, k, t, c, init: _selected_by_a_network_policy(d, t)),
}
# (rule, pod kind or "*") -> why the rule does not hold there. Every entry must be needed.
POLICY_SKIPS = {
    ("CKV_K8S_43", "*"): "tags are pinned in the repo; a digest differs per build and registry: pin it at release "
                         "with `kustomize edit set image NAME@sha256:...` in your overlay",
    ("CKV_K8S_15", "*"): "pinned tags are immutable here, so IfNotPresent starts the same image without a "
                         "registry round-trip per pod",
    ("CKV_K8S_21", "*"): "the namespace is chosen at apply time (kubectl -n, or namespace: in your overlay)",
    ("CKV_K8S_8", "Job"): "a training worker serves nothing to probe; a dead or cut-off one fails the job "
                          "within 2x --collective-timeout-seconds and the Job restarts it",
    ("CKV_K8S_9", "Job"): "no traffic is routed to training pods",
    ("CKV_K8S_8", "TFJob"): "as for the Job: the operator restarts failed workers",
    ("CKV_K8S_9", "TFJob"): "as for the Job",
    ("CKV_K8S_8", "InferenceService"): "KServe adds the predictor's probes (Knative's queue-proxy)",
    ("CKV_K8S_9", "InferenceService"): "KServe adds the predictor's probes (Knative's queue-proxy)",
    ("CKV2_K8S_6", "InferenceService"): "KServe's ingress (Knative activator, Istio or Kourier gateway) differs "
                                        "per install: write the predictor's policy for your networking layer",
}


def _policy_results(docs):
    for kind, template in pod_templates(docs):
        spec = template["spec"]
        for container, is_init in [(c, False) for c in spec["containers"]] + [(c, True) for c in
                                                                            spec.get("initContainers", [])]:
            for rule, (what, check) in POLICY.items():
                yield rule, kind, f"{kind}/{container['name']}: {what}", bool(check(docs, kind, template,
                                                                                    container, is_init))


def _skip_reason(rule: str, kind: str) -> str | None:
    return POLICY_SKIPS.get((rule, kind)) or POLICY_SKIPS.get((rule, "*"))


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_pod_follows_the_scanners_rules_or_says_why_not(path):
    failed = [what for rule, kind, what, ok in _policy_results(RENDERED[path]) if not ok and not _skip_reason(rule, kind)]
    assert not failed, failed


def test_every_policy_skip_is_still_needed():
    """A skip whose rule now holds everywhere it applies is stale: remove it."""
    failing = {(rule, kind) for docs in RENDERED.values() for rule, kind, _, ok in _policy_results(docs) if not ok}
    for rule, kind in POLICY_SKIPS:
        assert any(r == rule and kind in ("*", k) for r, k in failing), f"skip of {rule} for {kind} is not needed"


@pytest.mark.parametrize("path", SERVING_KUSTOMIZATIONS)
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
    policy = by_kind(docs, "NetworkPolicy", "aekit-serving")
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"aekit-client": "true"}
    by_kind(docs, "ServiceAccount", "aekit")


@pytest.mark.parametrize("path", SERVING_KUSTOMIZATIONS)
def test_serving_starts_after_a_version_exists_and_its_probes_are_sized(path):
    spec = by_kind(RENDERED[path], "Deployment", "aekit-serving")["spec"]["template"]["spec"]
    init, container = spec["initContainers"][0], spec["containers"][0]
    assert init["image"] == container["image"]  # nothing else to pull
    assert init["command"][:2] == ["sh", "/config/wait-for-models.sh"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert all(mounts[m["mountPath"]] == m for m in init["volumeMounts"])  # it sees what the server reads
    # Probes start once the init container is done: the startup budget covers loading and warm-up
    # only; liveness is lenient (a slow reply under load is not a dead server).
    assert container["startupProbe"]["grpc"]["port"] == 8500 and _probe_budget_seconds(container["startupProbe"]) >= 300
    assert container["livenessProbe"]["timeoutSeconds"] >= 5 and _probe_budget_seconds(container["livenessProbe"]) >= 60
    flags = container["args"]
    assert "--allow_version_labels_for_unavailable_models=true" in container["args"]  # labels before the first load
    assert parse_flags(flags).grpc_channel_arguments.startswith("grpc.max_connection_age_ms=")


@pytest.mark.parametrize("path", SERVING_KUSTOMIZATIONS)
def test_grpc_has_a_headless_service_over_the_serving_pods(path):
    docs = RENDERED[path]
    headless = by_kind(docs, "Service", "aekit-serving-grpc")
    deployment = by_kind(docs, "Deployment", "aekit-serving")
    assert headless["spec"]["clusterIP"] == "None" and not headless["spec"].get("publishNotReadyAddresses")
    assert headless["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert [(p["port"], p["targetPort"]) for p in headless["spec"]["ports"]] == [(8500, "grpc")]


def _ingress_rules_for(docs: list[dict], labels: dict) -> list[dict]:
    return [rule for doc in docs if doc["kind"] == "NetworkPolicy"
            and doc["spec"]["podSelector"]["matchLabels"].items() <= labels.items() for rule in doc["spec"]["ingress"]]


@pytest.mark.parametrize("path", SERVING_KUSTOMIZATIONS)
def test_prometheus_may_scrape_what_the_pod_annotations_ask_for(path):
    docs = RENDERED[path]
    template = by_kind(docs, "Deployment", "aekit-serving")["spec"]["template"]
    annotations, container = template["metadata"]["annotations"], template["spec"]["containers"][0]
    port_name = next(p["name"] for p in container["ports"] if str(p["containerPort"]) == annotations["prometheus.io/port"])
    monitoring = by_kind(docs, "ConfigMap")["data"]["monitoring.config"]
    assert f'path: "{annotations["prometheus.io/path"]}"' in monitoring
    scrape = [rule for rule in _ingress_rules_for(docs, template["metadata"]["labels"])
              if any("kubernetes.io/metadata.name" in f.get("namespaceSelector", {}).get("matchLabels", {})
                     for f in rule["from"])]
    assert scrape and {p["port"] for p in scrape[0]["ports"]} == {port_name}
    assert scrape[0]["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


@pytest.mark.parametrize("path", SERVING_KUSTOMIZATIONS + ["overlays/kserve"])
def test_training_pods_admit_only_their_own_jobs_pods_on_the_collective_port(path):
    docs = RENDERED[path]
    job = next(d for d in docs if d["kind"] in ("Job", "TFJob"))
    # The label each controller puts on the pods it creates for this job.
    job_label = "batch.kubernetes.io/job-name" if job["kind"] == "Job" else "training.kubeflow.org/job-name"
    template = next(t for _, t in pod_templates([job]))
    rules = _ingress_rules_for(docs, template["metadata"]["labels"])
    assert rules == [{"from": [{"podSelector": {"matchLabels": {job_label: job["metadata"]["name"]}}}],
                      "ports": [{"port": 2222, "protocol": "TCP"}]}]  # no namespaceSelector: this namespace only
    assert {p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]} == {2222}


def test_models_config_keeps_a_canary_beside_stable_and_a_memory_limit_for_both():
    from clients.release import read_config

    docs = RENDERED["overlays/cpu"]
    text = by_kind(docs, "ConfigMap")["data"]["models.config"]
    config = Path(tempfile.mkdtemp()) / "models.config"
    config.write_text(text)
    (model,) = read_config(config).model_config_list.config
    assert model.model_version_policy.latest.num_versions == 2
    assert dict(model.version_labels) == {"stable": 1, "canary": 1}  # the first version training exports
    container = by_kind(docs, "Deployment", "aekit-serving")["spec"]["template"]["spec"]["containers"][0]
    limit, request = (container["resources"][k]["memory"] for k in ("limits", "requests"))
    assert (limit, request) == ("2Gi", "1Gi")  # k8s/README.md, "Memory": measured, for two versions
    # One ConfigMap name: an edited models.config reaches the running pods' polled file in place.
    assert by_kind(docs, "ConfigMap")["metadata"]["name"] == "aekit-serving-config"


def test_kserve_overlays_train_then_serve_on_the_tensorflow_serving_runtime():
    training = RENDERED["overlays/kserve"]
    assert {d["kind"] for d in training} == {"ServiceAccount", "PersistentVolumeClaim", "Job", "Service",
                                             "NetworkPolicy"}
    (isvc,) = RENDERED["overlays/kserve/inferenceservice"]
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "tensorflow" and model["runtime"] == "kserve-tensorflow-serving"
    claim, path = re.fullmatch(r"pvc://([^/]+)/(.+)", model["storageUri"]).groups()
    trainer = by_kind(training, "Job")["spec"]["template"]["spec"]
    assert (claim, path) == _mount_path_on_volume(trainer, trainer["containers"][0],
                                                  _arg(trainer["containers"][0]["args"], "--model-base-path"))
    assert 0 < predictor["canaryTrafficPercent"] < 100
    serving = by_kind(RENDERED["overlays/cpu"], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert serving["image"] == f"tensorflow/serving:{model['runtimeVersion']}"  # the same server version
    for wrong in ({"canaryTrafficPercent": 150}, {"canaryTraficPercent": 10},
                  {"model": {**model, "storageUri": "/data/models"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**isvc, "spec": {"predictor": {**predictor, **wrong}}}, ISVC_SCHEMA)


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


@pytest.mark.parametrize("path", SERVING_KUSTOMIZATIONS)
def test_serving_reads_what_training_writes(path):
    docs = RENDERED[path]
    serving_spec = by_kind(docs, "Deployment", "aekit-serving")["spec"]["template"]["spec"]
    serving = serving_spec["containers"][0]
    flags = parse_flags(serving["args"])  # the same flags `aekit serve` takes
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
    entrypoint = re.search(r'^ENTRYPOINT \["(\S+)"\]$', text, re.M).group(1)
    assert re.search(rf"^COPY k8s/docker/entrypoint.sh {re.escape(entrypoint)}$", text, re.M)
    assert re.search(r"^\s+MODEL_BASE_PATH=/models \\$", text, re.M)  # as the official serving image
    tags = {c["image"] for docs in RENDERED.values() for _, spec in pod_specs(docs) for c in spec["containers"]
            if c["image"].startswith("ghcr.io/aekit/aekit")}
    assert tags == {"ghcr.io/aekit/aekit:0.1.0", "ghcr.io/aekit/aekit:0.1.0-gpu"}
    for name in ("pyproject.toml", "aekit_cli.py", "training", "serving", "clients"):
        assert name in text and (K8S.parent / name).exists()


def _entrypoint_env(tmp_path: Path, **env) -> dict:
    """The image's environment: `aekit` on PATH (this checkout's), HOME on a writable folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    aekit = bin_dir / "aekit"
    aekit.write_text(f"#!/bin/sh\nexec {sys.executable} -m aekit_cli \"$@\"\n")
    aekit.chmod(aekit.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": str(K8S.parent), **env}


def test_image_entrypoint_runs_subcommands_as_given(tmp_path):
    job_args = by_kind(RENDERED["overlays/cpu"], "Job")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert job_args[0] == "train"  # what the training Job hands the entrypoint
    result = subprocess.run(["sh", str(K8S / "docker" / "entrypoint.sh"), "train", "--help"], capture_output=True,
                            text=True, env=_entrypoint_env(tmp_path), timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: aekit train"), result.stderr[-2000:]


@pytest.mark.slow
def test_image_entrypoint_serves_model_name_from_model_base_path_like_the_official_image(tmp_path):
    """TF Serving's Kubernetes guide runs the image with no args and MODEL_NAME set; so does this."""
    write_tf2(tmp_path / "models" / "half" / "1")
    grpc_port, rest_port = free_ports(2)
    env = _entrypoint_env(tmp_path, MODEL_NAME="half", MODEL_BASE_PATH=str(tmp_path / "models"),
                          GRPC_PORT=str(grpc_port), PORT=str(rest_port))
    server = subprocess.Popen(["sh", str(K8S / "docker" / "entrypoint.sh"), "--file_system_poll_wait_seconds=1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from clients import AutoencoderClient

        with AutoencoderClient(f"127.0.0.1:{grpc_port}", "half", retries=60, backoff=0.5) as client:
            assert client.wait_until_available() == 1
            assert client.predict("serving_default", np.zeros((1, 1), np.float32))["y"].tolist() == [[2.0]]
        with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/v1/models/half", timeout=10) as r:
            assert json.load(r)["model_version_status"][0]["state"] == "AVAILABLE"
    finally:
        server.terminate()
        server.wait(30)


def _local_volume_config(docs: list[dict], config_dir: Path, volume: Path) -> None:
    """The serving ConfigMap's files as the pod mounts them at /config, on a local volume."""
    config_dir.mkdir()
    for file_name, text in by_kind(docs, "ConfigMap")["data"].items():
        (config_dir / file_name).write_text(text.replace('"/models/', f'"{volume}/models/'))


def _init_container_command(docs: list[dict], config_dir: Path, poll_seconds: str = "0.2") -> list[str]:
    spec = by_kind(docs, "Deployment", "aekit-serving")["spec"]["template"]["spec"]
    command = [a.replace("/config/", f"{config_dir}/") for a in spec["initContainers"][0]["command"]]
    return command[:-1] + [poll_seconds]  # the manifest polls every 10 s


def test_init_container_waits_for_a_complete_version(tmp_path):
    docs = RENDERED["overlays/cpu"]
    _local_volume_config(docs, tmp_path / "config", tmp_path)
    base = tmp_path / "models" / "autoencoder"
    base.mkdir(parents=True)
    init = subprocess.Popen(_init_container_command(docs, tmp_path / "config"), stdout=subprocess.PIPE, text=True)
    try:
        staged = base / ".1.tmp"  # how export stages a version before renaming it into place
        staged.mkdir()
        (staged / "saved_model.pb").write_bytes(b"")
        (base / "2" / "variables").mkdir(parents=True)  # a numeric folder without its graph yet
        with pytest.raises(subprocess.TimeoutExpired):
            init.wait(1.5)
        staged.rename(base / "1")
        assert init.wait(10) == 0
        assert f"found a version under {base}" in init.stdout.read()
    finally:
        init.kill()
        init.wait()
    models_config = tmp_path / "config" / "models.config"  # an object store it cannot look into
    models_config.write_text(models_config.read_text().replace(f'"{tmp_path}/models/', '"gs://bucket/'))
    result = subprocess.run(_init_container_command(docs, tmp_path / "config"), capture_output=True, text=True,
                            timeout=10)
    assert result.returncode == 0 and "cannot look into gs://bucket/autoencoder" in result.stdout


STANDIN = """#!{python}
# Stand-in for the official image's tensorflow_model_server, run with the manifest's command and
# args: like it, it opens no port until every model in --model_config_file has a version
# (server.cc BuildAndStart: ServerCore::Create awaits the initial loads before AddListeningPort),
# then serves with aekit's embedded server.
import os, pathlib, re, sys, time
flags = sys.argv[1:]
config = next(f.split("=", 1)[1] for f in flags if f.startswith("--model_config_file="))
bases = [pathlib.Path(b) for b in re.findall(r'base_path: "([^"]+)"', pathlib.Path(config).read_text())]
while not all(any(v.name.isdigit() and (v / "saved_model.pb").exists() for v in b.glob("*")) for b in bases):
    time.sleep(0.2)
os.execv(sys.executable, [sys.executable, "-m", "aekit_cli", "serve", "--engine=embedded", *flags])
"""


def _install_standin(bin_dir: Path) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / "tensorflow_model_server"
    path.write_text(STANDIN.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def grpc_probe(port: int) -> str:
    """What the kubelet's grpc probe sees: the health service's status for "", or the error."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _serving_pod_process(docs: list[dict], config_dir: Path, bin_dir: Path, log: Path):
    """The serving container as the kubelet starts it: the manifest's command and args, on local
    ports and the local /config; `tensorflow_model_server` on PATH is the stand-in."""
    container = by_kind(docs, "Deployment", "aekit-serving")["spec"]["template"]["spec"]["containers"][0]
    grpc_port, rest_port = free_ports(2)
    args = [a.replace("/config/", f"{config_dir}/").replace("--port=8500", f"--port={grpc_port}")
            .replace("--rest_api_port=8501", f"--rest_api_port={rest_port}") for a in container["args"]]
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(K8S.parent), "TF_CPP_MIN_LOG_LEVEL": "2",
           "HOME": str(config_dir.parent)}
    proc = subprocess.Popen([*container["command"], *args], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return proc, grpc_port


def _probe_budget_seconds(probe: dict) -> int:
    return probe["periodSeconds"] * probe["failureThreshold"]


@pytest.mark.slow
def test_simulation_first_apply_trains_waits_then_serves(tmp_path):
    """A first apply as local processes: the serving pod starts with the training. Its init
    container (the manifest's command) waits while the rendered Indexed Job's pods train (hosts
    mapped to 127.0.0.1 ports, the volume to a folder, --smoke to finish in seconds); a server
    started as the old manifests did keeps its port closed all that time (its startup probe
    would fail and restart it). Then the serving container runs with the manifest's command,
    `tensorflow_model_server` being a stand-in that behaves like the official image's, passes the
    probes within their budget and answers by label."""
    docs = RENDERED["overlays/cpu"]
    data_dir, config_dir, bin_dir = tmp_path / "volume", tmp_path / "config", tmp_path / "bin"
    (data_dir / "models" / "autoencoder").mkdir(parents=True)  # the claim's folder, empty
    _local_volume_config(docs, config_dir, data_dir)
    _install_standin(bin_dir)
    init = subprocess.Popen(_init_container_command(docs, config_dir), stdout=subprocess.DEVNULL)
    without_init, early_port = _serving_pod_process(docs, config_dir, bin_dir, tmp_path / "early.log")
    trainers = _start_training_pods(docs, data_dir, tmp_path)
    try:
        probes_while_training = []
        versions = data_dir / "models" / "autoencoder"
        while any(p.poll() is None for p in trainers):
            if not any(v.name.isdigit() for v in versions.iterdir()):
                probes_while_training.append(grpc_probe(early_port))
            time.sleep(1)
        outputs = [p.communicate(timeout=300)[0] for p in trainers]
        assert all(p.returncode == 0 for p in trainers), "\n".join(o[-2000:] for o in outputs)
        assert [v.name for v in versions.iterdir()] == ["1"]  # the chief exported once
        assert probes_while_training and set(probes_while_training) == {"UNAVAILABLE"}  # no port while training
        assert init.wait(10) == 0
        without_init.kill()

        spec = by_kind(docs, "Deployment", "aekit-serving")["spec"]["template"]["spec"]
        server, grpc_port = _serving_pod_process(docs, config_dir, bin_dir, tmp_path / "serving.log")
        container = spec["containers"][0]
        deadline = time.monotonic() + _probe_budget_seconds(container["startupProbe"])
        while grpc_probe(grpc_port) != "SERVING":
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serving.log").read_text()[-3000:]
            time.sleep(0.5)
        from clients import AutoencoderClient

        with AutoencoderClient(f"127.0.0.1:{grpc_port}", "autoencoder", label="stable") as client:
            images = np.random.default_rng(0).random((3, 28, 28, 1)).astype(np.float32)
            assert client.denoise(images).shape == (3, 28, 28, 1)
            assert client.status()[0]["version"] == 1
        server.terminate()
        assert server.wait(30) == 0
    finally:
        for proc in [init, without_init, *trainers]:
            proc.kill()
            proc.wait()


def _start_training_pods(docs: list[dict], data_dir: Path, tmp_path: Path) -> list[subprocess.Popen]:
    """The rendered Indexed Job's pods as local processes: each computes TF_CONFIG from
    JOB_COMPLETION_INDEX, its hosts mapped to loopback ports."""
    job = by_kind(docs, "Job", "aekit-train")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    count = job["spec"]["completions"]
    pattern, port = _arg(args, "--worker-host-pattern"), int(_arg(args, "--worker-port"))
    real = indexed_job_tf_config(0, count, pattern, port)["cluster"]["worker"]
    local = {host: f"127.0.0.1:{p}" for host, p in zip(real, free_ports(count))}
    pod_args = [a.replace("/data", str(data_dir)) for a in args
                if not a.startswith(("--indexed-job", "--num-workers", "--worker-host-pattern", "--worker-port"))]
    assert shlex.join(["aekit", *args])  # the command a user reads in the manifest
    procs = []
    for index in range(count):
        tf_config = indexed_job_tf_config(index, count, pattern, port)
        tf_config["cluster"]["worker"] = [local[h] for h in tf_config["cluster"]["worker"]]
        env = {"TF_CONFIG": json.dumps(tf_config), "JOB_COMPLETION_INDEX": str(index), "TF_CPP_MIN_LOG_LEVEL": "2",
               "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(K8S.parent)}
        procs.append(subprocess.Popen([sys.executable, "-m", "aekit_cli", *pod_args, "--smoke"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _served_predicts(server) -> float:
    """Predict calls a server counted (its Prometheus metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{server.rest_url}/monitoring/prometheus/metrics", timeout=10) as r:
        families = text_string_to_metric_families(r.read().decode())
        # TF Serving's request_latency histogram counts each Predict under API="Predict".
        return sum(sample.value for family in families for sample in family.samples
                   if sample.name == ":tensorflow:serving:request_latency_count"
                   and sample.labels.get("API") == "Predict")


def _half_plus_two_servers(tmp_path: Path, count: int):
    """`count` real `aekit serve` processes on one model folder (TF Serving's half_plus_two)."""
    write_tf2(tmp_path / "models" / "half" / "1")
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }\n')
    flags = ["--model_name=half", f"--model_base_path={tmp_path / 'models' / 'half'}",
             f"--monitoring_config_file={monitoring}"]
    return [running_server(flags, tmp_path / f"server{i}.log", models=["half"]) for i in range(count)]


@pytest.mark.slow
def test_round_robin_spreads_one_clients_calls_over_both_servers(tmp_path, capsys):
    """Two servers behind one target (as a headless Service's name resolves to every pod): gRPC's
    default pick_first sends every call to one of them, round_robin to both."""
    from clients import AutoencoderClient
    from clients.loadtest import LoadConfig, run

    first, second = _half_plus_two_servers(tmp_path, 2)
    with first as a, second as b:
        target = f"ipv4:127.0.0.1:{a.grpc_port},127.0.0.1:{b.grpc_port}"
        served = {}
        for policy in ("pick_first", "round_robin"):
            before = [_served_predicts(a), _served_predicts(b)]
            with AutoencoderClient(target, "half", load_balancing=policy) as client:
                client.wait_until_available()
                for _ in range(20):
                    client.predict("serving_default", np.zeros((1, 1), np.float32))
            served[policy] = [_served_predicts(a) - before[0], _served_predicts(b) - before[1]]
        assert sorted(served["pick_first"]) == [0, 20]
        assert sum(served["round_robin"]) == 20 and min(served["round_robin"]) >= 5, served
        before = [_served_predicts(a), _served_predicts(b)]
        report = run(LoadConfig(server=target, model="half", signature="serving_default", requests=40,
                                concurrency=4, load_balancing="round_robin"))
        after = [_served_predicts(a) - before[0], _served_predicts(b) - before[1]]
        assert report["errors"] == 0 and sum(after) == 40 and min(after) >= 10, after
        # A dns:/// name, as for the headless Service (localhost resolves to 127.0.0.1 here).
        assert aekit_cli.main(["client", "status", "--model", "half", "--server", f"dns:///localhost:{a.grpc_port}",
                               "--load-balancing", "round_robin"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["state"] == "AVAILABLE"


def test_load_balancing_is_refused_for_rest_in_one_line():
    import argparse

    from clients.cli import add_client_parser, make_client
    from clients.errors import ClientError
    from clients.loadtest import LoadConfig

    parser = argparse.ArgumentParser()
    add_client_parser(parser.add_subparsers())
    args = parser.parse_args(["client", "status", "--rest", "--server", "localhost:8501",
                              "--load-balancing", "round_robin"])
    with pytest.raises(ClientError, match="--load-balancing is for gRPC"):
        make_client(args)
    for bad in (LoadConfig(server="x:1", rest=True, load_balancing="round_robin"),
                LoadConfig(server="x:1", load_balancing="least_request")):
        with pytest.raises(ClientError, match="--load-balancing"):
            bad.validate()


class _ContinuousCaller(threading.Thread):
    """Calls the model by each label, back to back, until stopped; keeps every failure."""

    def __init__(self, address: str, labels: tuple[str, ...]):
        super().__init__(daemon=True)
        self.address, self.labels = address, labels
        self.calls, self.failures = 0, []
        self.stopped = threading.Event()

    def run(self):
        from clients import AutoencoderClient
        from clients.errors import ClientError

        with AutoencoderClient(self.address, "half", retries=0) as client:
            while not self.stopped.is_set():
                for label in self.labels:
                    try:
                        client.predict("serving_default", np.zeros((1, 1), np.float32), label=label)
                        self.calls += 1
                    except ClientError as e:
                        self.failures.append(f"{label}: {e}")


@pytest.mark.slow
def test_release_moves_labels_promotes_and_rolls_back_without_a_failed_request(tmp_path, capsys):
    """The rendered models.config (two versions kept, stable and canary labels) on a real server
    that polls it; `aekit release` moves canary, promotes, rolls back, refuses a version that is
    not AVAILABLE, while a client calls by label all along."""
    from clients import AutoencoderClient
    from clients.errors import ClientError
    from clients.release import read_config, release

    base = tmp_path / "models" / "half"
    write_tf2(base / "1", b=2.0)  # y = 0.5 x + 2: version 1 answers 2 at x = 0
    write_tf2(base / "2", b=3.0)  # version 2 answers 3
    rendered = by_kind(RENDERED["overlays/cpu"], "ConfigMap")["data"]["models.config"]
    config = tmp_path / "models.config"
    config.write_text(rendered.replace('"autoencoder"', '"half"').replace('"/models/autoencoder"', f'"{base}"'))
    flags = [f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=1",
             "--file_system_poll_wait_seconds=1"]
    with running_server(flags, tmp_path / "server.log", models=["half"]) as server:
        with AutoencoderClient(server.grpc_address, "half") as client:
            def answer(label):
                return client.predict("serving_default", np.zeros((1, 1), np.float32), label=label)["y"].item()

            deadline = time.monotonic() + 60
            while len([s for s in client.status() if s["state"] == "AVAILABLE"]) < 2:  # latest{2}: both
                assert time.monotonic() < deadline, server.log_text()[-3000:]
                time.sleep(0.2)
            caller = _ContinuousCaller(server.grpc_address, ("stable", "canary"))
            caller.start()

            def move(label, version):
                release(str(config), "half", label, version, [server.grpc_address])
                time.sleep(0.3)  # calls by the moved label keep flowing

            assert (answer("stable"), answer("canary")) == (2.0, 2.0)
            move("canary", 2)
            assert (answer("stable"), answer("canary")) == (2.0, 3.0)
            move("stable", 2)  # promote
            assert (answer("stable"), answer("canary")) == (3.0, 3.0)
            move("stable", 1)  # roll back
            assert answer("stable") == 2.0
            time.sleep(2.5)  # the server re-read the rewritten file: the labels stay where they moved
            assert (answer("stable"), answer("canary")) == (2.0, 3.0)
            labels = read_config(config).model_config_list.config[0].version_labels
            assert dict(labels) == {"stable": 1, "canary": 2} and config.read_text().startswith("#")

            before = config.read_text()
            with pytest.raises(ClientError, match="version 3 of half is not found on .*not AVAILABLE"):
                release(str(config), "half", "canary", 3, [server.grpc_address])
            assert config.read_text() == before and answer("canary") == 3.0
            assert aekit_cli.main(["release", "--config", str(config), "--model", "half", "--label", "canary",
                                   "--version", "3", "--server", server.grpc_address]) == 1
            assert capsys.readouterr().err.startswith("aekit: error: version 3 of half is not found")
            caller.stopped.set()
            caller.join(30)
    assert caller.calls > 20 and caller.failures == [], caller.failures[:5]


def _serve_in(cwd: Path, config: Path) -> tuple[subprocess.Popen, str]:
    """`aekit serve` started in `cwd`, where the config's relative base_path resolves."""
    port = free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-m", "aekit_cli", "serve", f"--port={port}",
                             f"--model_config_file={config}", "--file_system_poll_wait_seconds=1"], cwd=cwd,
                            env=dict(os.environ, PYTHONPATH=str(K8S.parent), TF_CPP_MIN_LOG_LEVEL="2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"127.0.0.1:{port}"


@pytest.mark.slow
def test_release_refused_by_one_server_is_undone_on_the_others(tmp_path):
    """Server B never got version 1, which the stable label names: it refuses the new config, so
    the canary label moved on A moves back and the file stays as it was."""
    from clients import AutoencoderClient
    from clients.errors import ClientError
    from clients.release import release

    for host, versions in (("a", (1, 2)), ("b", (2,))):
        for version in versions:
            write_tf2(tmp_path / host / "models" / "half" / str(version), b=1.0 + version)
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "half" base_path: "models/half" model_platform: '
                      '"tensorflow" model_version_policy { latest { num_versions: 2 } } '
                      'version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 1 } } }\n')
    (a, a_address), (b, b_address) = _serve_in(tmp_path / "a", config), _serve_in(tmp_path / "b", config)
    try:
        with AutoencoderClient(a_address, "half", retries=60, backoff=0.5) as on_a, \
                AutoencoderClient(b_address, "half", retries=60, backoff=0.5) as on_b:
            on_b.wait_until_available(version=2)
            on_a.wait_until_available(version=1)
            on_a.wait_until_available(version=2)
            before = config.read_text()
            with pytest.raises(ClientError, match=f"{b_address} refused .* undone on 1 other server"):
                release(str(config), "half", "canary", 2, [a_address, b_address])
            assert on_a.predict("serving_default", np.zeros((1, 1), np.float32), label="canary")["y"].item() == 2.0
            assert config.read_text() == before
    finally:
        for proc in (a, b):
            proc.terminate()
            proc.wait(30)
