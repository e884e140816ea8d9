"""What the API needs from the running gateway, passed in explicitly (no globals).

Tests build an ApiContext around real components; the runtime builds one around its own.
The services are typed by what the API calls on them (api.services), so nothing here ties
the API to the classes the runtime happens to use.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine

from api.services import ApiServices
from gateway.config import SiteConfig
from gateway.events import EventHub
from gateway.metrics import Registry
from gateway.store.db import read_engine


@dataclass(frozen=True)
class JwtSettings:
    secret: str
    audience: str
    ttl_s: int  # the lifetime of tokens issued, and the longest one accepted (exp - iat)
    algorithm: str = "HS256"  # fixed: a token naming another algorithm is refused

    def __post_init__(self) -> None:
        if len(self.secret) < 32:
            raise ValueError("the JWT secret must have at least 32 characters")


@dataclass
class ApiContext:
    config: SiteConfig
    engine: Engine
    jwt: JwtSettings
    metrics: Registry
    publish: Callable[[str, bytes], Awaitable[None]]
    ready: Callable[[], bool] = lambda: True
    # Lines naming what is wrong (a sink behind, the telemetry worker silent); the API
    # shows them on /readyz. `ready` stays the gate for serving at all.
    problems: Callable[[], list[str]] = list
    services: ApiServices = field(default_factory=ApiServices)
    # For the reads every request makes (the session's user, a sign-in's hash): on SQLite
    # a deferred transaction, so they never take the write lock from a payment. None: made
    # from `engine` on first use (gateway.store.db.read_engine) and disposed with this.
    read_engine: Engine | None = None
    # Live events for GET /api/v1/events; None: the route answers 503 (no gateway here).
    events: EventHub | None = None

    @property
    def reader(self) -> Engine:
        if self.read_engine is None:
            self.read_engine = read_engine(self.engine)
            if self.read_engine is not self.engine:
                weakref.finalize(self, self.read_engine.dispose)
        return self.read_engine
