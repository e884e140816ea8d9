"""What the API needs from the running gateway, passed in explicitly (no globals).

Tests build an ApiContext around real components; the runtime builds one around its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from gateway.config import SiteConfig
from gateway.metrics import Registry


@dataclass(frozen=True)
class JwtSettings:
    secret: str
    audience: str
    ttl_s: int
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
    access: Any  # gateway.access.service.AccessService
    publish: Callable[[str, bytes], Awaitable[None]]
    device_state: Mapping[str, Any] = field(default_factory=dict)
    ready: Callable[[], bool] = lambda: True
    extras: dict[str, Any] = field(default_factory=dict)  # optional services (ledger, modbus)
