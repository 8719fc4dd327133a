"""The Kubernetes manifests in deploy/ agree with the worker they run: its settings file loads,
and the autoscaler reads the group, topics, port and metric the worker actually uses."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from surge.config import load_settings
from surge.workers import metrics, worker

DEPLOY = Path(__file__).parent.parent / "deploy" / "kubernetes"
ROOT = Path(__file__).parent.parent


def _documents(name: str) -> dict[str, dict[str, Any]]:
    with (DEPLOY / name).open() as f:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(f)}


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workers, scaling = _documents("worker.yaml"), _documents("keda.yaml")
    config = tmp_path_factory.mktemp("deploy") / "worker.toml"
    config.write_text(workers["ConfigMap"]["data"]["worker.toml"])
    return {
        "deployment": workers["Deployment"],
        "scaled": scaling["ScaledObject"],
        "settings": load_settings(config, env={}),  # validated as `surge worker` validates it
    }


def test_the_pods_run_surge_worker_with_the_mounted_settings(manifests: dict[str, Any]) -> None:
    pod = manifests["deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert 'ENTRYPOINT ["surge"]' in (ROOT / "Dockerfile").read_text()
    args = container["args"]
    assert args[0] == "worker"
    config = args[args.index("--config") + 1]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert Path(config).parent == Path(mounts["config"])
    assert Path(manifests["settings"].worker.model_root) == Path(mounts["models"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == manifests["settings"].metrics.port
    assert container["readinessProbe"]["httpGet"]["port"] == "metrics"


def test_the_image_s_settings_are_in_its_config_file_not_its_environment(tmp_path: Path) -> None:
    """Variables would override a config file mounted in place of the image's."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ENV SURGE_" not in dockerfile
    edits = re.findall(r"-e '([^']+)'", dockerfile)
    image = subprocess.run(
        ["sed", *(f"-e{edit}" for edit in edits), str(ROOT / "config/worker.toml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (tmp_path / "image.toml").write_text(image)
    settings = load_settings(tmp_path / "image.toml", env={})
    assert (settings.worker.model_root, settings.log.format) == ("/models", "json")
    assert 'CMD ["worker", "--config", "/opt/surge/config/image.toml"]' in dockerfile


def test_a_stopping_pod_has_time_to_drain_and_commit(manifests: dict[str, Any]) -> None:
    pod = manifests["deployment"]["spec"]["template"]["spec"]
    needed = manifests["settings"].worker.shutdown_timeout_s + worker.SHUTDOWN_BEYOND_DRAIN_S
    assert pod["terminationGracePeriodSeconds"] >= needed


def test_compose_gives_workers_as_long_to_stop() -> None:
    with (ROOT / "docker-compose.kafka.yml").open() as f:
        compose = yaml.safe_load(f)
    service = compose["services"]["worker"]
    shipped = ROOT / "config" / Path(service["command"][-1]).name  # the image's copy
    settings = load_settings(shipped, env={})
    grace = service["stop_grace_period"]
    needed = settings.worker.shutdown_timeout_s + worker.SHUTDOWN_BEYOND_DRAIN_S
    assert int(grace.removesuffix("s")) >= needed


def test_the_autoscaler_watches_what_the_workers_consume(manifests: dict[str, Any]) -> None:
    scaled, settings = manifests["scaled"], manifests["settings"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == manifests["deployment"]["metadata"]["name"]
    triggers = {t["type"]: t for t in scaled["spec"]["triggers"]}
    kafka = triggers["kafka"]["metadata"]
    assert kafka["bootstrapServers"] == settings.kafka.bootstrap_servers
    assert kafka["consumerGroup"] == settings.worker.group_id
    # A request topic named: without one, a group yet to commit reads every topic's lag.
    assert kafka["topic"].startswith(settings.worker.topic_prefix)
    assert kafka["offsetResetPolicy"] == settings.worker.auto_offset_reset
    int(kafka["lagThreshold"])  # KEDA takes numbers as strings
    query = triggers["prometheus"]["metadata"]["query"]
    (metric,) = re.findall(r"(surge_\w+)_bucket", query)
    assert metric == metrics.RECORD_AGE._name
    # PromQL's string escapes undone: the regular expression Prometheus matches topics with.
    topics = re.search(r'topic=~"([^"]+)"', query)[1].replace("\\\\", "\\")
    assert re.fullmatch(topics, settings.worker.topic_prefix + "any-model")
    assert not re.fullmatch(topics, "other" + settings.worker.topic_prefix + "any-model")
    float(triggers["prometheus"]["metadata"]["threshold"])


def test_readiness_is_probed_where_the_worker_says_it_can_serve(manifests: dict[str, Any]) -> None:
    (container,) = manifests["deployment"]["spec"]["template"]["spec"]["containers"]
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/ready"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[probe["port"]] == manifests["settings"].metrics.port


def test_compose_starts_a_worker_again_when_it_exits_to_start_afresh() -> None:
    with (ROOT / "docker-compose.kafka.yml").open() as f:
        compose = yaml.safe_load(f)
    assert compose["services"]["worker"]["restart"] == "on-failure"
