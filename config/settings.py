"""Worker settings: one Struct per TOML table, each field with a default and a bound."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import ssl
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

import msgspec
from redis.connection import parse_url

from surge.schemas.headers import REPLY_TO_REDIS

# Kafka's protocol carries these (timeouts, sizes, counts) as 32-bit integers.
Positive = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
# Durations: finite (`inf` parses as a float, and no timer or socket takes it), a week at most.
Seconds = Annotated[float, msgspec.Meta(gt=0, le=7 * 86_400)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
# What Kafka accepts as a topic name (and a prefix of one).
TOPIC_NAME = r"[A-Za-z0-9._-]{1,249}"
Topic = Annotated[str, msgspec.Meta(pattern=f"^{TOPIC_NAME}$")]
TopicPrefix = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{0,200}$")]


class KafkaSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "surge"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = None  # of an encrypted ssl_keyfile
    request_timeout_ms: Positive = 30_000
    # Keep equal to the broker's `message.max.bytes`: a mismatch makes sends fail late.
    max_request_size: Positive = 1_048_576

    def __post_init__(self) -> None:
        check_bootstrap(self.bootstrap_servers)
        # Credentials or TLS files the protocol would not use: the user means to use them.
        if not self.security_protocol.startswith("SASL"):
            _unused(
                self,
                "sasl_mechanism",
                "sasl_username",
                "sasl_password",
                because=(
                    f"security_protocol {self.security_protocol} uses no SASL (SASL_PLAINTEXT "
                    "or SASL_SSL does)"
                ),
            )
        if self.security_protocol not in ("SSL", "SASL_SSL"):
            _unused(
                self,
                "ssl_cafile",
                "ssl_certfile",
                "ssl_keyfile",
                "ssl_password",
                because=(
                    f"security_protocol {self.security_protocol} uses no TLS (SSL or SASL_SSL does)"
                ),
            )
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism")
        if self.sasl_mechanism and not (self.sasl_username and self.sasl_password):
            raise ValueError(
                f"sasl_mechanism {self.sasl_mechanism} needs sasl_username and sasl_password"
            )
        if self.security_protocol in ("SSL", "SASL_SSL"):
            _readable(self, "ssl_cafile", "ssl_certfile", "ssl_keyfile")
            try:  # at start-up, not at the first connection
                self._ssl_context()
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"TLS files unusable: {exc}") from None

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments shared by every aiokafka client Surge creates."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism:
            options |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password,
            }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = self._ssl_context()
        return options

    def _ssl_context(self) -> ssl.SSLContext:
        return _tls_context(self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile, self.ssl_password)


def _tls_context(
    cafile: str | None, certfile: str | None, keyfile: str | None, password: str | None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    if certfile:
        # Asked for an encrypted key's passphrase, OpenSSL would prompt on a terminal (a
        # worker hung at start) or fail with no reason given: the setting, or this.
        context.load_cert_chain(certfile, keyfile, password=password or _no_password)
    return context


def _no_password() -> str:
    raise ValueError("the key is encrypted: give its passphrase as ssl_password")


def check_bootstrap(servers: str) -> str:
    """`servers` if it is `host[:port]` entries, comma-separated (an IPv6 host in brackets
    when it has a port), as every Kafka client reads them; else a ValueError that says why."""
    for entry in map(str.strip, servers.split(",")):
        if entry.startswith("["):  # [::1]:9092
            host, bracket, rest = entry[1:].partition("]")
            if not bracket or "]" in rest or (rest and not rest.startswith(":")):
                raise ValueError(f"bootstrap servers {servers!r}: {entry!r} is not [host]:port")
            port = rest[1:] if rest else None
        elif ":" not in entry or _ipv6(entry):  # a host alone (port 9092)
            host, port = entry, None
        else:
            host, _, port = entry.rpartition(":")
            if ":" in host:  # not an IPv6 address, which would need brackets before a port
                raise ValueError(f"bootstrap servers {servers!r}: {entry!r} is not host:port")
        if not host:
            raise ValueError(f"bootstrap servers {servers!r}: an entry without a host")
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"bootstrap servers {servers!r}: {port!r} is not a port")
    return servers


def _ipv6(text: str) -> bool:
    """Whether `text` is an IPv6 address as the Kafka clients read one (no zone)."""
    try:
        socket.inet_pton(socket.AF_INET6, text)
    except (OSError, ValueError):
        return False
    return True


def check_redis_url(url: str) -> str:
    """`url` if it names a Redis server the way redis-py reads one; else a ValueError."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"redis url {url!r} must start with redis://, rediss:// or unix://")
    try:
        parse_url(url)
    except ValueError as exc:  # a port that is no number, a database that is none
        raise ValueError(f"redis url {url!r}: {exc}") from None
    return url


def _unused(settings: object, *fields: str, because: str) -> None:
    """None of these fields is set, since `because` says nothing would read them (empty is
    unset: a deployment's optional secret left blank)."""
    for name in fields:
        if getattr(settings, name):
            raise ValueError(f"{name} is set, but {because}")


def _readable(settings: object, *fields: str) -> None:
    """Each of these file fields that is set names a file this process can read."""
    for name in fields:
        path = getattr(settings, name)
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"{name} {path}: no such file, or not readable")


# Redis URL options that settings set: (option, the setting that sets it).
_URL_OPTIONS_SET_HERE = {
    "socket_timeout": "socket_timeout_s",
    "socket_connect_timeout": "socket_timeout_s",
    "single_connection_client": "min_replicas",
    "ssl_ca_certs": "ssl_ca_certs",
    "ssl_certfile": "ssl_certfile",
    "ssl_keyfile": "ssl_keyfile",
    "ssl_password": "ssl_password",
}


class RedisSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    url: str = ""  # empty: `surge-reply-to: redis` is refused (invalid_reply_to, a dead letter)
    username: str | None = None
    password: str | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = None  # of an encrypted ssl_keyfile
    result_ttl_s: Positive = 3600
    key_prefix: str = "surge:result:"
    socket_timeout_s: Seconds = 5.0  # a hung connection is retried
    # Replicas each result must reach (Redis WAIT) before its request counts as answered and
    # its offset may be committed: a failover then loses none. 0: the primary's word.
    min_replicas: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0

    def __post_init__(self) -> None:
        if self.url:
            check_redis_url(self.url)
            self._url_leaves_settings_alone()
        if self.url.startswith("rediss://"):
            _readable(self, "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
            if self.ssl_keyfile and not self.ssl_certfile:
                raise ValueError("ssl_keyfile needs ssl_certfile (the key's certificate)")
            try:  # at start-up, not at the first result (retried for ever as Redis away)
                _tls_context(
                    self.ssl_ca_certs, self.ssl_certfile, self.ssl_keyfile, self.ssl_password
                )
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"TLS files unusable: {exc}") from None
        else:
            _unused(
                self,
                "ssl_ca_certs",
                "ssl_certfile",
                "ssl_keyfile",
                "ssl_password",
                because=("the url is not rediss:// (TLS)"),
            )

    def _url_leaves_settings_alone(self) -> None:
        """redis-py lets a URL's options override the client's: one that sets what a setting
        sets would silently win (a socket timeout the WAIT budget is not sized by, say)."""
        parts = urlsplit(self.url)
        query = dict(parse_qsl(parts.query))
        for option, field in _URL_OPTIONS_SET_HERE.items():
            if option in query:
                raise ValueError(
                    f"redis url sets {option}: set [redis] {field} instead (the url's would win)"
                )
        if (parts.username or parts.password) and (self.username or self.password):
            raise ValueError(
                "redis credentials are in the url and in username/password: give them once"
            )

    def client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "username": self.username,
            "password": self.password,
            "socket_timeout": self.socket_timeout_s,
            "socket_connect_timeout": self.socket_timeout_s,
            # WAIT counts the writes of the connection it is sent on: the results' own.
            "single_connection_client": self.min_replicas > 0 or None,
        }
        if self.url.startswith("rediss://"):
            options |= {
                "ssl_ca_certs": self.ssl_ca_certs,
                "ssl_certfile": self.ssl_certfile,
                "ssl_keyfile": self.ssl_keyfile,
                "ssl_password": self.ssl_password,
            }
        return {k: v for k, v in options.items() if v is not None}


class WorkerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    group_id: Annotated[str, msgspec.Meta(min_length=1)] = "surge"
    model_root: str = "models"
    models: list[str] = []  # empty: every model found in model_root
    topic_prefix: TopicPrefix = "surge.requests."
    topics: dict[str, Topic] = {}  # model -> request topic, overriding topic_prefix + model
    shared_topics: list[Topic] = []  # topics carrying several models, routed by `surge-model`
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # exactly_once: reply-topic results and consumed offsets commit in one transaction per
    # input partition (readers use read_committed); results become visible at each commit.
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    # uvloop: the event loop, its sockets and its timers in C: a seventh less CPU per request
    # in a burst here. asyncio: the standard library's, for its debug mode or a platform
    # uvloop lacks.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    create_topics: bool = True
    topic_partitions: Positive = 8
    topic_replication_factor: Annotated[int, msgspec.Meta(ge=1, le=2**15 - 1)] = 1  # 16-bit
    dead_letter_topic: Topic = "surge.dead-letters"
    default_reply_to: TopicPrefix = (
        ""  # for requests without `surge-reply-to`; empty: dead-letter them
    )
    # Results may only go to topics matching this: a request cannot make a worker write anywhere.
    reply_topic_pattern: str = TOPIC_NAME
    max_in_flight: Positive = 20_000
    # Of request bodies, and of their encoded results until those are durable.
    max_in_flight_bytes: Positive = 256 * 1024 * 1024
    # Model time a worker queues ahead of a model: past it, that model's own topics pause
    # until a quarter is left (or two batches per instance, if more). Kafka keeps the rest,
    # where the group's other workers can take it.
    fetch_ahead_s: Seconds = 5.0
    max_message_bytes: Positive = 1_048_576
    max_tensor_elements: Positive = 1 << 22
    # Bounds a hung model call in an executor thread (where every model runs until it has
    # proved faster than its inline_below_ms), not the consumer's max.poll.interval. With
    # fetch_ahead_s, within shutdown_timeout_s: a stop then finishes the batch running.
    batch_time_budget_s: Seconds = 20.0
    # A model version not loaded and warmed up by then is a failed load (tried again once its
    # files change): one that hangs must not keep every other model from loading.
    model_load_timeout_s: Seconds = 300.0
    # A result its reply topic keeps refusing this long becomes a dead letter (reply_failed).
    reply_retry_s: Seconds = 60.0
    max_poll_interval_ms: Positive = 300_000
    # Heartbeats go every third of it; brokers refuse one under group.min.session.timeout.ms
    # (6 s by default).
    session_timeout_ms: Annotated[int, msgspec.Meta(ge=1_000, le=2**31 - 1)] = 10_000
    max_poll_records: Positive = 1024
    # A fetch returns once it holds fetch_min_bytes, or after fetch_max_wait_ms. With one byte,
    # a record arriving ends a waiting fetch at once, so the wait bounds only empty fetches:
    # every 20 ms, an idle worker cost the broker 9-15% of a core here, at 500 ms 2-4%, with
    # the same latency at 10 req/s. More bytes: fewer, fuller fetches under light load.
    fetch_min_bytes: Positive = 1
    fetch_max_wait_ms: Positive = 500
    commit_interval_ms: Positive = 200
    reload_interval_s: Seconds = 2.0
    shutdown_timeout_s: Seconds = 30.0

    @property
    def stop_cuts_batches(self) -> bool:
        """A stop may give up on a batch still within its budget (and on what is queued
        behind it): later requests of its partitions, answered but not committed, are then
        answered again by the next owner."""
        return self.batch_time_budget_s + self.fetch_ahead_s > self.shutdown_timeout_s

    @property
    def fetch_resume_s(self) -> float:
        """Queued model time at which a model whose fetching stopped fetches again: a quarter
        of fetch_ahead_s, and at least two fetch waits, as its first fetch may queue behind
        one parked on the same broker for other topics; at most three quarters, so that
        stopping and starting stay apart."""
        parked_s = 2 * self.fetch_max_wait_ms / 1000
        return min(0.75 * self.fetch_ahead_s, max(self.fetch_ahead_s / 4, parked_s))

    def __post_init__(self) -> None:
        if self.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ValueError(
                'worker.event_loop is "uvloop", but uvloop is not installed here: install it, '
                'or choose "asyncio"'
            )
        try:
            re.compile(self.reply_topic_pattern)
        except re.error as exc:
            raise ValueError(f"reply_topic_pattern is not a regular expression: {exc}") from None
        consumed = {*self.shared_topics, *self.topics.values()}
        if self.dead_letter_topic in consumed:  # its letters would be consumed again, forever
            raise ValueError(
                f"dead_letter_topic {self.dead_letter_topic!r} is also a request topic"
            )
        reply_to = self.default_reply_to
        if reply_to and reply_to != REPLY_TO_REDIS:
            # Checked as each request's own reply topic is: refused here, it would dead-letter
            # every request that names none.
            if not re.fullmatch(self.reply_topic_pattern, reply_to):
                raise ValueError(
                    f"default_reply_to {reply_to!r} does not match reply_topic_pattern "
                    f"{self.reply_topic_pattern!r}"
                )
            if reply_to in (*consumed, self.dead_letter_topic):
                raise ValueError(f"default_reply_to {reply_to!r} is a request or dead-letter topic")
            model = reply_to.removeprefix(self.topic_prefix)
            if self.topic_prefix and model != reply_to and model not in self.topics:
                raise ValueError(
                    f"default_reply_to {reply_to!r} is the request topic of a model named "
                    f"{model!r} (topic_prefix {self.topic_prefix!r})"
                )


class LogSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a terminal


class MetricsSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    port: Port = 0  # 0: no Prometheus endpoint


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    kafka: KafkaSettings = msgspec.field(default_factory=KafkaSettings)
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    worker: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)

    def __post_init__(self) -> None:
        if self.worker.default_reply_to == REPLY_TO_REDIS and not self.redis.url:
            raise ValueError("worker.default_reply_to is redis, but redis.url is not set")
        # A fetch waits up to fetch_max_wait_ms for records; a request not answered within
        # request_timeout_ms closes the connection: every idle fetch would, and reconnect.
        wait, timeout = self.worker.fetch_max_wait_ms, self.kafka.request_timeout_ms
        if wait + 1_000 > timeout:
            raise ValueError(
                f"worker.fetch_max_wait_ms ({wait}) must be at least 1000 under "
                f"kafka.request_timeout_ms ({timeout})"
            )


def redis_url_for_bytes(url: str) -> str:
    """`url` without a `decode_responses` option: redis-py lets one in the URL override the
    client's own, and Surge reads results and script replies as bytes."""
    # Only the query is rebuilt: urlunsplit would write `unix:///path` back as `unix:/path`.
    base, _, query = url.partition("?")
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "decode_responses"]
    return f"{base}?{urlencode(kept)}" if kept else base
