"""The telemetry worker's MQTT client: paho-mqtt 2 with a batched read path for PUBLISH.

paho does everything protocol-shaped here: CONNECT with MQTT v5, `clean_start=False` and a
session expiry (readings published while the worker restarts wait at the broker), QoS 1
subscription, keepalive, TLS, the last will, health publishes, reconnecting with backoff.
Only the inbound hot path is replaced, because stock paho reached 0.16x of `mosquitto_sub`
with MQTT v5 on this 2-core box (docs/decisions.md): per PUBLISH it makes three `recv()`
calls, one `select()`, builds a v5 `Properties` object (a third of its time), matches the
topic against callback filters, and writes each PUBACK with its own `send()`.

`IngestClient.loop_read` instead reads up to 256 KiB per `recv()`, frames packets out of the
buffer, hands each PUBLISH's topic and payload to `sink.message` (properties skipped: the
worker advertises no topic aliases, so the broker sends full topic names), calls
`sink.flush()` once the buffer is consumed, and only then queues one `send()` of all the
buffer's PUBACKs. So a PUBACK still leaves only after its reading is in the spool, as with
paho's own "PUBACK after on_message returns". Every other packet (CONNACK, SUBACK, PINGRESP,
DISCONNECT, QoS 2) goes through paho's own `_packet_handle` unchanged.

This uses paho internals (`_in_packet`, `_packet_handle`, `_loop_rc_handle`,
`_packet_queue`, `_sock_recv`). They are checked at construction; if a paho release moves
them, the client logs a warning and falls back to stock paho with `on_message` (correct,
slower), and the worker tests fail loudly on `fast_path` so the pin can be reviewed.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.client import time_func
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024
MAX_PACKET_BYTES = 16 << 20
"""Far above the contract's 64 KiB payloads (those are read and counted as `oversize`);
bounds what one rogue publisher can make the worker buffer."""
_PUBLISH, _PUBACK = 0x30, 0x40
_OK = MQTTErrorCode.MQTT_ERR_SUCCESS
_INTERNALS = ("_in_packet", "_packet_handle", "_loop_rc_handle", "_packet_queue", "_sock_recv",
              "_msgtime_mutex", "_last_bytes_received", "_sock")


class IngestSink(Protocol):
    """Where PUBLISHes go. `message` must not block on I/O; `flush` runs before the PUBACKs
    of the messages given since the last flush are queued (an exception means no PUBACK)."""

    def message(self, topic: bytes, payload: bytes) -> None: ...

    def flush(self) -> None: ...


class IngestClient(mqtt.Client):
    """A paho `Client` (MQTT v5, callback API 2) feeding `sink` through a batched read path.

    Use it as any paho client (`connect_async`, `loop_start`, `publish`, `disconnect`,
    `loop_stop`). `fast_path=False` forces stock paho (for tests and comparisons).
    """

    def __init__(self, client_id: str, sink: IngestSink, *, fast_path: bool = True,
                 transport: Any = "tcp") -> None:
        super().__init__(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=MQTTProtocolVersion.MQTTv5, transport=transport)
        self.sink = sink
        missing = [name for name in _INTERNALS if not hasattr(self, name)]
        if fast_path and missing:
            log.warning("paho-mqtt %s lacks %s: telemetry ingest uses stock paho (slower)",
                        getattr(mqtt, "__version__", "?"), ", ".join(missing))
        self.fast_path = fast_path and not missing and transport == "tcp"
        self._pending = bytearray()
        self._need = 0
        self.messages = 0
        self.on_message = self._stock_message  # QoS 2 and the fallback come this way

    def _stock_message(self, _client: mqtt.Client, _userdata: Any,
                       message: mqtt.MQTTMessage) -> None:
        self.messages += 1
        self.sink.message(message.topic.encode(), bytes(message.payload))
        self.sink.flush()

    def reconnect(self) -> MQTTErrorCode:
        self._pending = bytearray()  # a packet torn by the lost connection is not resumed
        return super().reconnect()

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        if not self.fast_path or self._in_packet["command"] != 0:
            # Stock paho mid-packet (only before the first fast read): let it finish.
            return super().loop_read(max_packets)
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        try:
            data = self._sock_recv(RECV_BYTES)
        except BlockingIOError:
            return _OK
        except OSError as exc:
            log.warning("MQTT connection lost while reading: %s", exc)
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        if not data:
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        with self._msgtime_mutex:
            self._last_bytes_received = time_func()
        if self._pending:  # the start of a packet that did not fit the last read
            self._pending += data
            if len(self._pending) < self._need:  # a big packet: no re-parse per read
                return _OK
            data, self._pending = bytes(self._pending), bytearray()
        buf = data
        acks: list[bytes] = []
        before = self.messages
        try:
            rc, used = self._frames(buf, acks)
        finally:
            if self.messages != before:
                self.sink.flush()
            if acks:  # only after the sink has the readings: see the module docstring
                self._packet_queue(_PUBACK, b"".join(acks), 0, 0)
        if used < len(buf):
            self._pending = bytearray(buf[used:])
            self._need = self._packet_size(self._pending)
        return self._loop_rc_handle(rc) if rc else _OK

    @staticmethod
    def _packet_size(buf: bytearray) -> int:
        """Bytes the packet starting `buf` needs in all (0 while its header is incomplete)."""
        length, shift = 0, 0
        for i in range(1, min(len(buf), 5)):
            length |= (buf[i] & 0x7F) << shift
            if buf[i] < 0x80:
                return i + 1 + length
            shift += 7
        return 0

    def _frames(self, buf: bytes, acks: list[bytes]) -> tuple[MQTTErrorCode, int]:
        """Handle every whole packet in `buf`; (error code, bytes used)."""
        pos, size, v5 = 0, len(buf), self._protocol == MQTTProtocolVersion.MQTTv5
        message = self.sink.message
        while pos + 2 <= size:
            header = buf[pos]
            length, shift, i = 0, 0, pos + 1
            while True:
                if i >= size:
                    return _OK, pos
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                i += 1
                if byte < 0x80:
                    break
                shift += 7
                if shift > 21:
                    return MQTTErrorCode.MQTT_ERR_PROTOCOL, pos
            end = i + length
            if end > size:
                return _OK, pos
            qos = (header >> 1) & 3
            if header & 0xF0 == _PUBLISH and qos < 2 and length >= 2:
                topic_end = i + 2 + (buf[i] << 8 | buf[i + 1])
                body = topic_end + 2 if qos else topic_end
                if v5:
                    props, shift = 0, 0
                    while body < end:
                        byte = buf[body]
                        props |= (byte & 0x7F) << shift
                        body += 1
                        if byte < 0x80:
                            break
                        shift += 7
                    body += props
                if body > end:
                    return MQTTErrorCode.MQTT_ERR_PROTOCOL, pos
                self.messages += 1
                message(buf[i + 2:topic_end], buf[body:end])
                if qos:
                    acks.append(b"\x40\x02" + buf[topic_end:topic_end + 2])
            else:
                rc = self._stock_packet(header, buf[i:end])
                if rc:
                    return rc, end
            pos = end
        return _OK, pos

    def _stock_packet(self, header: int, body: bytes) -> MQTTErrorCode:
        """One non-fast packet through paho's own handlers, as `_packet_read` would."""
        self._in_packet = {"command": header, "have_remaining": 1, "remaining_count": [],
                           "remaining_mult": 1, "remaining_length": len(body),
                           "packet": bytearray(body), "to_process": 0, "pos": 0}
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            log.warning("malformed MQTT packet from the broker: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [],
                           "remaining_mult": 1, "remaining_length": 0,
                           "packet": bytearray(b""), "to_process": 0, "pos": 0}
        return rc


def session_properties(expiry_s: int, max_packet_bytes: int = MAX_PACKET_BYTES) -> Any:
    """CONNECT properties: keep the session (and its queued readings) for `expiry_s`, and
    never send us a packet over `max_packet_bytes` (the broker drops it instead)."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = expiry_s
    props.MaximumPacketSize = max_packet_bytes
    return props


__all__ = ["IngestClient", "IngestSink", "session_properties"]
