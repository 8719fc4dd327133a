"""A faust-streaming agent scoring one event at a time, as the faust documentation shows.

python -m bench.peers.agent BOOTSTRAP TOPIC REPLY_TOPIC MODEL_PATH
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time

import faust
import numpy as np

from bench.peers.loops import session
from bench.peers.wire import REPLY_HEADERS, decode, reply
from surge.workers.worker import collect_young_less_often

bootstrap, topic, reply_topic, model = sys.argv[1:5]
model_session = session(model)
app = faust.App(
    f"peer-faust-{time.time_ns()}",
    broker=f"kafka://{bootstrap}",
    value_serializer="raw",
    key_serializer="raw",
    web_enabled=False,
    store="memory://",
    datadir=tempfile.mkdtemp(prefix="surge-bench-faust-"),
    topic_partitions=8,
    consumer_auto_offset_reset="earliest",
)
requests = app.topic(topic, value_serializer="raw", key_serializer="raw")
replies = app.topic(reply_topic, value_serializer="raw", key_serializer="raw")


@app.agent(requests)
async def score(stream: faust.Stream) -> None:
    async for event in stream.events():
        request = decode(event.value)
        x = np.frombuffer(request.inputs[0].data, np.float32).reshape(1, -1)
        y = model_session.run(None, {"x": x})[0]
        await replies.send(key=event.key, value=reply(request.id, y[0]), headers=REPLY_HEADERS)


@app.task
async def _started() -> None:
    gc.freeze()  # as a Surge worker does once started


if __name__ == "__main__":
    collect_young_less_often()  # the worker's collector settings: the comparison is of designs
    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn", "--without-web"]
    app.main()
