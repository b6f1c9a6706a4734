"""What the two AMQP publishers (`announce`, `events`) share: a broker's state as seen from
here, said once per change in the log and shown in `/status`, and the backoff between tries."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from stor.amqpuri import AmqpTarget
from stor.backends.amqp import AmqpPublisher, BrokerUnavailable, Message

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0


@dataclass
class BrokerLink:
    """A publisher and what is known of its broker: reachable or not (None: not tried yet), the
    last error, and when to try again."""

    what: str
    target: AmqpTarget
    publisher: AmqpPublisher = field(init=False)
    reachable: bool | None = None
    last_error: str | None = None
    failures: int = 0
    _retry_at: float = 0.0

    def __post_init__(self) -> None:
        self.publisher = AmqpPublisher(self.target)

    @property
    def due(self) -> bool:
        return time.monotonic() >= self._retry_at

    @property
    def wait(self) -> float:
        return max(0.0, self._retry_at - time.monotonic())

    async def publish(self, messages: list[Message]) -> bool:
        """True when the broker confirmed them all; False (said once per change) when not."""
        try:
            await self.publisher.publish(messages)
        except BrokerUnavailable as exc:
            self.failures += 1
            self._retry_at = time.monotonic() + min(MAX_BACKOFF, 0.5 * 2 ** min(self.failures, 8))
            if self.reachable is not False or str(exc) != self.last_error:
                log.warning("%s: broker %s unavailable (%s); retrying with backoff", self.what, self.target, exc)
            self.reachable, self.last_error = False, str(exc)
            return False
        if self.reachable is False:
            log.warning("%s: broker %s is reachable again", self.what, self.target)
        self.reachable, self.last_error, self.failures, self._retry_at = True, None, 0, 0.0
        return True

    def status(self) -> dict[str, object]:
        return {
            "enabled": True,
            "exchange": self.target.exchange,
            "reachable": self.reachable,
            "last_error": self.last_error,
        }

    async def close(self) -> None:
        await self.publisher.close()
