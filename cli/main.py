"""The `surge` command: broker, worker, predict, score, shadow, lag, demo, dlq, schema."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the commands import what they use when they run: `surge --help` stays quick
    from rich.console import Console

    from surge.producers import SurgeClient
    from surge.producers.scoring import ScoreReport
    from surge.producers.shadow import ShadowReport
    from surge.workers.lag import TopicLag

_DATATYPE_HELP = "numpy dtype of the inputs: bool, (u)int8-64, float16-64 or str"
_TIME_HELP = "ISO time, inclusive; UTC unless it has an offset (as `dlq inspect` prints)"
_REDIS_PREFIX_HELP = "the workers' [redis] key_prefix (default: the settings', surge:result:)"
_REDIS_URL_HELP = "the workers' Redis (default: the settings' [redis] url)"
_MAX_TIMEOUT_S = 86_400
_MEMBERS_PER_CPU = 4  # `--processes` at most
_BLOCK = 1 << 16  # bytes read at a time, back from a results file's end, for its last line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="surge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    broker = commands.add_parser("broker", help="run the embedded zero-set-up broker (noida-db)")
    broker.add_argument("--port", type=_port, default=9092, help="Kafka port (default: 9092)")
    broker.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".noida-db"),
        help="where its topics are kept between runs (default: ./.noida-db)",
    )

    worker = commands.add_parser("worker", help="run a worker pool member")
    worker.add_argument("-c", "--config", type=Path, help="TOML settings (see config/worker.toml)")
    worker.add_argument(
        "--processes",
        default="1",
        type=_processes,
        help="pool size on this machine: a number, or 'gpus' for one process per visible GPU",
    )

    predict = commands.add_parser("predict", help="send one request and print its result")
    predict.add_argument("model")
    predict.add_argument(
        "--input",
        "-i",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help='a tensor as a JSON array, e.g. x="[[0.1, 0.2]]" (FP32); repeat for more inputs',
    )
    predict.add_argument("--datatype", default="float32", help=_DATATYPE_HELP)
    predict.add_argument("--version")
    predict.add_argument("--topic", help="request topic (default: surge.requests.<model>)")
    _connection_arguments(predict)
    predict.add_argument("--via", choices=["kafka", "redis"], default="kafka")
    predict.add_argument("--redis-url", type=_redis_url, help=_REDIS_URL_HELP)
    predict.add_argument("--redis-prefix", help=_REDIS_PREFIX_HELP)
    predict.add_argument("--timeout", type=_seconds, default=30.0, help="seconds")

    score = commands.add_parser(
        "score", help="score a JSON-lines file: one request per line, results in input order"
    )
    _file_arguments(score, window=512)
    score.add_argument("-o", "--output", type=Path, help="result lines (default: stdout)")
    score.add_argument(
        "--resume",
        action="store_true",
        help="continue a run that did not finish, after the lines its OUTPUT.partial holds",
    )
    score.add_argument("--version")

    shadow = commands.add_parser(
        "shadow", help="send a JSON-lines file to the live model and a candidate version; compare"
    )
    _file_arguments(shadow, window=256)
    shadow.add_argument("--candidate", required=True, help="the version to compare")
    shadow.add_argument("--live", help="the version to compare with (default: the latest)")
    shadow.add_argument("--candidate-topic", help="the candidate's topic (default: --topic's)")

    lag = commands.add_parser("lag", help="a worker group's lag per topic: what to scale on")
    _connection_arguments(lag)
    lag.add_argument("--group", help="consumer group (default: the settings' group_id)")
    lag.add_argument("--json", action="store_true", help="one JSON object per topic")

    demo = commands.add_parser("demo", help="broker + worker + example model + a burst, in one go")
    demo.add_argument("--requests", type=_positive_int, default=20_000)
    demo.add_argument(
        "--rate", type=_positive_rate, default=2_000.0, help="steady-load phase, requests/s"
    )

    dlq = commands.add_parser("dlq", help="inspect or replay a dead-letter topic")
    dlq_commands = dlq.add_subparsers(dest="action", required=True)
    for action, text in (("inspect", "summarise by reason"), ("replay", "re-publish to source")):
        sub = dlq_commands.add_parser(action, help=text)
        sub.add_argument("--topic", default="surge.dead-letters")
        _connection_arguments(sub)
    replay = dlq_commands.choices["replay"]
    replay.add_argument("--reason", action="append", default=[], help="error code; repeatable")
    replay.add_argument("--id", action="append", default=[], help="request id; repeatable")
    replay.add_argument("--since", type=_utc_time, help=_TIME_HELP)
    replay.add_argument("--until", type=_utc_time, help=_TIME_HELP)
    replay.add_argument(
        "--reply-to", type=_reply_to, help="replace each request's surge-reply-to (or: redis)"
    )
    replay.add_argument(
        "--redis-url", type=_redis_url, help=f"to find results already written: {_REDIS_URL_HELP}"
    )
    replay.add_argument("--redis-prefix", help=_REDIS_PREFIX_HELP)
    replay.add_argument("--dry-run", action="store_true")

    commands.add_parser("schema", help="print JSON Schema of the wire contract")

    args = parser.parse_args(argv)
    if args.command in ("predict", "score", "shadow", "dlq", "lag") and (failed := _connect(args)):
        sys.exit(failed)
    try:
        sys.exit(_COMMANDS[args.command](args))
    except KeyboardInterrupt:  # Ctrl-C where a command has nothing of its own to say
        print(f"{args.command} interrupted", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, as shells report it


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    """How a client command reaches the cluster: a worker's settings file (its [kafka] table:
    bootstrap servers, TLS, SASL) and an address that overrides its bootstrap servers."""
    parser.add_argument(
        "-c", "--config", type=Path, help="the workers' TOML settings ([kafka]; lag: group too)"
    )
    parser.add_argument(
        "--bootstrap",
        type=_bootstrap,
        help="bootstrap servers (default: the settings', else 127.0.0.1:9092)",
    )


def _connect(args: argparse.Namespace) -> int:
    """Resolve `args.settings` (`-c`, and SURGE_* variables), and from them and `--bootstrap`
    `args.bootstrap` and `args.kafka_options` (TLS, SASL...); nonzero: the exit status."""
    from surge.config import ConfigError, load_settings

    try:
        args.settings = load_settings(args.config)
        options = args.settings.kafka.client_options()
    except (ConfigError, OSError, ValueError) as exc:  # OSError, ValueError: TLS files
        return _fail(str(exc))
    configured = options.pop("bootstrap_servers")
    args.bootstrap = args.bootstrap or configured
    args.kafka_options = options
    # For the commands that send: the largest record their producer may send, as the workers'.
    args.sending_options = options | {"max_request_size": args.settings.kafka.max_request_size}
    if hasattr(args, "redis_prefix"):  # where results are, as the workers write them
        redis = args.settings.redis
        if args.redis_prefix is None:
            args.redis_prefix = redis.key_prefix
        args.redis_options = {}
        if args.redis_url is None and redis.url:
            # With its credentials and TLS files; one connection for WAIT is the workers'.
            args.redis_url = redis.url
            args.redis_options = {
                k: v for k, v in redis.client_options().items() if k != "single_connection_client"
            }
    return 0


def _broker(args: argparse.Namespace) -> int:
    from surge.broker import NoidaError, PortInUse, start_noida, stop_noida

    # A service manager stops it with SIGTERM: the broker, in a process group of its own,
    # would outlive this process (holding the port and its data) unless stopped here too,
    # while it starts as much as once it serves.
    _sigterm_as_ctrl_c()
    try:
        process = start_noida(args.data_dir, args.port)
    except PortInUse as exc:
        return _fail(f"{exc}: pick another with --port")
    except (NoidaError, OSError) as exc:  # OSError: a --data-dir that cannot be made
        return _fail(str(exc))
    except KeyboardInterrupt:  # stopped while starting: start_noida stopped it again
        return 130  # 128 + SIGINT, as shells report it
    try:  # a stop may come as soon as the line is out
        print(
            f"embedded broker (noida-db) on 127.0.0.1:{args.port}, data in {args.data_dir}; "
            "Ctrl-C stops it",
            flush=True,
        )
        return process.wait()
    except KeyboardInterrupt:
        stop_noida(process)
        return 0


def _worker(args: argparse.Namespace) -> int:
    from surge.config import ConfigError, load_settings
    from surge.workers import run
    from surge.workers.logs import configure

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return _fail(str(exc))
    configure(settings.log.level, settings.log.format)
    if args.processes != "1":
        from surge.pool import run_pool

        return run_pool(settings, args.processes, args.config)
    run(settings)
    return 0


def _processes(value: str) -> str:
    if value == "gpus":
        return value
    if not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"{value!r} is neither a positive number nor 'gpus'")
    # Past a few per CPU, members only take each other's time (and memory, a model each):
    # a number this large is a slip of the keyboard, not a plan.
    most = _MEMBERS_PER_CPU * len(os.sched_getaffinity(0))
    if int(value) > most:
        raise argparse.ArgumentTypeError(
            f"{value} processes: at most {most} ({_MEMBERS_PER_CPU} per CPU this may use)"
        )
    return value


def _port(value: str) -> int:
    if value.isdigit() and 1 <= int(value) <= 65535:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r} is not a TCP port (1-65535)")


def _positive_rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        rate = math.nan
    if math.isfinite(rate) and rate > 0:
        return rate
    raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of requests a second")


def _positive_int(value: str) -> int:
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")


def _reply_to(value: str) -> str:
    import re

    from surge.config import TOPIC_NAME

    if value == "redis" or re.fullmatch(TOPIC_NAME, value):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is no Kafka topic name (nor 'redis')")


def _bootstrap(value: str) -> str:
    from surge.config import check_bootstrap

    try:
        return check_bootstrap(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _redis_url(value: str) -> str:
    from surge.config import check_redis_url

    try:
        return check_redis_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(value: str) -> float:
    """A timeout: a positive, finite number of seconds, at most a day (a request's deadline
    header is sent as now + timeout, and a deadline a day off is a typo)."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not (math.isfinite(seconds) and 0 < seconds <= _MAX_TIMEOUT_S):
        raise argparse.ArgumentTypeError(
            f"{value!r}: a timeout must be more than 0 and at most {_MAX_TIMEOUT_S:,} seconds"
        )
    return seconds


def _utc_time(value: str) -> datetime:
    """An ISO time; one without an offset is UTC, the zone `dlq inspect` shows times in."""
    try:
        time = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO time") from None
    return time if time.tzinfo else time.replace(tzinfo=UTC)


def _dtype(datatype: str) -> np.dtype[Any]:
    """The dtype `--datatype` names; raises ValueError unless the wire contract carries it."""
    from surge.schemas import TensorError, datatype_of

    try:
        dtype = np.dtype(datatype)
        datatype_of(dtype)
    except TensorError:
        raise ValueError(
            f"--datatype {datatype!r} has no wire datatype: use bool, (u)int8-64, float16-64 or str"
        ) from None
    except (TypeError, ValueError):
        raise ValueError(f"--datatype {datatype!r} is not a numpy dtype") from None
    return dtype


def _predict(args: argparse.Namespace) -> int:

    from surge.producers import NotSent, PredictionError, SurgeClient
    from surge.producers.scoring import json_values

    try:
        inputs = _inputs(args.input, args.datatype)
    except ValueError as exc:
        return _fail(str(exc))
    if args.via == "redis" and not args.redis_url:
        return _fail("--via redis needs --redis-url")

    async def run() -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout  # connecting counts too
        client = SurgeClient(
            args.bootstrap,
            redis_url=args.redis_url,
            redis_prefix=args.redis_prefix,
            redis_options=args.redis_options,
            kafka_options=args.sending_options,
        )
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await client.start()
            except TimeoutError:
                raise NotSent(f"no answer within {args.timeout:g}s") from None
            try:
                result = await client.predict(
                    args.model,
                    inputs,
                    version=args.version,
                    timeout=max(deadline - loop.time(), 0.001),
                    via=args.via,
                    topic=args.topic,
                )
            except PredictionError as exc:
                print(
                    json.dumps({"error": exc.message, "code": str(exc.code), "id": exc.request_id})
                )
                return 1
        finally:
            await client.close()
        outputs = {name: json_values(array) for name, array in result.outputs.items()}
        answer = {
            "id": result.id,
            "model_name": result.model_name,
            "model_version": result.model_version,
            "outputs": outputs,
        }
        print(json.dumps(answer, allow_nan=False))  # NaN and infinities are null, as JSON has it
        return 0

    try:
        return _explained(args, lambda: asyncio.run(run()))
    except NotSent as exc:
        return _fail(f"Kafka at {args.bootstrap}: {exc}")
    except TimeoutError:
        topic = args.topic or f"surge.requests.{args.model}"
        return _fail(
            f"no result within {args.timeout:g}s: is a worker serving {args.model!r} on {topic}?"
        )


def _inputs(items: list[str], datatype: str) -> dict[str, np.ndarray]:
    """`NAME=JSON` arguments as arrays, converted as a worker converts them (1.7 is no
    int64); raises ValueError saying which argument is wrong."""
    from surge.producers.scoring import input_array
    from surge.schemas import TensorError

    dtype = _dtype(datatype)
    inputs = {}
    for item in items:
        name, equals, raw = item.partition("=")
        if not (name and equals):
            raise ValueError(f"--input {item!r}: expected NAME=JSON, e.g. x=[[0.1, 0.2]]")
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # also: too deep, too many digits
            raise ValueError(f"--input {name}: not valid JSON ({exc})") from None
        try:
            inputs[name] = input_array(name, value, dtype)
        except (TensorError, RecursionError) as exc:
            why = str(exc).removeprefix(f"input {name!r}: ")
            raise ValueError(f"--input {name}: not an array of {dtype} ({why})") from None
    return inputs


def _explained(args: argparse.Namespace, run: Callable[[], int]) -> int:
    """Run a command that talks to Kafka (and Redis): one that cannot be reached is one line
    on stderr, not a traceback."""
    import logging

    from aiokafka.errors import KafkaError
    from redis.exceptions import RedisError

    # aiokafka logs each failed connection; the one that matters is reported below, once.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return run()
    except KafkaError as exc:
        return _fail(f"Kafka at {args.bootstrap}: {exc}")
    except RedisError as exc:  # its URL may hold a password: not repeated here
        return _fail(f"Redis: {exc}")


def _sigterm_as_ctrl_c() -> None:
    """Take SIGTERM, and SIGHUP (the terminal closed), as Ctrl-C: a SIGINT raised in its
    place, so that an event loop running then cancels its work as it does on Ctrl-C, rather
    than have KeyboardInterrupt thrown into whichever task is running. A broker in a session
    of its own never gets the terminal's SIGHUP: it would outlive the command, holding its
    port and data. A shell starts a background job (`surge broker &` in a script, `nohup`)
    with SIGINT ignored: Ctrl-C is taken back then, or a SIGTERM would do nothing; `nohup`
    ignores SIGHUP, which stays ignored."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signal.signal(signal.SIGHUP, lambda *_: signal.raise_signal(signal.SIGINT))


def _fail(message: str) -> int:
    """A mistake the user can fix: one line on stderr, no traceback."""
    print(message, file=sys.stderr)
    return 2


def _interrupted(lines: int, partial: Path | None = None) -> int:
    """Ctrl-C: how far the run got, and where its results so far are, in one line."""
    kept = _leftover(partial)
    where = f"; results so far in {kept}" if kept else ""
    print(f"interrupted after {lines:,} lines{where}", file=sys.stderr)
    return 130  # 128 + SIGINT, as shells report it


def _file_arguments(parser: argparse.ArgumentParser, *, window: int) -> None:
    """The options of the commands that send a JSON-lines file of requests."""
    parser.add_argument("model")
    parser.add_argument("input", type=Path, help='lines of named arrays, e.g. {"x": [[0.1, 0.2]]}')
    parser.add_argument("--datatype", default="float32", help=_DATATYPE_HELP)
    parser.add_argument("--topic", help="request topic (default: surge.requests.<model>)")
    _connection_arguments(parser)
    parser.add_argument("--via", choices=["kafka", "redis"], default="kafka")
    parser.add_argument("--redis-url", type=_redis_url, help=_REDIS_URL_HELP)
    parser.add_argument("--redis-prefix", help=_REDIS_PREFIX_HELP)
    parser.add_argument(
        "--window", type=_positive_int, default=window, help="lines per batch of requests"
    )
    parser.add_argument("--timeout", type=_seconds, default=60.0, help="seconds per batch")


def _with_file(
    args: argparse.Namespace, send: Callable[[SurgeClient, Iterator[bytes]], Awaitable[int]]
) -> int:
    """Open the requests file and a client, run `send` with its lines, and turn the mistakes
    a user can fix into one line. Ctrl-C is left to the caller, which knows how far it got."""

    from surge.producers import SurgeClient
    from surge.producers.scoring import file_lines

    if args.via == "redis" and not args.redis_url:
        return _fail("--via redis needs --redis-url")
    try:
        _dtype(args.datatype)
        source = args.input.open("rb")  # decoded line by line: one bad byte is one bad line
    except (ValueError, OSError) as exc:
        return _fail(str(exc))

    async def run() -> int:
        async with SurgeClient(
            args.bootstrap,
            redis_url=args.redis_url,
            redis_prefix=args.redis_prefix,
            redis_options=args.redis_options,
            kafka_options=args.sending_options,
        ) as client:
            return await send(client, file_lines(source))

    try:
        return _explained(args, lambda: asyncio.run(run()))
    except OSError as exc:  # an output that cannot be written
        return _fail(str(exc))
    finally:
        source.close()


def _overwrites(source: Path, target: Path) -> bool:
    try:
        return os.path.samefile(source, target)
    except OSError:  # one of them does not exist: nothing to overwrite
        return False


def _leftover(partial: Path | None) -> Path | None:
    """The results file of a run that did not finish, if it holds any; an empty one goes."""
    if partial is None or not partial.exists():
        return None
    if partial.stat().st_size:
        return partial
    partial.unlink()
    return None


def _answered_lines(partial: Path) -> ScoreReport:
    """The result lines a run that did not finish wrote, all complete, counted as its run
    counted them: a line cut short (the process killed as it wrote) is cut off, to be
    answered again. Read block by block and line by line: the file may be gigabytes."""
    from surge.producers.scoring import ScoreReport, tally_written

    with partial.open("r+b") as results:
        end = results.seek(0, os.SEEK_END)
        while end:
            start = max(end - _BLOCK, 0)
            results.seek(start)
            block = results.read(end - start)
            if (newline := block.rfind(b"\n")) >= 0:
                end = start + newline + 1
                break
            end = start
        results.truncate(end)
        results.seek(0)
        earlier = ScoreReport()
        tally_written(results, earlier)
    return earlier


def _score(args: argparse.Namespace) -> int:
    from rich.console import Console

    from surge.producers import ScoreReport, score_lines

    # Written beside the output and renamed when the run ends: a file by the output's name
    # is always a finished one.
    partial = args.output and args.output.with_name(args.output.name + ".partial")
    if partial and any(_overwrites(args.input, path) for path in (args.output, partial)):
        return _fail(f"{args.output}: that would overwrite the input; choose another -o")
    if args.resume and not partial:
        return _fail("--resume continues the results file of an earlier run: give it with -o")
    earlier = ScoreReport()  # the lines a run before this one answered, in its results file
    if kept := _leftover(partial):
        if not args.resume:
            return _fail(
                f"{kept} holds the results of a run that did not finish: --resume continues "
                "after them, or remove it to start again"
            )
        earlier = _answered_lines(kept)
    elif args.resume and args.output.exists():
        # Finished before: scored again, every line would go out again and replace it.
        print(f"{args.output} is complete: nothing to resume", file=sys.stderr)
        return 0
    done = earlier.lines
    report = ScoreReport()

    async def send(client: SurgeClient, lines: Iterator[bytes]) -> int:
        # Opened once the input is known to be readable: a typo must not empty a result file.
        with contextlib.ExitStack() as files:
            sink = sys.stdout
            if partial:
                sink = files.enter_context(partial.open("a" if done else "w", encoding="utf-8"))
            await score_lines(
                client,
                args.model,
                itertools.islice(lines, done, None),
                sink,
                dtype=args.datatype,
                window=args.window,
                timeout=args.timeout,
                version=args.version,
                via=args.via,
                topic=args.topic,
                report=report,
                first_line=done + 1,
            )
        if partial:
            os.replace(partial, args.output)
        resumed = ""
        if done:
            resumed = (
                f"resumed after {done:,} lines ({earlier.ok:,} ok, {earlier.errors:,} errors, "
                f"{earlier.timed_out:,} timed out): "
            )
        Console(stderr=True).print(
            f"{resumed}{report.lines:,} lines in {report.seconds:.1f} s ({report.rate:,.0f}/s): "
            f"{report.ok:,} ok, {report.errors:,} errors, {report.timed_out:,} timed out"
        )
        return 0 if report.ok == report.lines and earlier.ok == done else 1

    try:
        status = _with_file(args, send)
    except KeyboardInterrupt:
        return _interrupted(done + report.lines, partial)
    if kept := _leftover(partial):  # the run stopped on an error, which is reported
        print(f"results so far in {kept}", file=sys.stderr)
    return status


def _shadow(args: argparse.Namespace) -> int:
    from surge.producers.shadow import ShadowReport, compare_lines

    live = args.live or "latest"
    if args.live is not None and args.live == args.candidate:
        return _fail(f"--live and --candidate are both {args.live}: nothing to compare")
    report = ShadowReport()

    async def send(client: SurgeClient, lines: Iterator[bytes]) -> int:
        await compare_lines(
            client,
            args.model,
            lines,
            candidate=args.candidate,
            live=args.live,
            candidate_topic=args.candidate_topic or args.topic,
            live_topic=args.topic,
            dtype=args.datatype,
            window=args.window,
            timeout=args.timeout,
            via=args.via,
            report=report,
        )
        _show_shadow(report, live, args.candidate, args.window)
        # Nothing compared against another version is no evidence the candidate is fine.
        return 1 if report.failed or not report.both_ok else 0

    try:
        return _with_file(args, send)
    except KeyboardInterrupt:
        return _interrupted(report.lines)


def _show_shadow(report: ShadowReport, live: str, candidate: str, window: int) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)  # piped: don't squeeze it
    live, candidate = escape(live), escape(candidate)  # as typed: not markup
    console.print(
        f"{report.requests:,} requests ({report.bad_lines:,} bad lines skipped): "
        f"{report.both_ok:,} answered by both, {report.candidate_failed:,} failed on "
        f"{candidate} only, {report.live_failed:,} on {live} only, "
        f"{report.both_failed:,} on both"
    )
    for what, reasons in (
        ("bad lines", report.bad_line_reasons),
        (f"failed on {live}", report.live_errors),
        (f"failed on {candidate}", report.candidate_errors),
    ):
        for reason, count in reasons.most_common(3):
            console.print(f"  {what}: {count:,} × {escape(reason)}", highlight=False)
    _show_versions(console, report, live, candidate)
    table = Table(
        "output",
        "rows",
        "max |Δ|",
        "mean |Δ|",
        "top-1 agreement",
        "NaN/inf differ",
        "text differs",
        "signature differs",
    )
    for name, diff in report.outputs.items():
        agreement = diff.top_agreement
        table.add_row(
            escape(name),
            f"{diff.rows:,}",
            f"{diff.max_abs:.3g}",
            f"{diff.mean_abs:.3g}",
            "—" if agreement is None else f"{agreement:.1%}",
            f"{diff.nonfinite:,}",
            f"{diff.unequal_text:,}",
            f"{diff.mismatched:,}",
        )
    console.print(table)
    if report.live_seconds and report.candidate_seconds:
        console.print(
            f"a window of {window}, median time until all answered: {live} "
            f"{np.median(report.live_seconds) * 1000:.0f} ms, {candidate} "
            f"{np.median(report.candidate_seconds) * 1000:.0f} ms"
        )


def _show_versions(console: Console, report: ShadowReport, live: str, candidate: str) -> None:
    """Which versions answered each side; loudly, any live answer the candidate gave."""
    answered = [
        f"{side} by version {_versions(versions)}"
        for side, versions in (
            ("live", report.live_versions),
            ("candidate", report.candidate_versions),
        )
        if versions
    ]
    if answered:
        console.print("answered: " + "; ".join(answered), highlight=False)
    if report.too_large:
        console.print(
            f"[yellow]{report.too_large:,} refused by Kafka as too large for the topic "
            "(max.message.bytes)[/yellow]"
        )
    if report.same_version:
        console.print(
            f"[bold red]NOT COMPARED: {report.same_version:,} requests were answered on the "
            f"{live} side by the candidate's own version, {candidate}: the candidate against "
            "itself. Pass --live with the version to compare against.[/bold red]"
        )


def _versions(counts: Counter[str]) -> str:
    from rich.markup import escape

    return ", ".join(f"{escape(v)} ({count:,})" for v, count in sorted(counts.items()))


def _lag(args: argparse.Namespace) -> int:
    from surge.workers.lag import configured_topics, group_lag

    settings = args.settings
    kafka = {"bootstrap_servers": args.bootstrap, **args.kafka_options}
    group = args.group or settings.worker.group_id
    reset = settings.worker.auto_offset_reset

    def show() -> int:
        configured = configured_topics(settings.worker)
        lags = asyncio.run(group_lag(kafka, group, configured=configured, reset=reset))
        if not lags:  # no committed offsets nor configured topics: no error
            print(f"group {group!r} has committed no offsets: no lag to show", file=sys.stderr)
            return 0
        if args.json:
            for lag in lags:
                print(json.dumps(dataclasses.asdict(lag)))
            return 0
        _show_lag(lags, group, reset)
        return 0

    return _explained(args, show)


def _show_lag(lags: list[TopicLag], group: str, reset: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("topic", "partitions", "lag (records)", "oldest waiting", title=group)
    for lag in lags:
        table.add_row(lag.topic, str(lag.partitions), f"{lag.records:,}", _age(lag))
    console = Console(width=None if sys.stdout.isatty() else 200)  # piped: don't squeeze it
    console.print(table)
    uncommitted = sum(lag.uncommitted for lag in lags)
    if uncommitted:
        counted = "as 0 waiting" if reset == "latest" else "from the log's start"
        console.print(
            f"partitions with nothing committed: {uncommitted:,}, counted {counted} "
            f"(auto_offset_reset = {reset})"
        )
    if any(lag.age_unknown for lag in lags):
        console.print(
            "unknown: the oldest waiting record of a partition could not be read in time, "
            "or carries no timestamp"
        )


def _age(lag: TopicLag) -> str:
    if lag.age_unknown:
        return "unknown"
    return "—" if lag.oldest_s is None else f"{lag.oldest_s:,.1f} s"


def _demo(args: argparse.Namespace) -> int:
    from surge.broker import NoidaError
    from surge.demo import DemoError, run_demo

    # Stopped with SIGTERM as with Ctrl-C: its worker, and its broker in a process group of its
    # own, would otherwise outlive it (a port, tens of MB of data and a worker left behind).
    _sigterm_as_ctrl_c()
    try:
        return run_demo(requests=args.requests, rate=args.rate)
    except NoidaError as exc:  # the broker could not start: set-up, as a mistake is
        return _fail(str(exc))
    except DemoError as exc:  # the worker died, or answered nothing: a failed demo
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # everything it started is stopped by now
        print("demo interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it


def _dlq(args: argparse.Namespace) -> int:
    from surge.producers.dead_letters import TopicUnreadable

    try:
        return _explained(args, lambda: _dlq_action(args))
    except TopicUnreadable as exc:
        return _fail(f"Kafka at {args.bootstrap}: {exc}")
    except OSError as exc:
        return _fail(f"Kafka at {args.bootstrap} or Redis: {exc or type(exc).__name__}")
    except KeyboardInterrupt:
        # A replay stopped part way: a rerun skips what was answered or marked replayed.
        print(f"dlq {args.action} interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it


def _dlq_action(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from surge.producers import dead_letters

    # A summary reads headers only: the bodies, up to a message's size each, stay unread.
    inspecting = args.action == "inspect"
    letters = asyncio.run(
        dead_letters.load(args.bootstrap, args.topic, values=not inspecting, **args.kafka_options)
    )
    console = Console(width=None if sys.stdout.isatty() else 200)  # piped: don't squeeze it
    if args.action == "inspect":
        table = Table(title=f"{args.topic}: {len(letters):,} dead letters")
        for column in ("reason", "count", "replayed", "source topics", "first", "last"):
            table.add_column(column, no_wrap=True)
        table.add_column("example")
        # Every text here comes from the records (a client's header, repeated in a message):
        # printed as it is, never read as markup.
        for code, entry in sorted(dead_letters.summarise(letters).items()):
            sources = ", ".join(f"{t} ({n})" for t, n in entry["sources"].most_common(3))
            table.add_row(
                escape(code),
                f"{entry['count']:,}",
                f"{entry['replayed']:,}",
                escape(sources),
                _iso(entry["first_ms"]),
                _iso(entry["last_ms"]),
                escape(entry["example"] or ""),
            )
        console.print(table)
        return 0
    chosen = dead_letters.select(
        letters, reasons=args.reason, since=args.since, until=args.until, ids=args.id
    )
    report = asyncio.run(
        dead_letters.replay(
            args.bootstrap,
            args.topic,
            chosen,
            reply_to=args.reply_to,
            redis_url=args.redis_url,
            redis_prefix=args.redis_prefix,
            redis_options=args.redis_options,
            dry_run=args.dry_run,
            kafka_options=args.sending_options,
        )
    )
    verb = "would replay" if args.dry_run else "replayed"
    console.print(
        f"selected {report.selected:,}: {verb} {report.replayed:,}, skipped "
        f"{report.already_answered:,} already answered, {report.replayed_before:,} replayed "
        f"before, {report.repeated:,} repeated, {report.unroutable:,} without a source topic, "
        f"{report.without_body:,} without a body, {report.without_reply_to:,} without a reply "
        f"target, {report.reply_topic_gone:,} whose reply topic is gone, "
        f"{report.refused.total():,} refused by Kafka"
    )
    for reason, count in report.refused.most_common():
        console.print(f"[red]{count:,} refused by Kafka: {escape(reason)}[/red]")
    if report.unmarked:
        console.print(
            f"[yellow]{report.unmarked:,} replayed but not marked so in {escape(args.topic)}: "
            "a later replay may send them again before they are answered[/yellow]"
        )
    if report.without_reply_to:
        console.print(
            f"[yellow]{report.without_reply_to:,} have no surge-reply-to: pass --reply-to to "
            "replay them[/yellow]"
        )
    if report.reply_topic_gone:
        console.print(
            f"[yellow]{report.reply_topic_gone:,} reply to a topic that no longer exists (a "
            "client's own, gone when it closed): pass --reply-to to replay them[/yellow]"
        )
    if report.unverified:
        console.print(
            f"[yellow]{report.unverified:,} reply to Redis: pass --redis-url to skip those "
            "already answered[/yellow]"
        )
    return 1 if report.not_replayable else 0


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def _schema(args: argparse.Namespace) -> int:
    from surge.schemas import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


_COMMANDS = {
    "broker": _broker,
    "worker": _worker,
    "predict": _predict,
    "score": _score,
    "shadow": _shadow,
    "lag": _lag,
    "demo": _demo,
    "dlq": _dlq,
    "schema": _schema,
}
