"""Settings validate at start-up and report every bad field."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from surge.config import (
    CONFIG_DIR,
    ConfigError,
    ModelConfig,
    Settings,
    WorkerSettings,
    convert,
    load_settings,
    redis_url_for_bytes,
)
from tests.services import make_certificates


def test_shipped_configs_validate() -> None:
    files = sorted(CONFIG_DIR.glob("*.toml"))
    assert files
    for path in files:
        load_settings(path, env={})


def test_every_bad_field_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[worker]\nmax_in_flight = "lots"\nbogus = 1\nauto_offset_reset = "middle"\n'
        '[kafka]\nsecurity_protocol = "SSX"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    problems = "\n".join(caught.value.problems)
    assert "worker.max_in_flight" in problems
    assert "worker.bogus: unknown field" in problems
    assert "worker.auto_offset_reset" in problems
    assert "kafka.security_protocol" in problems
    assert str(path) in str(caught.value)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text('[kafka]\nbootstrap_servers = "a:1"\n[worker]\nmax_in_flight = 10\n')
    settings = load_settings(
        path,
        env={
            "SURGE_KAFKA__BOOTSTRAP_SERVERS": "b:2",
            "SURGE_WORKER__MODELS": '["mlp"]',
            "SURGE_WORKER__CREATE_TOPICS": "false",
        },
    )
    assert settings.kafka.bootstrap_servers == "b:2"
    assert settings.worker.max_in_flight == 10
    assert settings.worker.models == ["mlp"]
    assert settings.worker.create_topics is False


def test_settings_left_blank_are_unset() -> None:
    """A deployment's optional secret templated empty: no SASL or TLS setting in use."""
    settings = load_settings(
        env={"SURGE_KAFKA__SASL_PASSWORD": "", "SURGE_REDIS__SSL_CA_CERTS": ""}
    )
    assert "sasl_mechanism" not in settings.kafka.client_options()


def test_lists_and_tables_from_the_environment_are_json_and_nothing_else_is() -> None:
    with pytest.raises(ConfigError, match=r"SURGE_WORKER__MODELS: not JSON \(Expecting value"):
        load_settings(env={"SURGE_WORKER__MODELS": "[mlp]"})
    with pytest.raises(ConfigError, match="SURGE_WORKER__TOPICS: not JSON"):
        load_settings(env={"SURGE_WORKER__TOPICS": "mlp=requests"})
    settings = load_settings(env={"SURGE_REDIS__PASSWORD": "[1]", "SURGE_KAFKA__CLIENT_ID": "{x}"})
    assert (settings.redis.password, settings.kafka.client_id) == ("[1]", "{x}")


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="sasl_mechanism"):
        load_settings(env={"SURGE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"})
    with pytest.raises(ConfigError, match="regular expression"):
        load_settings(env={"SURGE_WORKER__REPLY_TOPIC_PATTERN": "("})
    with pytest.raises(ConfigError, match="preferred_batch_sizes"):
        convert({"max_batch_size": 8, "preferred_batch_sizes": [16]}, ModelConfig, "m")
    with pytest.raises(ConfigError, match="device"):
        convert({"device": "tpu"}, ModelConfig, "m")


@pytest.mark.parametrize(
    ("env", "error"),
    [
        pytest.param(
            {"SURGE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "SURGE_KAFKA__SASL_MECHANISM": "PLAIN"},
            "needs sasl_username and sasl_password",
            id="sasl-without-credentials",
        ),
        pytest.param(
            {"SURGE_WORKER__FETCH_MAX_WAIT_MS": "60000"},
            r"fetch_max_wait_ms \(60000\) must be at least 1000 under kafka.request_timeout_ms",
            id="fetch-wait-past-the-request-timeout",
        ),
        pytest.param(
            {"SURGE_WORKER__SHARED_TOPICS": '["surge.dead-letters"]'},
            "is also a request topic",
            id="dead-letters-consumed",
        ),
        pytest.param(
            {"SURGE_WORKER__TOPICS": '{"mlp": "dlq"}', "SURGE_WORKER__DEAD_LETTER_TOPIC": "dlq"},
            "is also a request topic",
            id="dead-letters-a-model-s-topic",
        ),
        pytest.param(
            {"SURGE_WORKER__COMMIT_INTERVAL_MS": "3000000000"},
            "commit_interval_ms: Expected `int` <= 2147483647",
            id="past-kafka-s-int32",
        ),
        pytest.param(
            {"SURGE_WORKER__SESSION_TIMEOUT_MS": "300"},
            "session_timeout_ms: Expected `int` >= 1000",
            id="session-shorter-than-a-heartbeat-needs",
        ),
        pytest.param(
            {"SURGE_KAFKA__SASL_MECHANISM": "PLAIN", "SURGE_KAFKA__SASL_USERNAME": "u"},
            "sasl_mechanism is set, but security_protocol PLAINTEXT uses no SASL",
            id="credentials-plaintext-would-not-send",
        ),
        pytest.param(
            {"SURGE_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SURGE_KAFKA__SSL_CAFILE": "x"},
            "ssl_cafile is set, but security_protocol SASL_PLAINTEXT uses no TLS",
            id="tls-file-without-tls",
        ),
        pytest.param(
            {"SURGE_REDIS__URL": "redis://h/0", "SURGE_REDIS__SSL_CA_CERTS": "ca.pem"},
            "ssl_ca_certs is set, but the url is not rediss://",
            id="redis-tls-file-without-tls",
        ),
        pytest.param(
            {"SURGE_REDIS__SOCKET_TIMEOUT_S": "inf"},
            "socket_timeout_s: Expected `float` <= 604800",
            id="infinite-duration",
        ),
        pytest.param(
            {"SURGE_WORKER__SHUTDOWN_TIMEOUT_S": "nan"},
            "shutdown_timeout_s",
            id="nan-duration",
        ),
        pytest.param(
            {"SURGE_WORKER__TOPIC_REPLICATION_FACTOR": "40000"},
            "topic_replication_factor: Expected `int` <= 32767",
            id="replication-past-kafka-s-int16",
        ),
        pytest.param(
            {"SURGE_WORKER__GROUP_ID": ""},
            "group_id: Expected `str` of length >= 1",
            id="no-group",
        ),
        pytest.param(
            {
                "SURGE_WORKER__DEFAULT_REPLY_TO": "replies",
                "SURGE_WORKER__REPLY_TOPIC_PATTERN": "results\\..*",
            },
            "default_reply_to 'replies' does not match reply_topic_pattern",
            id="default-reply-topic-not-allowed",
        ),
        pytest.param(
            {"SURGE_WORKER__DEFAULT_REPLY_TO": "surge.dead-letters"},
            "default_reply_to 'surge.dead-letters' is a request or dead-letter topic",
            id="default-reply-topic-the-dead-letters",
        ),
        pytest.param(
            {"SURGE_WORKER__DEFAULT_REPLY_TO": "surge.requests.mlp"},
            "default_reply_to 'surge.requests.mlp' is the request topic of a model named 'mlp'",
            id="default-reply-topic-a-models-requests",
        ),
        pytest.param(
            {"SURGE_WORKER__DEFAULT_REPLY_TO": "redis"},
            "default_reply_to is redis, but redis.url is not set",
            id="default-reply-redis-without-redis",
        ),
    ],
)
def test_settings_that_would_fail_once_running_are_refused_at_start_up(
    env: dict[str, str], error: str
) -> None:
    with pytest.raises(ConfigError, match=error):
        load_settings(env=env)


def test_event_loop_is_uvloop_unless_asyncio_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(env={}).worker.event_loop == "uvloop"
    chosen = load_settings(env={"SURGE_WORKER__EVENT_LOOP": "asyncio"})
    assert chosen.worker.event_loop == "asyncio"
    with pytest.raises(ConfigError, match=r"worker\.event_loop: Invalid enum value 'trio'"):
        load_settings(env={"SURGE_WORKER__EVENT_LOOP": "trio"})

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "uvloop" else find_spec(name, *a),
    )
    missing = re.escape('worker.event_loop is "uvloop", but uvloop is not installed')
    with pytest.raises(ConfigError, match=missing):
        load_settings(env={})  # the worker table built by its default factory
    with pytest.raises(ConfigError, match=missing):
        load_settings(env={"SURGE_WORKER__GROUP_ID": "g"})
    assert load_settings(env={"SURGE_WORKER__EVENT_LOOP": "asyncio"}).worker.event_loop


def test_sasl_and_tls_pass_through(tmp_path: Path) -> None:
    ca = make_certificates(tmp_path) / "ca.pem"
    settings = load_settings(
        env={
            "SURGE_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "SURGE_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
            "SURGE_KAFKA__SASL_USERNAME": "u",
            "SURGE_KAFKA__SASL_PASSWORD": "p",
            "SURGE_REDIS__URL": "rediss://h:6380/0",
            "SURGE_REDIS__PASSWORD": "secret",
            "SURGE_REDIS__SSL_CA_CERTS": str(ca),
        }
    )
    options = settings.kafka.client_options()
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "u"
    redis = settings.redis.client_options()
    assert (redis["password"], redis["ssl_ca_certs"]) == ("secret", str(ca))
    assert "single_connection_client" not in redis  # a pool, unless WAIT needs one connection
    waiting = load_settings(
        env={"SURGE_REDIS__URL": "redis://h/0", "SURGE_REDIS__MIN_REPLICAS": "1"}
    )
    assert waiting.redis.client_options()["single_connection_client"] is True


@pytest.mark.parametrize("device", ["cuda:x", "cudafoo", "cuda:-1", "gpu", "CPU"])
def test_a_device_is_auto_cpu_cuda_or_cuda_n(device: str) -> None:
    with pytest.raises(ConfigError, match="device"):
        convert({"device": device}, ModelConfig, "m")
    for good in ("auto", "cpu", "cuda", "cuda:1"):
        assert convert({"device": good}, ModelConfig, "m").device == good


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("DEAD_LETTER_TOPIC", "dead letters"),
        ("TOPIC_PREFIX", "requests/"),
        ("SHARED_TOPICS", '["ok", "not ok"]'),
        ("TOPICS", '{"mlp": "mlp requests"}'),
        ("DEFAULT_REPLY_TO", "replies?"),
    ],
)
def test_topic_names_kafka_would_refuse_are_refused_at_start_up(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"worker.{field.lower()}"):
        load_settings(env={f"SURGE_WORKER__{field}": value})


def test_a_file_that_is_not_utf8_or_not_tables_is_a_config_error(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(latin1, env={})
    scalar = tmp_path / "scalar.toml"
    scalar.write_text("worker = 5\n")
    for env in ({}, {"SURGE_WORKER__GROUP_ID": "g"}):
        with pytest.raises(ConfigError, match="worker: expected a table, got int"):
            load_settings(scalar, env=env)


@pytest.mark.parametrize(
    ("ahead_s", "wait_ms", "resume_s"),
    [
        (5.0, 500, 1.25),  # a quarter of fetch_ahead_s
        (2.0, 500, 1.0),  # two fetch waits: a resumed topic may queue behind a parked fetch
        (0.5, 500, 0.375),  # three quarters at most: a gap between stopping and starting
        (5.0, 20, 1.25),
    ],
)
def test_a_paused_model_fetches_again_with_time_for_a_parked_fetch(
    ahead_s: float, wait_ms: int, resume_s: float
) -> None:
    settings = WorkerSettings(fetch_ahead_s=ahead_s, fetch_max_wait_ms=wait_ms)
    assert settings.fetch_resume_s == pytest.approx(resume_s)


@pytest.mark.parametrize(
    ("datatype", "pad_value"),
    [("UINT8", -1), ("INT32", 0.5), ("INT8", 300), ("BOOL", 2), ("FP16", 1e5), ("BYTES", 0)],
)
def test_a_pad_value_the_datatype_cannot_hold_is_a_config_error(
    datatype: str, pad_value: float
) -> None:
    """numpy would pad with another value without a word: -1 as UINT8 is 255."""
    tensor = {"name": "ids", "datatype": datatype, "shape": [-1], "pad_value": pad_value}
    with pytest.raises(ConfigError, match=f"is not a {datatype} value"):
        convert({"inputs": [tensor]}, ModelConfig, "m")


@pytest.mark.parametrize(
    ("datatype", "pad_value"), [("UINT8", 255), ("INT64", -1), ("BOOL", 0), ("FP32", -1e30)]
)
def test_a_pad_value_the_datatype_holds_is_taken(datatype: str, pad_value: float) -> None:
    tensor = {"name": "ids", "datatype": datatype, "shape": [-1], "pad_value": pad_value}
    assert convert({"inputs": [tensor]}, ModelConfig, "m").inputs[0].pad_value == pad_value


@pytest.mark.parametrize(
    ("config", "error"),
    [
        pytest.param(
            {
                "inputs": [
                    {
                        "name": "ids",
                        "datatype": "INT64",
                        "shape": [-1],
                        "value_range": [-math.inf, 9],
                    }
                ]
            },
            "value_range [-inf, 9] is not within INT64's",
            id="inf-bound-on-integers",
        ),
        pytest.param(
            {
                "inputs": [
                    {"name": "ids", "datatype": "UINT8", "shape": [-1], "value_range": [-1, 255]}
                ]
            },
            "value_range [-1, 255] is not within UINT8's [0, 255]",
            id="bound-outside-the-type",
        ),
        pytest.param({"max_batch_delay_ms": math.inf}, "max_batch_delay_ms", id="endless-delay"),
        pytest.param(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}] * 2},
            "inputs ['x'] are declared more than once",
            id="one-input-twice",
        ),
    ],
)
def test_a_model_config_no_request_could_be_served_by_is_refused_at_load(
    config: dict[str, object], error: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        convert(config, ModelConfig, "m")


def test_an_unbounded_range_on_floats_is_taken() -> None:
    tensor = {"name": "x", "datatype": "FP32", "shape": [4], "value_range": [-math.inf, 1]}
    assert convert({"inputs": [tensor]}, ModelConfig, "m").inputs[0].value_range == (-math.inf, 1)


@pytest.mark.parametrize(("datatype", "high"), [("INT64", 2**63 - 1), ("UINT64", 2**64 - 1)])
def test_a_range_up_to_the_integer_type_s_highest_is_taken_exactly(
    datatype: str, high: int
) -> None:
    """As floats, 2**63 - 1 would round past INT64's highest and be refused."""
    tensor = {"name": "ids", "datatype": datatype, "shape": [-1], "value_range": [0, high]}
    assert convert({"inputs": [tensor]}, ModelConfig, "m").inputs[0].value_range == (0, high)


def test_tls_files_are_checked_at_start_up(tmp_path: Path) -> None:
    """Not at the first connection, as a traceback: one line naming the field and the file."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    cases = [
        (
            {"SURGE_KAFKA__SECURITY_PROTOCOL": "SSL", "SURGE_KAFKA__SSL_CAFILE": "/missing.pem"},
            "ssl_cafile /missing.pem: no such file",
        ),
        (
            {"SURGE_KAFKA__SECURITY_PROTOCOL": "SSL", "SURGE_KAFKA__SSL_CAFILE": str(bad)},
            "TLS files unusable",
        ),
        (
            {"SURGE_REDIS__URL": "rediss://cache:6380", "SURGE_REDIS__SSL_CERTFILE": "/gone"},
            "ssl_certfile /gone: no such file",
        ),
    ]
    for env, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_settings(env=env)


def test_a_setting_named_with_one_underscore_too_few_is_an_error() -> None:
    """Ignored, `SURGE_WORKER_GROUP_ID` would leave the group id at its default unnoticed;
    variables that name no setting (a cache path, say) are left alone."""
    with pytest.raises(ConfigError, match="did you mean SURGE_WORKER__GROUP_ID"):
        load_settings(env={"SURGE_WORKER_GROUP_ID": "scoring"})
    assert load_settings(env={"SURGE_KAFKA_CACHE": "/cache", "SURGE_POOL_MEMBER": "1"})
    # Kubernetes' link to a Service named surge-metrics, in every pod of its namespace.
    linked = load_settings(env={"SURGE_METRICS_PORT": "tcp://10.96.0.5:9400"})
    assert linked.metrics.port == 0


def test_settings_that_let_a_stop_cut_a_batch_short_are_told_apart() -> None:
    assert not load_settings(env={}).worker.stop_cuts_batches  # the defaults finish them
    slow = load_settings(env={"SURGE_WORKER__BATCH_TIME_BUDGET_S": "60"})
    assert slow.worker.stop_cuts_batches


_IDS = {"name": "ids", "datatype": "INT64", "shape": [-1], "pad_value": 0}


@pytest.mark.parametrize(
    ("inputs", "output", "error"),
    [
        ([{**_IDS, "pad_value": None}], {"shape": [-1], "follows": "ids"}, "not another input"),
        ([_IDS], {"shape": [-1], "follows": "mask"}, "not another input"),
        ([_IDS], {"shape": [4], "follows": "ids"}, "does not start with"),
        ([_IDS], {"shape": [], "follows": "ids"}, "does not start with"),
    ],
)
def test_an_output_follows_a_padded_input_it_can_be_cut_to(
    inputs: list[dict[str, object]], output: dict[str, object], error: str
) -> None:
    config = {"inputs": inputs, "outputs": [{"name": "y", "datatype": "FP32", **output}]}
    with pytest.raises(ConfigError, match=error):
        convert(config, ModelConfig, "m")
    good = {"inputs": [_IDS], "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 8]}]}
    good["outputs"][0]["follows"] = "ids"  # type: ignore[index]
    assert convert(good, ModelConfig, "m").outputs[0].follows == "ids"


@pytest.mark.parametrize(
    ("mask", "error"),
    [
        ({"follows": "mask"}, "not another input"),
        ({"follows": "ids", "pad_value": None}, "needs a pad_value"),
        ({"follows": "ids", "shape": [4]}, "does not start with"),
    ],
)
def test_an_input_follows_another_padded_input(mask: dict[str, object], error: str) -> None:
    inputs = [_IDS, {**_IDS, "name": "mask", **mask}]
    with pytest.raises(ConfigError, match=error):
        convert({"inputs": inputs}, ModelConfig, "m")
    chained = [_IDS, {**_IDS, "name": "mask", "follows": "ids"}, {**_IDS, "name": "types"}]
    chained[2]["follows"] = "mask"
    with pytest.raises(ConfigError, match="which follows too"):
        convert({"inputs": chained}, ModelConfig, "m")
    good = [_IDS, {**_IDS, "name": "mask", "follows": "ids"}]
    assert convert({"inputs": good}, ModelConfig, "m").inputs[1].follows == "ids"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
        ("unix:///run/redis.sock?decode_responses=true&db=2", "unix:///run/redis.sock?db=2"),
        ("redis://:pw@host:6380/1?decode_responses=yes", "redis://:pw@host:6380/1"),
        ("rediss://host", "rediss://host"),
    ],
)
def test_a_redis_url_keeps_all_but_decode_responses_and_still_names_its_server(
    url: str, expected: str
) -> None:
    assert redis_url_for_bytes(url) == expected
    Redis.from_url(expected)  # redis-py reads it (no connection is made yet)


def test_an_encrypted_tls_key_needs_its_passphrase_and_never_prompts(tmp_path: Path) -> None:
    """Asked for a passphrase, OpenSSL would prompt on a terminal: a worker hung at start."""
    certs = make_certificates(tmp_path)
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        [
            *("openssl", "pkcs8", "-topk8", "-in", "server.key", "-out", encrypted.name),
            *("-v2", "aes-256-cbc", "-passout", "pass:secret"),
        ],
        cwd=certs,
        check=True,
        capture_output=True,
    )
    kafka = {
        "SURGE_KAFKA__SECURITY_PROTOCOL": "SSL",
        "SURGE_KAFKA__SSL_CAFILE": str(certs / "ca.pem"),
        "SURGE_KAFKA__SSL_CERTFILE": str(certs / "server.pem"),
        "SURGE_KAFKA__SSL_KEYFILE": str(encrypted),
    }
    redis = {
        "SURGE_REDIS__URL": "rediss://cache:6380",
        "SURGE_REDIS__SSL_CA_CERTS": str(certs / "ca.pem"),
        "SURGE_REDIS__SSL_CERTFILE": str(certs / "server.pem"),
        "SURGE_REDIS__SSL_KEYFILE": str(encrypted),
    }
    usable: dict[str, tuple[dict[str, str], Callable[[Settings], bool]]] = {
        "KAFKA": (kafka, lambda s: s.kafka.client_options()["ssl_context"] is not None),
        "REDIS": (redis, lambda s: s.redis.client_options()["ssl_password"] == "secret"),
    }
    encrypted_key = "the key is encrypted: give its passphrase as ssl_pass"
    for table, (env, loaded) in usable.items():
        password = f"SURGE_{table}__SSL_PASSWORD"
        with pytest.raises(ConfigError, match=encrypted_key):
            load_settings(env=env)
        with pytest.raises(ConfigError, match="TLS files unusable"):
            load_settings(env=env | {password: "wrong"})
        assert loaded(load_settings(env=env | {password: "secret"}))


def test_redis_tls_files_are_loaded_at_start_up_not_at_the_first_result(tmp_path: Path) -> None:
    """A result that cannot connect waits as for Redis away, for ever: said at start-up."""
    certs = make_certificates(tmp_path)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    url = {"SURGE_REDIS__URL": "rediss://cache:6380"}
    with pytest.raises(ConfigError, match="TLS files unusable"):
        load_settings(env=url | {"SURGE_REDIS__SSL_CA_CERTS": str(bad)})
    with pytest.raises(ConfigError, match="ssl_keyfile needs ssl_certfile"):
        load_settings(env=url | {"SURGE_REDIS__SSL_KEYFILE": str(certs / "server.key")})
    other = make_certificates(tmp_path / "other")
    mismatched = {  # a key that is not the certificate's
        "SURGE_REDIS__SSL_CERTFILE": str(certs / "server.pem"),
        "SURGE_REDIS__SSL_KEYFILE": str(other / "server.key"),
    }
    with pytest.raises(ConfigError, match="TLS files unusable"):
        load_settings(env=url | mismatched)


@pytest.mark.parametrize(
    ("url", "env", "message"),
    [
        ("redis://h:6379/0?socket_timeout=1", {}, "sets socket_timeout: set \\[redis\\] socket"),
        ("redis://h/0?socket_connect_timeout=0", {}, "socket_connect_timeout"),
        ("redis://u:p@h/0", {"SURGE_REDIS__PASSWORD": "q"}, "in the url and in username/pass"),
    ],
)
def test_a_redis_url_may_not_set_what_a_setting_sets(
    url: str, env: dict[str, str], message: str
) -> None:
    """redis-py lets a URL's options win over the client's: the setting would be ignored."""
    with pytest.raises(ConfigError, match=message):
        load_settings(env={"SURGE_REDIS__URL": url} | env)
    load_settings(env={"SURGE_REDIS__URL": "redis://u:p@h/0?health_check_interval=5"})
