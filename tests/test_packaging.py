"""The deployment files agree with the configuration, and the package installs as `surge`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from surge.config import CONFIG_DIR, load_settings, read_toml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return msgspec.yaml.decode((ROOT / "docker-compose.kafka.yml").read_bytes())


def test_compose_runs_kafka_in_kraft_mode(compose: dict) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "ZOOKEEPER" not in json.dumps(env).upper()


def test_compose_worker_settings_validate_and_reach_the_services(compose: dict) -> None:
    services = compose["services"]
    worker = services["worker"]
    config_path = worker["command"][worker["command"].index("--config") + 1]
    config_file = CONFIG_DIR / Path(config_path).name
    assert config_file.is_file(), f"{config_path} is not shipped in config/"
    settings = load_settings(config_file, env=worker["environment"])

    host, _, port = settings.kafka.bootstrap_servers.partition(":")
    listeners = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert f"{host}:{port}" in listeners
    assert settings.redis.url.startswith("redis://redis:")
    assert set(worker["depends_on"]) == {"kafka", "redis"}
    assert any(v.endswith(f":{settings.worker.model_root}:ro") for v in worker["volumes"])


def test_broker_message_limit_matches_the_client(compose: dict) -> None:
    """A mismatch makes oversized requests fail late and silently."""
    broker_limit = int(compose["services"]["kafka"]["environment"]["KAFKA_MESSAGE_MAX_BYTES"])
    client = read_toml(CONFIG_DIR / "worker.toml")["kafka"]["max_request_size"]
    assert broker_limit == client


def test_dockerfile_copies_every_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = read_toml(ROOT / "pyproject.toml")
    folders = {p.split("/")[0] for p in pyproject["tool"]["setuptools"]["package-dir"].values()}
    for folder in folders:
        assert f"COPY {folder} {folder}" in dockerfile


def test_import_names_live_under_surge() -> None:
    script = (
        "import surge, surge.schemas, surge.workers, surge.producers, surge.config; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "ok", out.stderr
    for generic in ("schemas", "workers", "producers"):
        found = subprocess.run(
            [sys.executable, "-c", f"import {generic}"], capture_output=True, cwd="/"
        )
        assert found.returncode != 0, f"a top-level `{generic}` package leaked into site-packages"


def test_schema_command_prints_json_schema() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "surge", "schema"], capture_output=True, text=True, check=True
    )
    schema = json.loads(out.stdout)
    assert "InferenceRequest" in schema["$defs"]
