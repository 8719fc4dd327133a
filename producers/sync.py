"""A blocking wrapper for callers without an event loop: the client runs on a private thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np

from surge.producers.client import ClientClosed, Result, SurgeClient
from surge.producers.requests import Prediction

T = TypeVar("T")
# close() waits this long for calls on other threads to end (the client fails them at once);
# any still running then is cancelled, never left blocking its thread.
_CLOSE_WAIT_S = 5.0


class SyncClient:
    """`SurgeClient` with blocking methods. Use as a context manager, or call `close()`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._closing = self._closed = False
        self._calls: set[concurrent.futures.Future[Any]] = set()  # under way, on any thread
        # Held from a call's closed check until its future is in `_calls`, and by close()
        # as it ends calls: a call is either refused or among those close() waits for.
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="surge-client", daemon=True
        )
        self._thread.start()
        try:
            self._client = self._call(self._make(*args, **kwargs))
        except BaseException:  # nobody can close() a client that was never made
            self._stop_loop()
            raise

    async def _make(self, *args: Any, **kwargs: Any) -> SurgeClient:
        client = SurgeClient(*args, **kwargs)
        await client.start()
        return client

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._closed:
                coroutine.close()
                raise ClientClosed("the client is closed")
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
            self._calls.add(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise ClientClosed("the client was closed during the request") from None
        except BaseException:  # Ctrl-C while waiting: the call stops sending, and waiting
            future.cancel()
            raise
        finally:
            self._calls.discard(future)

    def submit(self, model: str, inputs: Mapping[str, np.ndarray], **kwargs: Any) -> str:
        return self._call(self._client.submit(model, inputs, **kwargs))

    def predict(self, model: str, inputs: Mapping[str, np.ndarray], **kwargs: Any) -> Prediction:
        return self._call(self._client.predict(model, inputs, **kwargs))

    def predict_many(
        self, model: str, batch: Iterable[Mapping[str, np.ndarray]], **kwargs: Any
    ) -> list[Result]:
        return self._call(self._client.predict_many(model, batch, **kwargs))

    def close(self) -> None:
        """Calls under way on other threads raise ClientClosed. Closing again does nothing."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        try:
            self._call(self._client.close())
        finally:
            with self._lock:
                self._closed = True
                calls = list(self._calls)
            _, running = concurrent.futures.wait(calls, timeout=_CLOSE_WAIT_S)
            for future in running:
                future.cancel()
            if running:  # a cancellation is only scheduled: let the calls unwind on the loop
                asyncio.run_coroutine_threadsafe(_unwind(), self._loop).result()
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _unwind() -> None:
    """Until the loop's other tasks end (those just cancelled among them), for a while."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if others:
        await asyncio.wait(others, timeout=_CLOSE_WAIT_S)
    await asyncio.get_running_loop().shutdown_asyncgens()
