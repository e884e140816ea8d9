"""The embedded amqtt broker enforcing the files `scgw mqtt-config` writes for Mosquitto.

`PasswdAuthPlugin` (an amqtt auth plugin, loaded by its dotted path) and `AclBroker` (the
ACL, inline) read the same `passwd` (Mosquitto's PBKDF2 hashes) and `acl` with
gateway.app.mqtt_config, so the demo's fallback broker refuses what Mosquitto refuses:

- no username, an unknown one or a wrong password: CONNACK "not authorised";
- a last will on a topic the login may not write: the connection is refused (amqtt would
  otherwise publish it unchecked when the client drops);
- a publish the login may not write: dropped; a delivery it may not read (retained ones
  included): not sent;
- a subscription that could match a topic the login may not read: refused (SUBACK 0x80),
  stricter than Mosquitto (which grants it and filters every delivery), so that a session
  never holds a subscription broader than its login.

Tested against the same cases as Mosquitto (tests/test_mqtt_edge_auth.py). Written for
amqtt 0.12 (`AclBroker` replaces two of its private methods).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from gateway.app.mqtt_config import AclEntry, acl_allows, parse_acl, parse_passwd, verify_password

_ACCESS: Final[dict[Action, Literal["read", "write", "subscribe"]]] = {
    Action.PUBLISH: "write", Action.RECEIVE: "read", Action.SUBSCRIBE: "subscribe"}


def _acl(path: str) -> dict[str, list[AclEntry]]:
    return parse_acl(Path(path).read_text(encoding="utf-8"))


class PasswdAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    """Logins from a Mosquitto password file; anonymous clients refused."""

    @dataclass
    class Config:
        password_file: str
        acl_file: str

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        config: PasswdAuthPlugin.Config = self.config
        self._users = parse_passwd(Path(config.password_file).read_text(encoding="utf-8"))
        self._acl = _acl(config.acl_file)

    async def authenticate(self, *, session: Session) -> bool | None:
        username, password = session.username, session.password
        encoded = self._users.get(username) if username else None
        if encoded is None or not verify_password(password or "", encoded):
            self.context.logger.info("refused login %r", username)
            return False
        if session.will_flag and not acl_allows(self._acl, username, session.will_topic or "",
                                                "write"):
            self.context.logger.info("refused %r: last will on %s", username, session.will_topic)
            return False
        return True


class AclBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's broker with every publish, subscription and delivery checked against a
    Mosquitto acl file, inline.

    Two things of amqtt 0.12 are replaced rather than configured. Topic plugins are called
    through tasks, so the check yields inside amqtt's loop over its subscription table, and
    a client subscribing meanwhile ends that loop with "dictionary changed size during
    iteration" (seen as lost messages and dropped connections under the demo's start-up
    load): the check here never yields. And on every CONNECT amqtt hands the new client the
    retained messages matching *anyone's* subscription, unchecked: here only those it may
    read, published without blocking that same loop.
    """

    def __init__(self, config: Any, acl_file: Path) -> None:
        super().__init__(config)
        self._acl = _acl(str(acl_file))
        self._retained_sends: set[asyncio.Future[Any]] = set()

    async def _topic_filtering(self, session: Session | None, topic: str, action: Action
                               ) -> bool:
        access = _ACCESS.get(action)
        if session is None or access is None:
            return False
        return acl_allows(self._acl, session.username, topic, access)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        for topic, retained in list(self._retained_messages.items()):
            if self._matches(topic, topic_filter) and acl_allows(
                    self._acl, session.username, topic, "read"):
                send = asyncio.ensure_future(handler.mqtt_publish(
                    retained.topic, retained.data, min(qos, retained.qos or qos), retain=True))
                self._retained_sends.add(send)
                send.add_done_callback(_forget(self._retained_sends))


def _forget(pending: set[asyncio.Future[Any]]) -> Any:
    def done(future: asyncio.Future[Any]) -> None:
        pending.discard(future)
        if not future.cancelled():
            future.exception()  # retrieved: a client gone meanwhile is not an error

    return done
