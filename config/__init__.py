"""Configuration: TOML files in this folder, validated at start-up, one message per bad field."""

from pathlib import Path

from surge.config.loader import ConfigError, convert, load_settings, read_toml
from surge.config.model import ModelConfig, TensorConfig
from surge.config.settings import (
    TOPIC_NAME,
    KafkaSettings,
    LogSettings,
    MetricsSettings,
    RedisSettings,
    Settings,
    WorkerSettings,
    check_bootstrap,
    check_redis_url,
    redis_url_for_bytes,
)

CONFIG_DIR = Path(__file__).parent

__all__ = [
    "CONFIG_DIR",
    "TOPIC_NAME",
    "ConfigError",
    "KafkaSettings",
    "LogSettings",
    "MetricsSettings",
    "ModelConfig",
    "RedisSettings",
    "Settings",
    "TensorConfig",
    "WorkerSettings",
    "check_bootstrap",
    "check_redis_url",
    "convert",
    "load_settings",
    "read_toml",
    "redis_url_for_bytes",
]
