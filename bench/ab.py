"""Two versions of the Surge worker end to end, interleaved on one broker: this checkout
against a git revision, with the no-guarantee `getmany` loop as a yardstick.

    python -m bench.ab REV [--rounds 7] [--requests 50000] [--delivery exactly_once]
                           [--event-loop asyncio]

Each round drains the same burst as `bench.compare` (msgpack MLP requests on 8 partitions)
three times: with the worker of REV, with this checkout's, and with the loop; the first two
swap places every round, so drift of the machine hits both alike. REV's worker runs from a
git worktree of it, imported the way `pip install -e .` lays this checkout out. Prints each
round and the medians, and the ratio of the two workers round by round: on these machines a
difference of 10-20% between two versions shows only this way, not across separate runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench import compare
from bench.common import kafka_broker, scratch_dir
from surge.examples import write_mlp

console = Console()
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("rev", help="the git revision to compare this checkout against")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument(
        "--delivery", choices=("at_least_once", "exactly_once"), default="at_least_once"
    )
    parser.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="this checkout's worker's (REV's runs on its default; the loop on uvloop)",
    )
    args = parser.parse_args()
    worker = "surge-eos" if args.delivery == "exactly_once" else "surge"
    kinds = {c.kind: c for c in compare.CONTENDERS}
    model_root = scratch_dir("surge-ab-models-")
    model_path = write_mlp(model_root)
    names = (args.rev, "this checkout", "no-guarantee loop")
    runs: dict[str, list[compare.Result]] = {name: [] for name in names}
    with _installed(args.rev) as site, kafka_broker(None) as bootstrap:
        for round_ in range(args.rounds):
            order = names if round_ % 2 == 0 else (names[1], names[0], names[2])
            for name in order:
                contender = kinds["fast" if name == names[2] else worker]
                with _python_path(site if name == names[0] else None):
                    event_loop = args.event_loop if name == names[1] else "uvloop"
                    result = compare._run(
                        contender, bootstrap, model_root, model_path, args.requests, event_loop
                    )
                runs[name].append(result)
                console.print(
                    f"  round {round_ + 1}, {name}: {result.throughput:,.0f} req/s, "
                    f"{result.cpu_us_per_request:.1f} µs CPU/req"
                )
    _report(runs, names)


def _report(runs: dict[str, list[compare.Result]], names: tuple[str, str, str]) -> None:
    table = Table(title="Surge worker, two versions, interleaved rounds")
    for column in ("worker", "median throughput", "median CPU µs/req", "÷ the loop, by round"):
        table.add_column(column, justify="right")
    loop = runs[names[2]]
    for name in names:
        results = runs[name]
        ratios = [r.throughput / f.throughput for r, f in zip(results, loop, strict=True)]
        table.add_row(
            name,
            f"{np.median([r.throughput for r in results]):,.0f}/s",
            f"{np.median([r.cpu_us_per_request for r in results]):.1f}",
            "—" if name == names[2] else " ".join(f"{x:.2f}" for x in ratios),
        )
    console.print(table)
    new_over_old = [
        new.throughput / old.throughput
        for new, old in zip(runs[names[1]], runs[names[0]], strict=True)
    ]
    console.print(
        f"this checkout ÷ {names[0]}, by round: "
        + ", ".join(f"{x:.2f}" for x in new_over_old)
        + f" (median {np.median(new_over_old):.2f})"
    )


@contextlib.contextmanager
def _installed(rev: str) -> Iterator[Path]:
    """A worktree of `rev`, and a directory that imports it as the `surge` package, laid out
    by its own pyproject.toml as an editable install lays out this checkout."""
    scratch = scratch_dir("surge-ab-")
    tree, site = scratch / "tree", scratch / "site"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(tree), rev],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    try:
        mapping = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]
        folders: dict[str, str] = mapping["package-dir"]
        shutil.copytree(tree / folders["surge"], site / "surge")
        for package, folder in folders.items():
            parent, _, name = package.rpartition(".")
            if parent == "surge":  # nested ones come with their parent's folder
                (site / "surge" / name).symlink_to(tree / folder)
        yield site
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _python_path(site: Path | None) -> Iterator[None]:
    """Workers started inside import `surge` from `site` (None: from this checkout)."""
    before = os.environ.get("PYTHONPATH")
    if site is not None:
        os.environ["PYTHONPATH"] = str(site)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


if __name__ == "__main__":
    main()
