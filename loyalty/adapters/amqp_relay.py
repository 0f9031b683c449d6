"""The RabbitMQ relay's sink (pika): a durable topic exchange, routing key = event type,
persistent messages, ``message_id`` = event id, publisher confirms. Right before a batch
is published, the erasure markers are asked again and the events of erased members are
left out (the batch may have been read before a forget-me, and sent again after it).

``send`` returns only after the broker confirmed every message of the batch (a blocking
channel in confirm mode waits for each publish's ack; a nack or a lost connection
raises, so the cursor does not move and the batch is published again: at least once).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

import orjson
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from loyalty.application.delivery import ErasureCheck, FeedEvent, drop_erased

log = logging.getLogger(__name__)

EXCHANGE = "loyalty.events"
RETRY_ERRORS: tuple[type[BaseException], ...] = (pika.exceptions.AMQPError, OSError)


class AmqpSink:
    def __init__(
        self,
        url: str,
        exchange: str = EXCHANGE,
        *,
        confirms: bool = True,
        erasure: ErasureCheck | None = None,
    ) -> None:
        self._erasure = erasure
        self._params = pika.URLParameters(url)
        self._params.heartbeat = 30
        self._params.blocked_connection_timeout = 30
        self._exchange = exchange
        self._confirms = confirms
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def _open(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self.close()
        self._connection = pika.BlockingConnection(self._params)
        channel = self._connection.channel()
        channel.exchange_declare(self._exchange, exchange_type="topic", durable=True)
        if self._confirms:
            channel.confirm_delivery()
        self._channel = channel
        log.info("relay connected to %s:%s", self._params.host, self._params.port)
        return channel

    def send(self, events: Sequence[FeedEvent]) -> None:
        channel = self._open()
        if self._erasure is not None:  # asked again right before publishing
            events = drop_erased(self._erasure, events)
        try:
            for event in events:
                channel.basic_publish(
                    self._exchange,
                    event.type,
                    orjson.dumps(event.body()),
                    pika.BasicProperties(
                        content_type="application/json",
                        delivery_mode=pika.DeliveryMode.Persistent,
                        message_id=event.id,
                        timestamp=int(datetime.now(UTC).timestamp()),
                        type=event.type,
                    ),
                )
        except BaseException:
            self.close()  # reconnect for the next attempt
            raise

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except RETRY_ERRORS:
                pass
