"""Publishing to an AMQP 0-9-1 broker (RabbitMQ). The only module that imports `aiormq`.

Contract: `AmqpPublisher.publish` sends a batch to the target's exchange (a durable topic
exchange, declared on every connect, as Stor's publisher did) on one channel in confirm mode,
and returns only when the broker confirmed every message; any failure (no connection, refused
credentials or vhost, a closed channel, a nack, a timeout) raises `BrokerUnavailable` with one
line saying why, and the next call connects afresh. Event-loop only; not for several tasks at
once (each user owns its publisher).

Why aiormq: it is asyncio-native (stor's workers are event loops; no thread to hand messages
to), supports publisher confirms directly (`basic_publish` resolves to the broker's ack), and
is the maintained core that aio-pika wraps; aio-pika's robust reconnection would hide from us
the failures `/status` must report and retry on its own schedule, and pika needs a thread of its
own per connection (its blocking adapter is not thread-safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import aiormq
import aiormq.abc
from pamqp.commands import Basic

from stor.amqpuri import AmqpTarget


class BrokerUnavailable(Exception):
    """The broker could not take (or did not confirm) the messages; the message says why."""


Message = tuple[str, bytes, str]
"""(routing key, body, content type)."""


class AmqpPublisher:
    def __init__(self, target: AmqpTarget, *, timeout: float = 5.0) -> None:
        self.target = target
        self.timeout = timeout
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None

    async def publish(self, messages: list[Message]) -> None:
        """Publish `messages`, persistent, and wait for the broker's confirms of all of them."""
        if not messages:
            return
        channel = await self._open()
        try:
            async with asyncio.timeout(self.timeout):
                confirms = await asyncio.gather(
                    *(
                        channel.basic_publish(
                            body,
                            exchange=self.target.exchange,
                            routing_key=key,
                            properties=Basic.Properties(
                                delivery_mode=2, content_type=content_type, message_id=uuid.uuid4().hex
                            ),
                        )
                        for key, body, content_type in messages
                    )
                )
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
            await self.close()
            raise BrokerUnavailable(_why("publishing", exc)) from None
        refused = sum(1 for confirm in confirms if not isinstance(confirm, Basic.Ack))
        if refused:
            raise BrokerUnavailable(f"the broker did not confirm {refused} of {len(messages)} messages")

    async def _open(self) -> aiormq.abc.AbstractChannel:
        if self._channel is not None and not self._channel.is_closed:
            return self._channel
        await self.close()
        try:
            async with asyncio.timeout(self.timeout):
                self._connection = await aiormq.connect(self.target.url)
                channel = await self._connection.channel(publisher_confirms=True)
                await channel.exchange_declare(self.target.exchange, exchange_type="topic", durable=True)
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
            await self.close()
            raise BrokerUnavailable(_why("connecting", exc)) from None
        self._channel = channel
        return channel

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):  # it may be half-open or closed already
                await asyncio.wait_for(connection.close(), 2.0)


def _why(action: str, exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"{action}: no answer from the broker in time"
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError):
        return f"{action}: the broker refused the credentials"
    text = str(exc) or type(exc).__name__
    return f"{action}: {text}"
