"""Log lines stay whole when processes share one stderr, as the members of a pool do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_WRITER = """
import structlog
from surge.workers.logs import configure
configure("info", "json")
log = structlog.get_logger("test")
for i in range(5000):
    log.info("model_loading", model="mlp", path="/models/mlp/1/model.onnx" * 4, i=i)
"""


def test_processes_sharing_stderr_never_split_a_line(tmp_path: Path) -> None:
    log = tmp_path / "shared.log"
    with log.open("ab") as shared:
        writers = [
            subprocess.Popen([sys.executable, "-c", _WRITER], stderr=shared) for _ in range(3)
        ]
        for writer in writers:
            assert writer.wait(60) == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 15_000
    assert all(json.loads(line)["event"] == "model_loading" for line in lines)
