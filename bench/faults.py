"""Run the fault tests on real services and print their figures as a table.

    python -m bench.faults            # full counts (CI=true scales them down)

Each scenario in tests/faults/ reports requests, lost, duplicated and recovery time; this
collects them into bench/out/faults.json and prints the Markdown table the README carries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import OUT

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    report = Path(tempfile.mkstemp(prefix="surge-faults-", suffix=".jsonl")[1])
    env = os.environ | {"SURGE_FAULT_REPORT": str(report)}
    status = subprocess.call(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults"],
        cwd=ROOT,
        env=env,
    )
    rows = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    OUT.mkdir(exist_ok=True)
    (OUT / "faults.json").write_text(json.dumps(rows, indent=2))
    table = Table(title="Surge under faults (Apache Kafka, real processes)")
    for column in ("fault", "injected", "requests", "lost", "duplicated", "recovery"):
        table.add_column(column)
    lines = [
        "| fault | injected | requests | lost | duplicated | recovery | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r["scenario"],
            r["injected"],
            f"{r['requests']:,}",
            str(r["lost"]),
            str(r["duplicated"]),
            f"{r['recovery_s']:.1f} s",
        ]
        table.add_row(*cells)
        lines.append("| " + " | ".join([*cells, r["note"]]) + " |")
    Console().print(table)
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
