"""API routers, one module per audience or resource."""

from __future__ import annotations

from fastapi import APIRouter


def all_extra_routers() -> list[APIRouter]:
    """Feature routers mounted beside auth, system and access."""
    from api.routers import access_log, admin, alerts, canteen, control, energy, events

    routers = [admin.router, canteen.router, control.router, energy.router, alerts.router,
               events.router, access_log.router]
    try:  # users and invitations: built at the same time as this; mounted once it exists
        from api.routers import users
    except ImportError:
        pass
    else:
        routers.append(users.router)
    return routers
