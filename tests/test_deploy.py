"""deploy/: compose against the Compose Specification's schema, Kubernetes manifests against the Kubernetes
schemas (offline), systemd units with systemd-analyze, the Dockerfile parsed; and all of them against the
settings they carry (grace periods, ports, probes, secrets as files)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from worker.settings import Settings, load_settings

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"
SECRET_FIELDS = {
    name for name, field in Settings.model_fields.items() if "SecretStr" in str(field.annotation)
}


def env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of an environment file (comments and blank lines skipped)."""
    pairs = (
        line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")
    )
    return {key: value for key, value in pairs}


def settings_of(environ: dict[str, str]) -> Settings:
    """The settings a deployment's environment gives; they must be valid and hold no secret."""
    assert not {f"VBS_{name.upper()}" for name in SECRET_FIELDS} & set(environ)
    return load_settings(environ)


def seconds(text: str) -> float:
    """``90s`` / ``1m30s`` / ``90`` in seconds."""
    total, number = 0.0, ""
    for char in str(text):
        if char.isdigit() or char == ".":
            number += char
        else:
            total += float(number) * {"s": 1, "m": 60, "h": 3600}[char]
            number = ""
    return total + (float(number) if number else 0.0)


# Dockerfile


def test_dockerfile_runs_vbs_deleter_as_a_non_root_user() -> None:
    parser = DockerfileParser(str(ROOT / "Dockerfile"))
    final = [
        item
        for item in parser.structure
        if item["startline"]
        > max(item["startline"] for item in parser.structure if item["instruction"] == "FROM")
    ]
    users = [item["value"] for item in final if item["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entrypoint = [item["value"] for item in final if item["instruction"] == "ENTRYPOINT"]
    assert [yaml.safe_load(value) for value in entrypoint] == [["vbs-deleter"]]
    assert [yaml.safe_load(item["value"]) for item in final if item["instruction"] == "CMD"] == [["worker"]]
    assert parser.baseimage.startswith("python:3.11")
    for item in parser.structure:
        if item["instruction"] == "COPY" and "--from" not in item["value"]:
            *sources, _ = item["value"].split()
            assert all((ROOT / source).exists() for source in sources), item["value"]


# Compose


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose/compose.yaml").read_text()))


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    checker = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    done = check_compose_schema(DEPLOY / "compose/compose.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(
        (DEPLOY / "compose/compose.yaml").read_text().replace("stop_grace_period:", "stop_grace:")
    )
    done = check_compose_schema(broken)
    assert done.returncode == 1 and "'stop_grace' was unexpected" in done.stdout


def test_compose_stack() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == {"redis", "worker", "beat", "simulator", "prometheus", "grafana"}
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "redis-data:/data" in services["redis"]["volumes"]
    assert (services["worker"]["command"], services["worker"]["deploy"]["replicas"]) == (["worker"], 2)
    assert (services["beat"]["command"], services["beat"]["deploy"]["replicas"]) == (["beat"], 1)
    assert [name for name, service in services.items() if "profiles" in service] == ["simulator"]
    assert "/healthz" in " ".join(services["worker"]["healthcheck"]["test"])
    environ = env_file(DEPLOY / "compose/vbs-deleter.env")
    settings = settings_of(environ | {"VBS_CONFIG": str(DEPLOY / "compose/credentials.example.toml")})
    assert settings.endpoint == "http://simulator:8780" and settings.redis_url == "redis://redis:6379/0"
    for name in ("worker", "beat"):
        service = services[name]
        assert seconds(service["stop_grace_period"]) > settings.stop_timeout()
        assert service["environment"] == {"VBS_CONFIG": "/run/secrets/vbs-credentials"}
        assert service["secrets"] == ["vbs-credentials"]
    assert spec["secrets"]["vbs-credentials"]["file"] == "${VBS_CREDENTIALS_FILE:-./credentials.example.toml}"


def bind_sources(prefix: str) -> list[Path]:
    """Bind-mounted host paths of the compose file starting with ``prefix`` (relative to deploy/compose)."""
    found = [
        DEPLOY / "compose" / volume.split(":")[0]
        for service in compose()["services"].values()
        for volume in service.get("volumes", [])
        if volume.startswith(prefix)
    ]
    assert found
    return found


def test_compose_mounts_exist() -> None:
    assert [path for path in bind_sources("./") if not path.exists()] == []


@pytest.mark.skipif(
    not (DEPLOY / "prometheus").exists(), reason="deploy/prometheus and deploy/grafana: observability branch"
)
def test_compose_mounts_the_alert_rules_and_dashboards() -> None:
    assert [path for path in bind_sources("../") if not path.exists()] == []


def test_compose_prometheus_config() -> None:
    services = compose()["services"]
    prometheus = yaml.safe_load((DEPLOY / "compose/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["vbs-deleter"]["dns_sd_configs"] == [{"names": ["worker"], "type": "A", "port": 9808}]
    assert jobs["vbs-deleter-beat"]["static_configs"] == [{"targets": ["beat:9809"]}]
    assert prometheus["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    assert "../prometheus/rules:/etc/prometheus/rules:ro" in services["prometheus"]["volumes"]


# Kubernetes


def manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    listed = sorted(kustomization["resources"])
    assert listed == sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
    return [doc for name in listed for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text())]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in manifests() if doc["kind"] == kind}


def test_manifests_follow_the_kubernetes_schemas() -> None:
    checked = []
    for doc in manifests():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # Prometheus Operator CRDs: checked against the workloads below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked.append(doc["kind"])
    built_in = ["ConfigMap", "ConfigMap", "Deployment", "Deployment", "PodDisruptionBudget", "Secret"]
    assert sorted(checked) == [*built_in, "Service"]
    broken = by_kind("Deployment")["vbs-deleter-worker"]
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 90
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def test_worker_deployment_fits_the_settings() -> None:
    worker = by_kind("Deployment")["vbs-deleter-worker"]
    pod, main = worker["spec"]["template"]["spec"], container(worker)
    settings = settings_of(by_kind("ConfigMap")["vbs-deleter-settings"]["data"])
    assert pod["terminationGracePeriodSeconds"] > settings.stop_timeout()
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert main["args"] == ["worker"] and main["resources"]["requests"].keys() == {"cpu", "memory"}
    assert main["ports"] == [{"name": "metrics", "containerPort": settings.metrics_port}]
    assert settings.metrics_port == Settings().metrics_port == 9808
    probes = {kind: main[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes == {
        "livenessProbe": {"path": "/metrics", "port": "metrics"},
        "readinessProbe": {"path": "/readyz", "port": "metrics"},
    }


def test_secrets_are_files_named_by_vbs_config() -> None:
    secret = by_kind("Secret")["vbs-deleter-credentials"]
    (file_name,) = secret["stringData"]
    for name in ("vbs-deleter-worker", "vbs-deleter-beat"):
        deployment = by_kind("Deployment")[name]
        main, volumes = container(deployment), deployment["spec"]["template"]["spec"]["volumes"]
        assert all("valueFrom" not in item for item in main.get("env", []))  # no secret in the environment
        (mount,) = [m for m in main["volumeMounts"] if m["name"] == "credentials"]
        assert {
            "name": "credentials",
            "secret": {"secretName": "vbs-deleter-credentials", "defaultMode": 0o440},
        } in volumes
        config = {item["name"]: item["value"] for item in main["env"]}["VBS_CONFIG"]
        assert config == f"{mount['mountPath']}/{file_name}" and mount["readOnly"] is True


def test_beat_is_a_single_replica_and_monitors_select_the_pods() -> None:
    beat = by_kind("Deployment")["vbs-deleter-beat"]
    assert (beat["spec"]["replicas"], beat["spec"]["strategy"]["type"]) == (1, "Recreate")
    assert container(beat)["args"] == ["beat"]
    assert container(beat)["ports"] == [{"name": "metrics", "containerPort": Settings().beat_metrics_port}]
    worker_labels = by_kind("Deployment")["vbs-deleter-worker"]["spec"]["template"]["metadata"]["labels"]
    service = by_kind("Service")["vbs-deleter"]  # its name is the Prometheus job the alert rules select
    assert service["spec"]["selector"] == worker_labels
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9808, "targetPort": "metrics"}]
    monitor = by_kind("ServiceMonitor")["vbs-deleter"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["metrics"]
    pod_monitor = by_kind("PodMonitor")["vbs-deleter-beat"]
    beat_labels = beat["spec"]["template"]["metadata"]["labels"]
    assert pod_monitor["spec"]["selector"]["matchLabels"] == beat_labels
    assert [endpoint["port"] for endpoint in pod_monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


# systemd


def unit(name: str) -> dict[str, list[str]]:
    """``Key`` -> values of a unit file (systemd allows a key more than once)."""
    found: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (.ci/run installs it)"
)
def test_systemd_units_verify(tmp_path: Path) -> None:
    binary = Path(sys.executable).parent / "vbs-deleter"
    copies = []
    units = {"vbs-deleter-worker@.service": "vbs-deleter-worker@9808.service"}
    for name, instance in {**units, "vbs-deleter-beat.service": "vbs-deleter-beat.service"}.items():
        text = (
            (DEPLOY / "systemd" / name).read_text().replace("/opt/vbs-deleter/bin/vbs-deleter", str(binary))
        )
        (tmp_path / instance).write_text(text)
        copies.append(str(tmp_path / instance))
    done = subprocess.run(["systemd-analyze", "verify", *copies], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.strip()) == (0, ""), done.stdout


def test_systemd_units_fit_the_settings() -> None:
    settings = settings_of(env_file(DEPLOY / "systemd/vbs-deleter.env") | {"VBS_METRICS_PORT": "9808"})
    worker, beat = unit("vbs-deleter-worker@.service"), unit("vbs-deleter-beat.service")
    assert worker["ExecStart"] == ["/opt/vbs-deleter/bin/vbs-deleter worker --hostname worker-%i@%H"]
    assert beat["ExecStart"] == ["/opt/vbs-deleter/bin/vbs-deleter beat"]
    assert "VBS_METRICS_PORT=%i" in worker["Environment"]
    for found in (worker, beat):
        assert (found["Restart"], found["User"], found["KillSignal"]) == (
            ["always"],  # also after a clean exit: Celery exits 0 on an unrecoverable error
            ["vbs-deleter"],
            ["SIGTERM"],
        )
        assert found["EnvironmentFile"] == ["/etc/vbs-deleter/vbs-deleter.env"]
        assert found["LoadCredential"] == ["credentials.toml:/etc/vbs-deleter/credentials.toml"]
        assert "VBS_CONFIG=%d/credentials.toml" in found["Environment"]
    assert seconds(worker["TimeoutStopSec"][0]) > settings.stop_timeout()


@pytest.mark.skipif(
    not (DEPLOY / "prometheus/rules").exists(), reason="deploy/prometheus/rules: observability branch"
)
def test_runbook_has_a_section_per_alert() -> None:
    rules = [yaml.safe_load(path.read_text()) for path in sorted((DEPLOY / "prometheus/rules").glob("*.yml"))]
    alerts = {
        rule["alert"]
        for doc in rules
        for group in doc["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    sections = {
        line[4:].strip()
        for line in (ROOT / "docs/runbook.md").read_text().splitlines()
        if line.startswith("### ")
    }
    assert alerts and alerts == sections
