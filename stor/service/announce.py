"""Stor's `rabbitmq_uri`: every requested sha (GET and HEAD of `/{sha}`, found or not) published
to a durable topic exchange with Stor's routing key, the sha as the body, as Stor 1.5 did.

These are hints, so they never touch a request: `announce` appends to a bounded buffer (an O(1)
append on the event loop) and a background task publishes what gathered, in batches. While the
broker is away the buffer holds the newest `capacity` shas; older ones are dropped and counted
(`dropped`, and the `rabbitmq_dropped` metric). Event-loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from stor.amqpuri import AmqpTarget
from stor.digest import Sha
from stor.metrics import Metrics
from stor.service.broker import BrokerLink

CAPACITY = 100_000
BATCH = 1000


class Announcer:
    def __init__(self, target: AmqpTarget, metrics: Metrics, *, capacity: int = CAPACITY) -> None:
        self.link = BrokerLink("rabbitmq_uri", target)
        self.metrics = metrics
        self._buffer: deque[Sha] = deque(maxlen=capacity)
        self._wake = asyncio.Event()
        self.published = 0
        self.dropped = 0

    def announce(self, sha: Sha) -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1  # the oldest gives way
            self.metrics.dropped("rabbitmq", 1)
        self._buffer.append(sha)
        if len(self._buffer) >= BATCH:
            self._wake.set()

    async def run(self) -> None:
        """Publish what gathered every few milliseconds, until cancelled."""
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05 if self.link.due else self.link.wait):
                        await self._wake.wait()
                self._wake.clear()
                if not self._buffer or not self.link.due:
                    continue
                batch = [self._buffer.popleft() for _ in range(min(BATCH, len(self._buffer)))]
                routing = self.link.target.routing_key
                if await self.link.publish([(routing, sha.encode(), "text/plain") for sha in batch]):
                    self.published += len(batch)
                else:
                    free = (self._buffer.maxlen or 0) - len(self._buffer)
                    self._buffer.extendleft(reversed(batch[len(batch) - free :] if free < len(batch) else batch))
        finally:
            await self.link.close()

    def status(self) -> dict[str, object]:
        return {
            **self.link.status(),
            "buffered": len(self._buffer),
            "published": self.published,
            "dropped": self.dropped,
        }


class NoAnnouncer:
    def announce(self, sha: Sha) -> None:
        pass

    async def run(self) -> None:
        pass

    def status(self) -> dict[str, object]:
        return {"enabled": False}
