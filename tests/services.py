"""Real services for tests and benchmarks, each on a free loopback port.

- Apache Kafka (KRaft, one combined broker+controller node): its jars come from Maven Central
  once, into a cache (`SURGE_KAFKA_CACHE`, default ~/.cache/surge/kafka-<version>).
- redis-server (the Debian package).
- noida-db (PyPI), the embedded broker `surge demo` uses.

Run `python -m tests.services kafka` to fetch the jars and start a broker in the foreground.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

KAFKA_VERSION = "4.4.0"
LOG4J_VERSION = "2.25.5"
CACHE = Path(
    os.environ.get("SURGE_KAFKA_CACHE", Path.home() / ".cache" / "surge" / f"kafka-{KAFKA_VERSION}")
)

_POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>surge.test</groupId><artifactId>kafka-broker</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{KAFKA_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{LOG4J_VERSION}</version></dependency>
  </dependencies>
</project>
"""

_LOG4J = """status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = info
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kafka_classpath() -> str:
    """The broker's classpath, fetching the jars with Maven on first use."""
    libs = CACHE / "libs"
    marker = CACHE / "complete"
    if not marker.exists():
        if shutil.which("mvn") is None:
            raise RuntimeError("Maven (mvn) is needed once to fetch the Kafka broker's jars")
        CACHE.mkdir(parents=True, exist_ok=True)
        (CACHE / "pom.xml").write_text(_POM)
        subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(CACHE / "pom.xml"),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={libs}",
                "-DincludeScope=runtime",
            ],
            check=True,
        )
        (CACHE / "log4j2.properties").write_text(_LOG4J)
        marker.touch()
    return f"{libs}/*"


def _wait_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"service exited with {process.returncode}:\n{log.read_text()[-4000:]}"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(
        f"service did not open port {port} in {timeout}s:\n{log.read_text()[-4000:]}"
    )


# The least CPU on a 2-core machine, for tests. Kafka's own start script uses G1 with short
# pause goals, as production brokers do: the benchmarks measure latency on that one.
SERIAL_GC = ("-XX:+UseSerialGC",)
KAFKA_GC = (
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
)


class KafkaBroker:
    """A single-node KRaft broker. `kill()` and `start()` again reuse the same log directory."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        heap: str = "512m",
        gc: Sequence[str] = SERIAL_GC,
        sasl_users: dict[str, str] | None = None,
        tls: bool = False,
        auto_create_topics: bool = True,
        joining: KafkaBroker | None = None,
        properties: Sequence[str] = (),
    ) -> None:
        """`sasl_users` adds a SASL_PLAINTEXT listener (mechanism PLAIN) with these users;
        `tls` an SSL listener whose certificate `ca_file` signs; `auto_create_topics=False`
        makes topics exist only once created, as on most production clusters. `gc`: the JVM's
        collector options; its pauses are logged to `gc.log` in the workdir. `joining`: this
        one is a second broker (no controller) of that one's cluster. `properties`: more
        server settings, as `name=value`."""
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="surge-kafka-"))
        self.port = free_port()
        self.controller_port = free_port()
        self.sasl_port = free_port() if sasl_users else None
        self.ssl_port = free_port() if tls else None
        self.heap = heap
        self.gc = list(gc)
        self.process: subprocess.Popen[bytes] | None = None
        self._classpath = kafka_classpath()
        self._config = self.workdir / "server.properties"
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        extra: list[str] = []  # security settings of the extra listeners
        if sasl_users:
            listeners.append(f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}")
            protocols.append("SASL_PLAINTEXT:SASL_PLAINTEXT")
            users = " ".join(f'user_{u}="{p}"' for u, p in sasl_users.items())
            extra = [
                "sasl.enabled.mechanisms=PLAIN",
                "listener.name.sasl_plaintext.plain.sasl.jaas.config="
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'username="admin" password="{sasl_users.get("admin", "")}" {users};',
            ]
        if tls:
            certs = make_certificates(self.workdir / "tls")
            keystore = certs / "keystore.pem"  # key then certificate, as Kafka's PEM type wants
            keystore.write_text(
                (certs / "server.key").read_text() + (certs / "server.pem").read_text()
            )
            listeners.append(f"SSL://127.0.0.1:{self.ssl_port}")
            protocols.append("SSL:SSL")
            extra += [
                "listener.name.ssl.ssl.keystore.type=PEM",
                f"listener.name.ssl.ssl.keystore.location={keystore}",
            ]
        self.cluster_id = joining.cluster_id if joining else uuid.uuid4().hex[:22]
        if joining is None:
            node = [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                f"listeners={','.join(listeners)},CONTROLLER://127.0.0.1:{self.controller_port}",
            ]
        else:
            node = [
                "process.roles=broker",
                "node.id=2",
                f"controller.quorum.voters=1@127.0.0.1:{joining.controller_port}",
                f"listeners={','.join(listeners)}",
            ]
        settings = [
            *node,
            f"advertised.listeners={','.join(listeners)}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            f"listener.security.protocol.map={','.join(protocols)}",
            f"log.dirs={self.workdir / 'data'}",
            "num.partitions=4",
            f"auto.create.topics.enable={str(auto_create_topics).lower()}",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=4",
            "group.initial.rebalance.delay.ms=0",
            "num.network.threads=2",
            "num.io.threads=2",
            *extra,
            *properties,
        ]
        self._config.write_text("\n".join(settings) + "\n")
        self._java(
            [
                "kafka.tools.StorageTool",
                "format",
                "-t",
                self.cluster_id,
                "-c",
                str(self._config),
            ],
            check=True,
        )

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def ssl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.ssl_port}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "tls" / "ca.pem"

    def _java(self, args: list[str], check: bool = False) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run(
            [
                "java",
                "-Xmx256m",
                f"-Dlog4j2.configurationFile={CACHE / 'log4j2.properties'}",
                "-cp",
                self._classpath,
                *args,
            ],
            capture_output=True,
        )
        if check and done.returncode != 0:  # say why: the exit status alone tells nothing
            output = (done.stdout + done.stderr).decode(errors="replace")[-3000:]
            raise RuntimeError(f"{args[0]} {args[1]} exited with {done.returncode}:\n{output}")
        return done

    def start(self, timeout: float = 90) -> KafkaBroker:
        log = self.workdir / "broker.log"
        seen = log.stat().st_size if log.exists() else 0  # a restart appends to the same log
        self.process = subprocess.Popen(
            [
                "java",
                f"-Xmx{self.heap}",
                f"-Xms{self.heap}",
                *self.gc,
                f"-Xlog:gc:file={self.workdir / 'gc.log'}",
                f"-Dlog4j2.configurationFile={CACHE / 'log4j2.properties'}",
                "-cp",
                self._classpath,
                "kafka.Kafka",
                str(self._config),
            ],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_port(self.port, self.process, log, timeout)
        deadline = time.monotonic() + timeout
        while "Kafka Server started" not in log.read_text(errors="replace")[seen:]:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"Kafka did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.1)
        return self

    def stop(self, timeout: float = 30) -> None:
        """A clean shutdown (SIGTERM)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """A hard crash (SIGKILL)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def make_certificates(directory: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 (openssl): ca.pem, server.pem, server.key."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=surge-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    )
    return directory


class RedisServer:
    def __init__(
        self,
        *,
        password: str | None = None,
        persistent: bool = False,
        tls: bool = False,
        replica_of: RedisServer | None = None,
        options: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        self.password = password
        self.replica_of = replica_of  # a plain primary on this machine
        self.options = options  # more redis-server arguments
        self.persistent = persistent  # an append-only file: a restart keeps the data
        self.tls = tls  # TLS only, certificates in workdir/tls (ca.pem signs server.pem)
        self.workdir = Path(tempfile.mkdtemp(prefix="surge-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "tls" / "ca.pem"

    def start(self, timeout: float = 20) -> RedisServer:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            "always",
            "--dir",
            str(self.workdir),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
        args += self.options
        if self.tls:
            certs = make_certificates(self.workdir / "tls")
            args[args.index("--port") + 1] = "0"
            args += [
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(certs / "server.pem"),
                "--tls-key-file",
                str(certs / "server.key"),
                "--tls-ca-cert-file",
                str(certs / "ca.pem"),
                "--tls-auth-clients",
                "no",
            ]
        log = self.workdir / "redis.log"
        self.process = subprocess.Popen(args, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        _wait_port(self.port, self.process, log, timeout)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoidaBroker:
    """noida-db's Kafka endpoint: the zero-set-up broker of `surge demo`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="surge-noida-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> NoidaBroker:
        from surge.broker import start_noida

        self.process = start_noida(self.workdir, self.port, timeout=timeout)
        return self

    def close(self) -> None:
        from surge.broker import stop_noida

        if self.process:
            stop_noida(self.process)
        shutil.rmtree(self.workdir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["fetch"]:
        print(kafka_classpath())
    elif sys.argv[1:2] == ["kafka"]:
        # The broker runs in its own session: a SIGTERM to this process alone must stop it too.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        broker = KafkaBroker()
        try:
            broker.start()
            print(
                f"Kafka {KAFKA_VERSION} on {broker.bootstrap} (log dir {broker.workdir}); "
                "Ctrl-C stops it",
                flush=True,
            )
            broker.process.wait()  # type: ignore[union-attr]
        except KeyboardInterrupt:
            broker.close()
    else:
        sys.exit("usage: python -m tests.services fetch|kafka")
