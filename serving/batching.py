"""Adaptive batching without a cork: requests that arrive while the model is busy share its next call.

BentoML's ``batchable=True`` dispatcher learns a wait time from the queueing it saw under load and
keeps holding single requests that long afterwards; here a request only ever waits for the model
call in progress. The batch size follows the load: 1 when idle, up to ``max_images`` when busy.
A request is never split, so all its answers come from one model version.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import numpy as np


class MicroBatcher:
    """Batch concurrent calls of ``run`` (images (n, 28, 28) -> n answers), one model call at a time."""

    def __init__(self, run: Callable[[np.ndarray], Sequence[Any]], max_images: int = 1000) -> None:
        self.run = run
        self.max_images = max_images
        self.model_calls = 0
        self.images = 0
        self._pending: collections.deque[tuple[np.ndarray, asyncio.Future]] = collections.deque()
        self._draining: asyncio.Task | None = None
        self._limiter: anyio.CapacityLimiter | None = None

    async def submit(self, images: np.ndarray) -> list[Any]:
        """The answers for ``images``, computed in a model call shared with concurrent requests."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((images, future))
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        try:
            while self._pending:
                taken, count = [], 0
                while self._pending and (not taken or count + len(self._pending[0][0]) <= self.max_images):
                    images, future = self._pending.popleft()
                    if future.done():  # the client went away
                        continue
                    taken.append((images, future))
                    count += len(images)
                if not taken:
                    continue
                batch = taken[0][0] if len(taken) == 1 else np.concatenate([images for images, _ in taken])
                try:
                    answers = await anyio.to_thread.run_sync(self.run, batch, limiter=self._limiter)
                except Exception as err:  # every request of the batch gets the error
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(err)
                    continue
                self.model_calls += 1
                self.images += count
                start = 0
                for images, future in taken:
                    if not future.done():
                        future.set_result(list(answers[start : start + len(images)]))
                    start += len(images)
        finally:
            self._draining = None

    def stats(self) -> dict[str, float]:
        return {
            "model_calls": self.model_calls,
            "images": self.images,
            "mean_batch": round(self.images / self.model_calls, 2) if self.model_calls else 0.0,
        }
