"""Hot reload under live traffic: a new version is loaded, warmed up and served without a
restart; the old one is drained and unloaded; no request fails during the switch."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from surge.config import Settings
from surge.examples import write_mlp
from surge.producers import SurgeClient
from surge.workers import Worker
from tests.conftest import make_settings

pytestmark = pytest.mark.integration


def _publish_version(model_root: Path, version: int, seed: int, staging: Path) -> None:
    """Deploy as operators should: write elsewhere, then rename into place atomically."""
    write_mlp(staging, version, seed=seed)
    os.rename(staging / "mlp" / str(version), model_root / "mlp" / str(version))


async def test_new_and_removed_versions_switch_without_failures(
    kafka: str, model_root: Path, tmp_path: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    worker = await run_worker(make_settings(kafka, model_root, None))
    prefix = worker.settings.worker.topic_prefix
    versions: Counter[str] = Counter()
    calls: list[frozenset[str]] = []  # the versions that answered each call of 20 requests
    stop = asyncio.Event()
    x = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)

    async def traffic() -> None:
        async with SurgeClient(kafka, topic_prefix=prefix) as client:
            while not stop.is_set():
                results = await client.predict_many("mlp", [{"x": x}] * 20, timeout=30)
                served = [r.model_version for r in results]  # type: ignore[union-attr]
                versions.update(served)
                calls.append(frozenset(served))  # type: ignore[arg-type]

    async def served_version(version: str, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not calls or calls[-1] != {version}:
                await asyncio.sleep(0.05)

    load = asyncio.create_task(traffic())
    await served_version("1")
    _publish_version(model_root, 2, seed=1, staging=tmp_path / "staging")
    await served_version("2")
    assert sorted(worker._repository.served) == [("mlp", 2)]  # v1 retired under latest policy

    shutil.rmtree(model_root / "mlp" / "2")  # roll back: v1 is the latest again
    await served_version("1")
    await asyncio.sleep(0.5)
    stop.set()
    await load  # raises if any request failed or timed out

    assert versions["1"]
    assert versions["2"]
    # Around a switch one call may mix versions (its requests cross partitions); calls served
    # by a single version must go 1, 2, 1 and never flap back.
    pure = [next(iter(c)) for c in calls if len(c) == 1]
    switches = [v for i, v in enumerate(pure) if i == 0 or pure[i - 1] != v]
    assert switches == ["1", "2", "1"], "each switch happens once, with no flapping"


async def test_a_model_whose_name_makes_no_topic_is_served_on_shared_topics(
    kafka: str, model_root: Path, run_worker: Callable[[Settings], Worker]
) -> None:
    shutil.copytree(model_root / "mlp", model_root / "m l p")  # Kafka refuses "prefix.m l p"
    shared = f"test.shared.{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka, model_root, None, SURGE_WORKER__SHARED_TOPICS=f'["{shared}"]')
    worker = await run_worker(settings)
    assert sorted(worker._repository.served) == [("m l p", 1), ("mlp", 1)]
    x = {"x": np.ones((1, 32), np.float32)}
    async with SurgeClient(kafka, topic_prefix=settings.worker.topic_prefix) as client:
        by_own_topic = await client.predict("mlp", x, timeout=30)
        by_shared_topic = await client.predict("m l p", x, timeout=30, topic=shared)
    assert by_own_topic.model_name == "mlp"
    assert by_shared_topic.model_name == "m l p"
