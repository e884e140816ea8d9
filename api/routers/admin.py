"""The directory over the API: staff manage units, residents, cards, phones, access groups
and visitor passes; residents manage their own phones and the visitor passes they issue.

A resident only ever sees their own records: another resident's credential or pass is
answered 404, exactly like one that does not exist. Every write is followed by
`access.refresh_now()`, so the next request at any reader already obeys it. Secrets leave
the API once, in the answer to the enrolment (hex), and never appear in a listing.

Per resident at most `api.phone_credentials_per_resident` phone credentials not revoked and
`api.visitor_passes_per_resident` visitor passes neither revoked nor expired, whoever enrols
or issues them; one more is a 409 that says which cap and how to make room. The count and
the insert are one transaction holding the resident's row, so two requests at once cannot
both take the last place.

Mounting: `create_app(ctx, [admin.router])`, with the access service in
`ctx.services.access` (None is allowed; then readers learn of changes by the service's own
polling, and visitor QRs are a 503).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Connection, func, select

from api.auth import Ctx, Resident, require_roles
from api.deps import Access
from api.errors import errors
from api.routers.admin_schemas import (
    CARD_NUMBER,
    ID,
    BuildingOut,
    CardIn,
    CardOut,
    CredentialIn,
    CredentialOut,
    EnrolledOut,
    EnrolmentOut,
    GroupIn,
    GroupOut,
    GroupPatch,
    IssuedPassOut,
    MyVisitIn,
    ProfileOut,
    ResidentIn,
    ResidentOut,
    ResidentPatch,
    StaffVisitIn,
    UnitIn,
    UnitOut,
    VisitorPassOut,
    VisitorQrOut,
    enrolled_out,
    group_args,
    group_out,
    issued_out,
)
from gateway.access.enrolment import card_enrolments, issue_card_audited
from gateway.store import directory as d
from gateway.store.users import Role, User

router = APIRouter(prefix="/api/v1", tags=["directory"])
Staff = Annotated[User, Depends(require_roles(Role.STAFF))]
# Whoever receives a credential secret can act as that resident everywhere (gates, floors,
# purse): handing secrets out for others is an admin's job, never a cashier's.
Admin = Annotated[User, Depends(require_roles())]
T = TypeVar("T")
# Ids in paths: anything else is a 422, never a lookup.
ResidentId = Annotated[str, Path(pattern=ID)]
GroupId = Annotated[str, Path(pattern=ID)]
PassId = Annotated[str, Path(pattern=ID)]
CredentialId = Annotated[str, Path(pattern=ID)]
CardNumber = Annotated[str, Path(pattern=CARD_NUMBER)]
CREATED = status.HTTP_201_CREATED
# What the repository's refusals become in `_run`, by kind of route.
LIST = errors(401, 403, 422)
ONE = errors(401, 403, 404, 422)
WRITE = errors(401, 403, 404, 409, 422)
MINE = errors(401, 403, 409, 422)  # a resident's own new phone or pass: 409 at the cap


async def _run(ctx: Ctx, work: Callable[[Connection], T], *, write: bool) -> T:
    """Run repository calls off the event loop and turn their refusals into 4xx."""

    def run() -> T:
        with ctx.engine.begin() if write else ctx.reader.connect() as conn:
            return work(conn)

    try:
        result = await run_in_threadpool(run)
    except d.NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
    except d.Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    except d.DirectoryError as exc:
        raise HTTPException(422, detail=str(exc)) from None
    if write and ctx.services.access is not None:
        await ctx.services.access.refresh_now()
    return result


def _not_found(what: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"{what} does not exist")


def _active(conn: Connection, resident_id: str) -> d.Resident:
    """The resident, or the same 404 / 409 the repository gives before any cap is counted."""
    resident = d.get_resident(conn, resident_id)
    if resident.moved_out_at is not None:
        raise d.Conflict(f"resident {resident_id!r} has moved out")
    return resident


def _hold_resident(conn: Connection, resident_id: str) -> None:
    """Lock the resident's row to the end of the transaction (PostgreSQL; SQLite's
    transactions already take the write lock up front), so counts stay true to the insert."""
    conn.execute(select(d.residents.c.resident_id)
                 .where(d.residents.c.resident_id == resident_id).with_for_update())


def _room_for_phone(conn: Connection, resident_id: str, cap: int) -> None:
    _hold_resident(conn, resident_id)
    table = d.phone_credentials
    active = conn.execute(select(func.count()).select_from(table).where(
        table.c.resident_id == resident_id, table.c.revoked_at.is_(None))).scalar_one()
    if active >= cap:
        raise d.Conflict(f"resident {resident_id!r} already has {active} phone credentials, "
                         f"the most allowed ({cap}); revoke one first")


def _room_for_pass(conn: Connection, resident_id: str, cap: int) -> None:
    _hold_resident(conn, resident_id)
    table = d.visitor_passes
    active = conn.execute(select(func.count()).select_from(table).where(
        table.c.issued_by == resident_id, table.c.revoked_at.is_(None),
        table.c.valid_until > time.time())).scalar_one()
    if active >= cap:
        raise d.Conflict(f"resident {resident_id!r} already has {active} active visitor "
                         f"passes, the most allowed ({cap}); revoke one or let one expire")


def _enrol(ctx: Ctx, resident_id: str, label: str) -> Callable[[Connection], d.EnrolledCredential]:
    def enrol(conn: Connection) -> d.EnrolledCredential:
        _active(conn, resident_id)  # 404 / 409 before the cap
        _room_for_phone(conn, resident_id, ctx.config.api.phone_credentials_per_resident)
        return d.enrol_phone_credential(conn, resident_id, label)
    return enrol


def _profile(conn: Connection, resident_id: str) -> ProfileOut:
    resident = d.get_resident(conn, resident_id)
    enrolments = card_enrolments(conn, resident_id)
    issued_by = {(e.kind, e.card_number): e.actor for e in enrolments}
    return ProfileOut(
        resident=ResidentOut.model_validate(resident),
        unit=UnitOut.model_validate(d.get_unit(conn, resident.unit_id)),
        cards=[CardOut.model_validate(c).model_copy(
            update={"issued_by": issued_by.get((c.kind, c.card_number))})
               for c in d.list_cards(conn, resident_id)],
        credentials=[CredentialOut.model_validate(c)
                     for c in d.list_phone_credentials(conn, resident_id)],
        groups=[g.group_id for g in d.list_access_groups(conn, resident_id)],
        enrolments=[EnrolmentOut.model_validate(e) for e in enrolments],
    )


# --- staff: the directory -----------------------------------------------------------------


@router.get("/buildings", response_model=list[BuildingOut], responses=errors(401, 403))
async def list_buildings(ctx: Ctx, _: Staff) -> list[BuildingOut]:
    def read(conn: Connection) -> list[BuildingOut]:
        floors = d.list_floors(conn)
        return [BuildingOut(building_id=b.building_id, name=b.name,
                            floors=[f for f in floors if f.building_id == b.building_id])
                for b in d.list_buildings(conn)]
    return await _run(ctx, read, write=False)


@router.get("/units", response_model=list[UnitOut], responses=LIST)
async def list_units(ctx: Ctx, _: Staff,
                     building_id: str | None = Query(None, pattern=ID)) -> list[UnitOut]:
    return await _run(ctx, lambda c: [UnitOut.model_validate(u)
                                      for u in d.list_units(c, building_id)], write=False)


@router.post("/units", status_code=CREATED, response_model=UnitOut, responses=WRITE)
async def create_unit(ctx: Ctx, _: Staff, body: UnitIn) -> UnitOut:
    return UnitOut.model_validate(await _run(ctx, lambda c: d.create_unit(
        c, body.unit_id, body.building_id, body.floor, body.label), write=True))


@router.get("/residents", response_model=list[ResidentOut], responses=LIST)
async def list_residents(ctx: Ctx, _: Staff, unit_id: str | None = Query(None, pattern=ID),
                         include_moved_out: bool = False) -> list[ResidentOut]:
    return await _run(ctx, lambda c: [ResidentOut.model_validate(r) for r in d.list_residents(
        c, unit_id, include_moved_out)], write=False)


@router.post("/residents", status_code=CREATED, response_model=ResidentOut, responses=WRITE)
async def create_resident(ctx: Ctx, _: Staff, body: ResidentIn) -> ResidentOut:
    return ResidentOut.model_validate(await _run(ctx, lambda c: d.create_resident(
        c, body.unit_id, body.name, body.role, body.resident_id), write=True))


@router.get("/residents/{resident_id}", response_model=ProfileOut, responses=ONE)
async def get_resident(ctx: Ctx, _: Staff, resident_id: ResidentId) -> ProfileOut:
    return await _run(ctx, lambda c: _profile(c, resident_id), write=False)


@router.patch("/residents/{resident_id}", response_model=ResidentOut, responses=WRITE)
async def update_resident(ctx: Ctx, _: Staff, resident_id: ResidentId,
                          body: ResidentPatch) -> ResidentOut:
    return ResidentOut.model_validate(await _run(ctx, lambda c: d.update_resident(
        c, resident_id, name=body.name, role=body.role, unit_id=body.unit_id), write=True))


@router.post("/residents/{resident_id}/move-out", response_model=ResidentOut,
             responses=WRITE)
async def move_out(ctx: Ctx, _: Staff, resident_id: ResidentId) -> ResidentOut:
    """Revokes every card, phone and visitor pass of the resident at once."""
    return ResidentOut.model_validate(await _run(ctx, lambda c: d.move_out(c, resident_id),
                                                 write=True))


@router.post("/residents/{resident_id}/cards", status_code=CREATED, response_model=CardOut,
             responses=WRITE)
async def issue_card(ctx: Ctx, user: Staff, resident_id: ResidentId, body: CardIn) -> CardOut:
    """Audited with the staff user as actor, in the card's own transaction. A number another
    resident already holds (any kind) is a 409: cards are never shared or moved."""
    def issue(conn: Connection) -> CardOut:
        card = issue_card_audited(conn, resident_id, body.kind, body.card_number,
                                  actor=user.username)
        actor = next((e.actor for e in card_enrolments(conn, resident_id)
                      if (e.kind, e.card_number) == (card.kind, card.card_number)), None)
        return CardOut.model_validate(card).model_copy(update={"issued_by": actor})
    return await _run(ctx, issue, write=True)


@router.post("/cards/{kind}/{card_number}/revoke", response_model=CardOut, responses=ONE)
async def revoke_card(ctx: Ctx, _: Staff, kind: d.CardKind, card_number: CardNumber) -> CardOut:
    """A lost card: only this card stops working."""
    return CardOut.model_validate(await _run(ctx, lambda c: d.revoke_card(c, kind, card_number),
                                             write=True))


@router.post("/residents/{resident_id}/credentials", status_code=CREATED,
             response_model=EnrolledOut, responses=WRITE)
async def enrol_credential(ctx: Ctx, _: Admin, resident_id: ResidentId,
                           body: CredentialIn) -> EnrolledOut:
    """The answer carries the secret for the phone's keystore; it is never shown again."""
    return enrolled_out(await _run(ctx, _enrol(ctx, resident_id, body.label), write=True))


@router.post("/credentials/{credential_id}/revoke", response_model=CredentialOut,
             responses=ONE)
async def revoke_credential(ctx: Ctx, _: Staff, credential_id: CredentialId) -> CredentialOut:
    """A lost phone: only this credential stops working."""
    return CredentialOut.model_validate(await _run(
        ctx, lambda c: d.revoke_phone_credential(c, credential_id), write=True))


@router.get("/access-groups", response_model=list[GroupOut], responses=errors(401, 403))
async def list_groups(ctx: Ctx, _: Staff) -> list[GroupOut]:
    return [group_out(g) for g in await _run(ctx, d.list_access_groups, write=False)]


@router.post("/access-groups", status_code=CREATED, response_model=GroupOut, responses=WRITE)
async def create_group(ctx: Ctx, _: Staff, body: GroupIn) -> GroupOut:
    return group_out(await _run(ctx, lambda c: d.create_access_group(
        c, body.name, **group_args(body)), write=True))


@router.patch("/access-groups/{group_id}", response_model=GroupOut, responses=WRITE)
async def update_group(ctx: Ctx, _: Staff, group_id: GroupId, body: GroupPatch) -> GroupOut:
    return group_out(await _run(ctx, lambda c: d.update_access_group(
        c, group_id, name=body.name, **group_args(body)), write=True))


@router.delete("/access-groups/{group_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses=ONE)
async def delete_group(ctx: Ctx, _: Staff, group_id: GroupId) -> None:
    await _run(ctx, lambda c: d.delete_access_group(c, group_id), write=True)


@router.put("/access-groups/{group_id}/members/{resident_id}", response_model=GroupOut,
            responses=WRITE)
async def add_member(ctx: Ctx, _: Staff, group_id: GroupId, resident_id: ResidentId) -> GroupOut:
    return group_out(await _run(ctx, lambda c: d.add_group_member(c, group_id, resident_id),
                                write=True))


@router.delete("/access-groups/{group_id}/members/{resident_id}", response_model=GroupOut,
               responses=ONE)
async def remove_member(ctx: Ctx, _: Staff, group_id: GroupId, resident_id: ResidentId) -> GroupOut:
    return group_out(await _run(ctx, lambda c: d.remove_group_member(
        c, group_id, resident_id), write=True))


@router.get("/visitor-passes", response_model=list[VisitorPassOut], responses=LIST)
async def list_passes(ctx: Ctx, _: Staff, issued_by: str | None = Query(None, pattern=ID)
                      ) -> list[VisitorPassOut]:
    return await _run(ctx, lambda c: [VisitorPassOut.model_validate(p)
                                      for p in d.list_visitor_passes(c, issued_by)],
                      write=False)


@router.post("/visitor-passes", status_code=CREATED, response_model=IssuedPassOut,
             responses=WRITE)
async def issue_pass(ctx: Ctx, _: Admin, body: StaffVisitIn) -> IssuedPassOut:
    def issue(conn: Connection) -> d.IssuedVisitorPass:
        _active(conn, body.issued_by)
        _room_for_pass(conn, body.issued_by, ctx.config.api.visitor_passes_per_resident)
        return d.issue_visitor_pass(
            conn, body.issued_by, body.visitor_name, body.valid_from, body.valid_until,
            gate_ids=body.gate_ids, building_id=body.building_id, floor=body.floor,
            max_uses=body.max_uses)
    return issued_out(await _run(ctx, issue, write=True))


@router.post("/visitor-passes/{pass_id}/revoke", response_model=VisitorPassOut,
             responses=ONE)
async def revoke_pass(ctx: Ctx, _: Staff, pass_id: PassId) -> VisitorPassOut:
    return VisitorPassOut.model_validate(await _run(
        ctx, lambda c: d.revoke_visitor_pass(c, pass_id), write=True))


# --- residents: their own data ------------------------------------------------------------


def _me(user: User) -> str:
    assert user.resident_id is not None  # guaranteed by the Resident dependency
    return user.resident_id


@router.get("/me", response_model=ProfileOut, responses=errors(401, 403))
async def my_profile(ctx: Ctx, user: Resident) -> ProfileOut:
    return await _run(ctx, lambda c: _profile(c, _me(user)), write=False)


@router.get("/me/credentials", response_model=list[CredentialOut], responses=errors(401, 403))
async def my_credentials(ctx: Ctx, user: Resident) -> list[CredentialOut]:
    return await _run(ctx, lambda c: [CredentialOut.model_validate(p)
                                      for p in d.list_phone_credentials(c, _me(user))],
                      write=False)


@router.post("/me/credentials", status_code=CREATED, response_model=EnrolledOut,
             responses=MINE)
async def enrol_my_phone(ctx: Ctx, user: Resident, body: CredentialIn) -> EnrolledOut:
    return enrolled_out(await _run(ctx, _enrol(ctx, _me(user), body.label), write=True))


@router.post("/me/credentials/{credential_id}/revoke", response_model=CredentialOut,
             responses=ONE)
async def revoke_my_phone(ctx: Ctx, user: Resident, credential_id: CredentialId) -> CredentialOut:
    def revoke(conn: Connection) -> d.PhoneCredential:
        if d.get_phone_credential(conn, credential_id).resident_id != _me(user):
            raise _not_found(f"credential {credential_id!r}")
        return d.revoke_phone_credential(conn, credential_id)
    return CredentialOut.model_validate(await _run(ctx, revoke, write=True))


@router.get("/me/visitor-passes", response_model=list[VisitorPassOut],
            responses=errors(401, 403))
async def my_passes(ctx: Ctx, user: Resident) -> list[VisitorPassOut]:
    return await _run(ctx, lambda c: [VisitorPassOut.model_validate(p)
                                      for p in d.list_visitor_passes(c, _me(user))],
                      write=False)


@router.post("/me/visitor-passes", status_code=CREATED, response_model=IssuedPassOut,
             responses=MINE)
async def invite(ctx: Ctx, user: Resident, body: MyVisitIn) -> IssuedPassOut:
    """A pass for the resident's own visitor: gates, and optionally their own floor only."""
    def issue(conn: Connection) -> d.IssuedVisitorPass:
        unit = d.get_unit(conn, _active(conn, _me(user)).unit_id)
        _room_for_pass(conn, _me(user), ctx.config.api.visitor_passes_per_resident)
        return d.issue_visitor_pass(
            conn, _me(user), body.visitor_name, body.valid_from, body.valid_until,
            gate_ids=body.gate_ids, building_id=unit.building_id if body.home_floor else None,
            floor=unit.floor if body.home_floor else None, max_uses=body.max_uses)
    return issued_out(await _run(ctx, issue, write=True))


@router.post("/me/visitor-passes/{pass_id}/revoke", response_model=VisitorPassOut,
             responses=ONE)
async def revoke_my_pass(ctx: Ctx, user: Resident, pass_id: PassId) -> VisitorPassOut:
    def revoke(conn: Connection) -> d.VisitorPass:
        if d.get_visitor_pass(conn, pass_id).issued_by != _me(user):
            raise _not_found(f"visitor pass {pass_id!r}")
        return d.revoke_visitor_pass(conn, pass_id)
    return VisitorPassOut.model_validate(await _run(ctx, revoke, write=True))


@router.post("/me/visitor-passes/{pass_id}/qr", response_model=VisitorQrOut,
             responses=errors(401, 403, 404, 409, 422, 503))
async def visitor_qr(ctx: Ctx, user: Resident, access: Access, pass_id: PassId) -> VisitorQrOut:
    """A fresh QR for the visitor's screen, to forward; valid about a minute."""
    visit = await _run(ctx, lambda c: d.get_visitor_pass(c, pass_id), write=False)
    if visit.issued_by != _me(user):
        raise _not_found(f"visitor pass {pass_id!r}")
    issued = access.issue_visitor_qr(pass_id, time.time())
    if issued is None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="the pass is revoked or unknown")
    return VisitorQrOut(qr=issued.qr, expires_at=issued.expires_at)
