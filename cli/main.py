"""The `surge` command: broker, worker, predict, demo, dlq, schema."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="surge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    broker = commands.add_parser("broker", help="run the embedded zero-set-up broker (noida-db)")
    broker.add_argument("--port", type=int, default=9092)
    broker.add_argument("--data-dir", type=Path, default=Path(".noida-db"))

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
    predict.add_argument("--datatype", default="float32", help="numpy dtype of the inputs")
    predict.add_argument("--version")
    predict.add_argument("--topic", help="request topic (default: surge.requests.<model>)")
    predict.add_argument("--bootstrap", default="127.0.0.1:9092")
    predict.add_argument("--via", choices=["kafka", "redis"], default="kafka")
    predict.add_argument("--redis-url")
    predict.add_argument("--timeout", type=float, default=30.0)

    demo = commands.add_parser("demo", help="broker + worker + example model + a burst, in one go")
    demo.add_argument("--requests", type=int, default=20_000)
    demo.add_argument("--rate", type=float, default=2_000.0, help="steady-load phase, requests/s")

    dlq = commands.add_parser("dlq", help="inspect or replay a dead-letter topic")
    dlq_commands = dlq.add_subparsers(dest="action", required=True)
    for action, text in (("inspect", "summarise by reason"), ("replay", "re-publish to source")):
        sub = dlq_commands.add_parser(action, help=text)
        sub.add_argument("--topic", default="surge.dead-letters")
        sub.add_argument("--bootstrap", default="127.0.0.1:9092")
    replay = dlq_commands.choices["replay"]
    replay.add_argument("--reason", action="append", default=[], help="error code; repeatable")
    replay.add_argument("--id", action="append", default=[], help="request id; repeatable")
    replay.add_argument("--since", type=datetime.fromisoformat, help="ISO time, inclusive")
    replay.add_argument("--until", type=datetime.fromisoformat, help="ISO time, inclusive")
    replay.add_argument("--reply-to", help="replace each request's surge-reply-to")
    replay.add_argument("--redis-url", help="to find results already written to Redis")
    replay.add_argument("--dry-run", action="store_true")

    commands.add_parser("schema", help="print JSON Schema of the wire contract")

    args = parser.parse_args(argv)
    sys.exit(_COMMANDS[args.command](args))


def _broker(args: argparse.Namespace) -> int:
    from surge.broker import start_noida, stop_noida

    process = start_noida(args.data_dir, args.port)
    print(
        f"embedded broker (noida-db) on 127.0.0.1:{args.port}, data in {args.data_dir}; "
        "Ctrl-C stops it"
    )
    try:
        return process.wait()
    except KeyboardInterrupt:
        stop_noida(process)
        return 0


def _worker(args: argparse.Namespace) -> int:
    from surge.config import ConfigError, load_settings
    from surge.workers import serve
    from surge.workers.logs import configure

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure(settings.log.level, settings.log.format)
    if args.processes != "1":
        from surge.pool import run_pool

        return run_pool(settings, args.processes, args.config)
    asyncio.run(serve(settings))
    return 0


def _processes(value: str) -> str:
    if value == "gpus" or (value.isdigit() and int(value) >= 1):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is neither a positive number nor 'gpus'")


def _predict(args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError
    from redis.exceptions import RedisError

    from surge.producers import PredictionError, SurgeClient

    try:
        inputs = _inputs(args.input, args.datatype)
    except ValueError as exc:
        return _fail(str(exc))
    if args.via == "redis" and not args.redis_url:
        return _fail("--via redis needs --redis-url")

    async def run() -> int:
        async with SurgeClient(args.bootstrap, redis_url=args.redis_url) as client:
            try:
                result = await client.predict(
                    args.model,
                    inputs,
                    version=args.version,
                    timeout=args.timeout,
                    via=args.via,
                    topic=args.topic,
                )
            except PredictionError as exc:
                print(
                    json.dumps({"error": exc.message, "code": str(exc.code), "id": exc.request_id})
                )
                return 1
        outputs = {name: array.tolist() for name, array in result.outputs.items()}
        print(
            json.dumps(
                {
                    "id": result.id,
                    "model_name": result.model_name,
                    "model_version": result.model_version,
                    "outputs": outputs,
                }
            )
        )
        return 0

    try:
        return asyncio.run(run())
    except TimeoutError:
        topic = args.topic or f"surge.requests.{args.model}"
        return _fail(
            f"no result within {args.timeout:g}s: is a worker serving {args.model!r} on {topic}?"
        )
    except KafkaError as exc:
        return _fail(f"Kafka at {args.bootstrap}: {exc}")
    except RedisError as exc:  # its URL may hold a password: not repeated here
        return _fail(f"Redis: {exc}")


def _inputs(items: list[str], datatype: str) -> dict[str, np.ndarray]:
    """`NAME=JSON` arguments as arrays; raises ValueError saying which argument is wrong."""
    try:
        dtype = np.dtype(datatype)
    except TypeError:
        raise ValueError(f"--datatype {datatype!r} is not a numpy dtype") from None
    inputs = {}
    for item in items:
        name, equals, raw = item.partition("=")
        if not (name and equals):
            raise ValueError(f"--input {item!r}: expected NAME=JSON, e.g. x=[[0.1, 0.2]]")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--input {name}: not valid JSON ({exc})") from None
        try:
            inputs[name] = np.asarray(value, dtype=dtype)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--input {name}: not an array of {dtype} ({exc})") from None
    return inputs


def _fail(message: str) -> int:
    """A mistake the user can fix: one line on stderr, no traceback."""
    print(message, file=sys.stderr)
    return 2


def _demo(args: argparse.Namespace) -> int:
    from surge.demo import run_demo

    return run_demo(requests=args.requests, rate=args.rate)


def _dlq(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from surge.producers import dead_letters

    letters = asyncio.run(dead_letters.load(args.bootstrap, args.topic))
    console = Console(width=None if sys.stdout.isatty() else 200)  # piped: don't squeeze it
    if args.action == "inspect":
        table = Table(title=f"{args.topic}: {len(letters):,} dead letters")
        for column in ("reason", "count", "source topics", "first", "last"):
            table.add_column(column, no_wrap=True)
        table.add_column("example")
        for code, entry in sorted(dead_letters.summarise(letters).items()):
            sources = ", ".join(f"{t} ({n})" for t, n in entry["sources"].most_common(3))
            table.add_row(
                code,
                f"{entry['count']:,}",
                sources,
                _iso(entry["first_ms"]),
                _iso(entry["last_ms"]),
                entry["example"] or "",
            )
        console.print(table)
        return 0
    chosen = dead_letters.select(
        letters, reasons=args.reason, since=args.since, until=args.until, ids=args.id
    )
    report = asyncio.run(
        dead_letters.replay(
            args.bootstrap,
            chosen,
            reply_to=args.reply_to,
            redis_url=args.redis_url,
            dry_run=args.dry_run,
        )
    )
    verb = "would replay" if args.dry_run else "replayed"
    console.print(
        f"selected {report.selected:,}: {verb} {report.replayed:,}, skipped "
        f"{report.already_answered:,} already answered, {report.repeated:,} repeated, "
        f"{report.unroutable:,} without a source topic, {report.without_body:,} without a body, "
        f"{report.without_reply_to:,} without a reply target"
    )
    if report.without_reply_to:
        console.print(
            f"[yellow]{report.without_reply_to:,} have no surge-reply-to: pass --reply-to to "
            "replay them[/yellow]"
        )
    if report.unverified:
        console.print(
            f"[yellow]{report.unverified:,} reply to Redis: pass --redis-url to skip those "
            "already answered[/yellow]"
        )
    return 0


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds")


def _schema(args: argparse.Namespace) -> int:
    from surge.schemas import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


_COMMANDS = {
    "broker": _broker,
    "worker": _worker,
    "predict": _predict,
    "demo": _demo,
    "dlq": _dlq,
    "schema": _schema,
}
