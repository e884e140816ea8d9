"""The directory over the API: staff manage units, residents, cards, phones, access groups
and visitor passes; residents manage their own phones and the visitor passes they issue.

A resident only ever sees their own records: another resident's credential or pass is
answered 404, exactly like one that does not exist. Every write is followed by
`access.refresh_now()`, so the next request at any reader already obeys it. Secrets leave
the API once, in the answer to the enrolment (hex), and never appear in a listing.

Mounting: `create_app(ctx, [admin.router])`, with the AccessService in `ctx.access` (None
is allowed; then readers learn of changes by the service's own polling).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlalchemy import Connection

from api.auth import Ctx, Resident, require_roles
from gateway.store import directory as d
from gateway.store.users import Role, User

router = APIRouter(prefix="/api/v1", tags=["directory"])
Staff = Annotated[User, Depends(require_roles(Role.STAFF))]
# Whoever receives a credential secret can act as that resident everywhere (gates, floors,
# purse): handing secrets out for others is an admin's job, never a cashier's.
Admin = Annotated[User, Depends(require_roles())]
T = TypeVar("T")
ID = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
CARD_NUMBER = r"^[\x21-\x7e]{1,64}$"
CREATED = status.HTTP_201_CREATED


async def _run(ctx: Ctx, work: Callable[[Connection], T], *, write: bool) -> T:
    """Run repository calls off the event loop and turn their refusals into 4xx."""

    def run() -> T:
        with ctx.engine.begin() if write else ctx.engine.connect() as conn:
            return work(conn)

    try:
        result = await run_in_threadpool(run)
    except d.NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
    except d.Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    except d.DirectoryError as exc:
        raise HTTPException(422, detail=str(exc)) from None
    if write and ctx.access is not None:
        await ctx.access.refresh_now()
    return result


def _not_found(what: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"{what} does not exist")


# --- shapes -------------------------------------------------------------------------------


class UnitIn(BaseModel):
    unit_id: str = Field(pattern=ID)
    building_id: str = Field(pattern=ID)
    floor: int = Field(ge=-20, le=300)
    label: str = Field(default="", max_length=64)


class ResidentIn(BaseModel):
    unit_id: str = Field(pattern=ID)
    name: str = Field(min_length=1, max_length=128)
    role: d.ResidentRole
    resident_id: str | None = Field(default=None, pattern=ID)


class ResidentPatch(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=128)
    role: d.ResidentRole | None = None
    unit_id: str | None = Field(default=None, pattern=ID, description="a move within the site")


class CardIn(BaseModel):
    kind: d.CardKind
    card_number: str = Field(pattern=CARD_NUMBER)


class CredentialIn(BaseModel):
    label: str = Field(default="phone", min_length=1, max_length=64)


class WindowIn(BaseModel):
    weekday: int = Field(ge=0, le=6, description="0 = Monday, site-local time")
    start_minute: int = Field(ge=0, le=1439)
    end_minute: int = Field(ge=1, le=1440)


class FloorRef(BaseModel):
    building_id: str = Field(pattern=ID)
    floor: int = Field(ge=-20, le=300)


class GroupIn(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    gate_ids: list[str] = Field(default_factory=list, max_length=200)
    floors: list[FloorRef] = Field(default_factory=list, max_length=500)
    windows: list[WindowIn] = Field(default_factory=list, max_length=70)


class GroupPatch(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=128)
    gate_ids: list[str] | None = Field(default=None, max_length=200)
    floors: list[FloorRef] | None = Field(default=None, max_length=500)
    windows: list[WindowIn] | None = Field(default=None, max_length=70)


class VisitIn(BaseModel):
    visitor_name: str = Field(min_length=1, max_length=128)
    valid_from: float
    valid_until: float
    max_uses: int = Field(default=4, ge=1, le=d.MAX_PASS_USES)
    gate_ids: list[str] = Field(default_factory=list, max_length=20)


class MyVisitIn(VisitIn):
    home_floor: bool = Field(default=True, description="also open the elevator to my floor")


class StaffVisitIn(VisitIn):
    issued_by: str = Field(pattern=ID)
    building_id: str | None = Field(default=None, pattern=ID)
    floor: int | None = Field(default=None, ge=-20, le=300)


class GroupOut(BaseModel):
    group_id: str
    name: str
    gate_ids: list[str]
    floors: list[FloorRef]
    windows: list[WindowIn]
    member_ids: list[str]


def _group_out(group: d.AccessGroup) -> GroupOut:
    return GroupOut(group_id=group.group_id, name=group.name, gate_ids=list(group.gate_ids),
                    floors=[FloorRef(building_id=b, floor=n) for b, n in group.floors],
                    windows=[WindowIn(**asdict(w)) for w in group.windows],
                    member_ids=list(group.member_ids))


def _group_args(body: GroupIn | GroupPatch) -> dict[str, Any]:
    return {
        "gate_ids": body.gate_ids,
        "floors": None if body.floors is None else [(f.building_id, f.floor) for f in body.floors],
        "windows": None if body.windows is None else [
            d.ScheduleWindow(w.weekday, w.start_minute, w.end_minute) for w in body.windows],
    }


def _enrolled(enrolled: d.EnrolledCredential) -> dict[str, Any]:
    return {**asdict(enrolled.credential), "secret_hex": enrolled.secret.hex()}


def _issued(issued: d.IssuedVisitorPass) -> dict[str, Any]:
    return {**asdict(issued.visitor_pass), "secret_hex": issued.secret.hex()}


def _profile(conn: Connection, resident_id: str) -> dict[str, Any]:
    resident = d.get_resident(conn, resident_id)
    return {"resident": asdict(resident), "unit": asdict(d.get_unit(conn, resident.unit_id)),
            "cards": [asdict(c) for c in d.list_cards(conn, resident_id)],
            "credentials": [asdict(c) for c in d.list_phone_credentials(conn, resident_id)],
            "groups": [g.group_id for g in d.list_access_groups(conn, resident_id)]}


# --- staff: the directory -----------------------------------------------------------------


@router.get("/buildings")
async def list_buildings(ctx: Ctx, _: Staff) -> list[dict[str, Any]]:
    def read(conn: Connection) -> list[dict[str, Any]]:
        floors = d.list_floors(conn)
        return [{**asdict(b), "floors": [asdict(f) for f in floors
                                         if f.building_id == b.building_id]}
                for b in d.list_buildings(conn)]
    return await _run(ctx, read, write=False)


@router.get("/units")
async def list_units(ctx: Ctx, _: Staff,
                     building_id: str | None = Query(None, pattern=ID)) -> list[dict[str, Any]]:
    return await _run(ctx, lambda c: [asdict(u) for u in d.list_units(c, building_id)],
                      write=False)


@router.post("/units", status_code=CREATED)
async def create_unit(ctx: Ctx, _: Staff, body: UnitIn) -> dict[str, Any]:
    return asdict(await _run(ctx, lambda c: d.create_unit(
        c, body.unit_id, body.building_id, body.floor, body.label), write=True))


@router.get("/residents")
async def list_residents(ctx: Ctx, _: Staff, unit_id: str | None = Query(None, pattern=ID),
                         include_moved_out: bool = False) -> list[dict[str, Any]]:
    return await _run(ctx, lambda c: [asdict(r) for r in d.list_residents(
        c, unit_id, include_moved_out)], write=False)


@router.post("/residents", status_code=CREATED)
async def create_resident(ctx: Ctx, _: Staff, body: ResidentIn) -> dict[str, Any]:
    return asdict(await _run(ctx, lambda c: d.create_resident(
        c, body.unit_id, body.name, body.role, body.resident_id), write=True))


@router.get("/residents/{resident_id}")
async def get_resident(ctx: Ctx, _: Staff, resident_id: str) -> dict[str, Any]:
    return await _run(ctx, lambda c: _profile(c, resident_id), write=False)


@router.patch("/residents/{resident_id}")
async def update_resident(ctx: Ctx, _: Staff, resident_id: str,
                          body: ResidentPatch) -> dict[str, Any]:
    return asdict(await _run(ctx, lambda c: d.update_resident(
        c, resident_id, name=body.name, role=body.role, unit_id=body.unit_id), write=True))


@router.post("/residents/{resident_id}/move-out")
async def move_out(ctx: Ctx, _: Staff, resident_id: str) -> dict[str, Any]:
    """Revokes every card, phone and visitor pass of the resident at once."""
    return asdict(await _run(ctx, lambda c: d.move_out(c, resident_id), write=True))


@router.post("/residents/{resident_id}/cards", status_code=CREATED)
async def issue_card(ctx: Ctx, _: Staff, resident_id: str, body: CardIn) -> dict[str, Any]:
    return asdict(await _run(ctx, lambda c: d.issue_card(
        c, resident_id, body.kind, body.card_number), write=True))


@router.post("/cards/{kind}/{card_number}/revoke")
async def revoke_card(ctx: Ctx, _: Staff, kind: d.CardKind, card_number: str) -> dict[str, Any]:
    """A lost card: only this card stops working."""
    return asdict(await _run(ctx, lambda c: d.revoke_card(c, kind, card_number), write=True))


@router.post("/residents/{resident_id}/credentials", status_code=CREATED)
async def enrol_credential(ctx: Ctx, _: Admin, resident_id: str,
                           body: CredentialIn) -> dict[str, Any]:
    """The answer carries the secret for the phone's keystore; it is never shown again."""
    return _enrolled(await _run(ctx, lambda c: d.enrol_phone_credential(
        c, resident_id, body.label), write=True))


@router.post("/credentials/{credential_id}/revoke")
async def revoke_credential(ctx: Ctx, _: Staff, credential_id: str) -> dict[str, Any]:
    """A lost phone: only this credential stops working."""
    return asdict(await _run(ctx, lambda c: d.revoke_phone_credential(c, credential_id),
                             write=True))


@router.get("/access-groups", response_model=list[GroupOut])
async def list_groups(ctx: Ctx, _: Staff) -> list[GroupOut]:
    return [_group_out(g) for g in await _run(ctx, d.list_access_groups, write=False)]


@router.post("/access-groups", status_code=CREATED, response_model=GroupOut)
async def create_group(ctx: Ctx, _: Staff, body: GroupIn) -> GroupOut:
    return _group_out(await _run(ctx, lambda c: d.create_access_group(
        c, body.name, **_group_args(body)), write=True))


@router.patch("/access-groups/{group_id}", response_model=GroupOut)
async def update_group(ctx: Ctx, _: Staff, group_id: str, body: GroupPatch) -> GroupOut:
    return _group_out(await _run(ctx, lambda c: d.update_access_group(
        c, group_id, name=body.name, **_group_args(body)), write=True))


@router.delete("/access-groups/{group_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_group(ctx: Ctx, _: Staff, group_id: str) -> None:
    await _run(ctx, lambda c: d.delete_access_group(c, group_id), write=True)


@router.put("/access-groups/{group_id}/members/{resident_id}", response_model=GroupOut)
async def add_member(ctx: Ctx, _: Staff, group_id: str, resident_id: str) -> GroupOut:
    return _group_out(await _run(ctx, lambda c: d.add_group_member(c, group_id, resident_id),
                                 write=True))


@router.delete("/access-groups/{group_id}/members/{resident_id}", response_model=GroupOut)
async def remove_member(ctx: Ctx, _: Staff, group_id: str, resident_id: str) -> GroupOut:
    return _group_out(await _run(ctx, lambda c: d.remove_group_member(
        c, group_id, resident_id), write=True))


@router.get("/visitor-passes")
async def list_passes(ctx: Ctx, _: Staff, issued_by: str | None = Query(None, pattern=ID)
                      ) -> list[dict[str, Any]]:
    return await _run(ctx, lambda c: [asdict(p) for p in d.list_visitor_passes(c, issued_by)],
                      write=False)


@router.post("/visitor-passes", status_code=CREATED)
async def issue_pass(ctx: Ctx, _: Admin, body: StaffVisitIn) -> dict[str, Any]:
    return _issued(await _run(ctx, lambda c: d.issue_visitor_pass(
        c, body.issued_by, body.visitor_name, body.valid_from, body.valid_until,
        gate_ids=body.gate_ids, building_id=body.building_id, floor=body.floor,
        max_uses=body.max_uses), write=True))


@router.post("/visitor-passes/{pass_id}/revoke")
async def revoke_pass(ctx: Ctx, _: Staff, pass_id: str) -> dict[str, Any]:
    return asdict(await _run(ctx, lambda c: d.revoke_visitor_pass(c, pass_id), write=True))


# --- residents: their own data ------------------------------------------------------------


def _me(user: User) -> str:
    assert user.resident_id is not None  # guaranteed by the Resident dependency
    return user.resident_id


@router.get("/me")
async def my_profile(ctx: Ctx, user: Resident) -> dict[str, Any]:
    return await _run(ctx, lambda c: _profile(c, _me(user)), write=False)


@router.get("/me/credentials")
async def my_credentials(ctx: Ctx, user: Resident) -> list[dict[str, Any]]:
    return await _run(ctx, lambda c: [asdict(p) for p in d.list_phone_credentials(
        c, _me(user))], write=False)


@router.post("/me/credentials", status_code=CREATED)
async def enrol_my_phone(ctx: Ctx, user: Resident, body: CredentialIn) -> dict[str, Any]:
    return _enrolled(await _run(ctx, lambda c: d.enrol_phone_credential(
        c, _me(user), body.label), write=True))


@router.post("/me/credentials/{credential_id}/revoke")
async def revoke_my_phone(ctx: Ctx, user: Resident, credential_id: str) -> dict[str, Any]:
    def revoke(conn: Connection) -> d.PhoneCredential:
        if d.get_phone_credential(conn, credential_id).resident_id != _me(user):
            raise _not_found(f"credential {credential_id!r}")
        return d.revoke_phone_credential(conn, credential_id)
    return asdict(await _run(ctx, revoke, write=True))


@router.get("/me/visitor-passes")
async def my_passes(ctx: Ctx, user: Resident) -> list[dict[str, Any]]:
    return await _run(ctx, lambda c: [asdict(p) for p in d.list_visitor_passes(c, _me(user))],
                      write=False)


@router.post("/me/visitor-passes", status_code=CREATED)
async def invite(ctx: Ctx, user: Resident, body: MyVisitIn) -> dict[str, Any]:
    """A pass for the resident's own visitor: gates, and optionally their own floor only."""
    def issue(conn: Connection) -> d.IssuedVisitorPass:
        unit = d.get_unit(conn, d.get_resident(conn, _me(user)).unit_id)
        return d.issue_visitor_pass(
            conn, _me(user), body.visitor_name, body.valid_from, body.valid_until,
            gate_ids=body.gate_ids, building_id=unit.building_id if body.home_floor else None,
            floor=unit.floor if body.home_floor else None, max_uses=body.max_uses)
    return _issued(await _run(ctx, issue, write=True))


@router.post("/me/visitor-passes/{pass_id}/revoke")
async def revoke_my_pass(ctx: Ctx, user: Resident, pass_id: str) -> dict[str, Any]:
    def revoke(conn: Connection) -> d.VisitorPass:
        if d.get_visitor_pass(conn, pass_id).issued_by != _me(user):
            raise _not_found(f"visitor pass {pass_id!r}")
        return d.revoke_visitor_pass(conn, pass_id)
    return asdict(await _run(ctx, revoke, write=True))


@router.post("/me/visitor-passes/{pass_id}/qr")
async def visitor_qr(ctx: Ctx, user: Resident, pass_id: str) -> dict[str, Any]:
    """A fresh QR for the visitor's screen, to forward; valid about a minute."""
    visit = await _run(ctx, lambda c: d.get_visitor_pass(c, pass_id), write=False)
    if visit.issued_by != _me(user):
        raise _not_found(f"visitor pass {pass_id!r}")
    issued = ctx.access.issue_visitor_qr(pass_id) if ctx.access is not None else None
    if issued is None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="the pass is revoked or unknown")
    return {"qr": issued.qr, "expires_at": issued.expires_at}
