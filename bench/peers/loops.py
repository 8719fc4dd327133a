"""Hand-written aiokafka workers, as a team would write them without Surge.

    python -m bench.peers.loops KIND BOOTSTRAP TOPIC REPLY_TOPIC MODEL_PATH

KIND:
  per-request   getmany; the model runs once per request; send() per reply; auto-commit
  batch-send    getmany; one model call per fetch; send() per reply; auto-commit
  alo           as batch-send, then await every reply's ack and commit (at-least-once, serial)
  alo-batch     as fast, then await the record batches' acks and commit (at-least-once,
                serial; acks=all, idempotent, as Surge writes)
  fast          getmany; one model call per fetch; replies as one record batch per
                partition (create_batch/send_batch); no commits, no acks awaited (no guarantees)

Every kind takes up to 1,024 records per getmany, as a Surge worker does (max_poll_records),
and runs on the event loop BENCH_EVENT_LOOP names (uvloop, as the worker's default, or asyncio).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from bench.peers.wire import REPLY_HEADERS, Request, decode, reply
from surge.workers.worker import collect_young_less_often, run_on

FETCH = 1024


def session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


async def main(kind: str, bootstrap: str, topic: str, reply_topic: str, model: str) -> None:
    model_session = session(model)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"peer-{kind}-{time.time_ns()}",
        auto_offset_reset="earliest",
        enable_auto_commit=kind in ("per-request", "batch-send"),
    )
    guarantees = kind in ("alo", "alo-batch")
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all" if guarantees else 1,
        enable_idempotence=guarantees,
        linger_ms=0,  # as a Surge worker writes: a record batch waits for nothing
        max_batch_size=256 * 1024,
    )
    await consumer.start()
    await producer.start()
    gc.freeze()  # as a Surge worker does once started
    print("ready", flush=True)
    while True:
        fetched = await consumer.getmany(timeout_ms=100, max_records=FETCH)
        if not fetched:
            continue
        if kind == "per-request":
            for records in fetched.values():
                for record in records:
                    request = decode(record.value)
                    x = np.frombuffer(request.inputs[0].data, np.float32).reshape(1, -1)
                    y = model_session.run(None, {"x": x})[0]
                    await producer.send(
                        reply_topic, reply(request.id, y[0]), key=record.key, headers=REPLY_HEADERS
                    )
            continue
        records = [r for rs in fetched.values() for r in rs]
        requests = [decode(r.value) for r in records]
        x = np.frombuffer(b"".join(q.inputs[0].data for q in requests), np.float32)
        y = model_session.run(None, {"x": x.reshape(len(requests), -1)})[0]
        if kind in ("fast", "alo-batch"):
            deliveries = await _send_batches(producer, reply_topic, fetched, requests, y)
            if kind == "alo-batch":
                await asyncio.gather(*deliveries)
                await consumer.commit()
            continue
        deliveries = [
            await producer.send(reply_topic, reply(q.id, row), key=r.key, headers=REPLY_HEADERS)
            for r, q, row in zip(records, requests, y, strict=True)
        ]
        if guarantees:
            await asyncio.gather(*deliveries)
            await consumer.commit()


async def _send_batches(
    producer: AIOKafkaProducer,
    reply_topic: str,
    fetched: dict[TopicPartition, list[ConsumerRecord]],
    requests: list[Request],
    y: np.ndarray,
) -> list[asyncio.Future[object]]:
    """One record batch per input partition, sent to the reply partition of the same number;
    their delivery futures."""
    now_ms = int(time.time() * 1000)
    deliveries = []
    i = 0
    for tp, records in fetched.items():
        batch = producer.create_batch()
        for record in records:
            value = reply(requests[i].id, y[i])
            i += 1
            if batch.append(key=record.key, value=value, timestamp=now_ms, headers=REPLY_HEADERS):
                continue
            deliveries.append(await producer.send_batch(batch, reply_topic, partition=tp.partition))
            batch = producer.create_batch()
            batch.append(key=record.key, value=value, timestamp=now_ms, headers=REPLY_HEADERS)
        deliveries.append(await producer.send_batch(batch, reply_topic, partition=tp.partition))
    return deliveries


if __name__ == "__main__":
    collect_young_less_often()  # the worker's collector settings: the comparison is of designs
    run_on(os.environ.get("BENCH_EVENT_LOOP", "uvloop"), main(*sys.argv[1:6]))  # and its loop
