"""API routers, one module per audience or resource."""

from __future__ import annotations

from fastapi import APIRouter


def all_extra_routers() -> list[APIRouter]:
    """Feature routers mounted beside auth, system and access."""
    from api.routers import admin, alerts, canteen, control, energy

    return [admin.router, canteen.router, control.router, energy.router, alerts.router]
