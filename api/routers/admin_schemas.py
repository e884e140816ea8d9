"""The directory API's request and answer shapes.

Answers are declared field by field rather than passed through from the store's
dataclasses, so /openapi.json says exactly what a client gets, and a column added to the
store (a secret, say) cannot appear in an answer unnoticed. Secrets are in exactly two
shapes, the answers to an enrolment and to a visitor pass being issued.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.store import directory as d

ID = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
CARD_NUMBER = r"^[\x21-\x7e]{1,64}$"
LATEST_TS = 4_102_444_800.0  # 2100-01-01: beyond any visit, well inside every column type


# --- requests -----------------------------------------------------------------------------


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
    valid_from: float = Field(ge=0, le=LATEST_TS, allow_inf_nan=False,
                              description="Unix seconds")
    valid_until: float = Field(ge=0, le=LATEST_TS, allow_inf_nan=False,
                               description="Unix seconds; at most 7 days after valid_from")
    max_uses: int = Field(default=4, ge=1, le=d.MAX_PASS_USES)
    gate_ids: list[str] = Field(default_factory=list, max_length=20)


class MyVisitIn(VisitIn):
    home_floor: bool = Field(default=True, description="also open the elevator to my floor")


class StaffVisitIn(VisitIn):
    issued_by: str = Field(pattern=ID)
    building_id: str | None = Field(default=None, pattern=ID)
    floor: int | None = Field(default=None, ge=-20, le=300)


def group_args(body: GroupIn | GroupPatch) -> dict[str, Any]:
    return {
        "gate_ids": body.gate_ids,
        "floors": None if body.floors is None else [(f.building_id, f.floor) for f in body.floors],
        "windows": None if body.windows is None else [
            d.ScheduleWindow(w.weekday, w.start_minute, w.end_minute) for w in body.windows],
    }


# --- answers ------------------------------------------------------------------------------


class _FromStore(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class FloorOut(_FromStore):
    building_id: str
    number: int
    label: str
    public: bool = Field(description="every resident of the building may ride to it (a lobby)")


class BuildingOut(_FromStore):
    building_id: str
    name: str
    floors: list[FloorOut]


class UnitOut(_FromStore):
    unit_id: str
    building_id: str
    floor: int
    label: str


class ResidentOut(_FromStore):
    resident_id: str
    unit_id: str
    name: str
    role: str
    created_at: float
    moved_out_at: float | None


class CardOut(_FromStore):
    kind: str
    card_number: str
    resident_id: str
    issued_at: float
    revoked_at: float | None
    issued_by: str | None = Field(
        default=None, description="the staff user who enrolled it through the API (audited); "
        "null for cards imported or enrolled before enrolments were audited")


class EnrolmentOut(_FromStore):
    """A card enrolment as the hash-chained audit log holds it."""

    kind: str
    card_number: str
    actor: str | None = Field(description="the staff user who enrolled the card")
    ts: float


class CredentialOut(_FromStore):
    credential_id: str
    resident_id: str
    label: str
    enrolled_at: float
    revoked_at: float | None


class EnrolledOut(CredentialOut):
    secret_hex: str = Field(description="for the phone's keystore; never shown again")


class VisitorPassOut(_FromStore):
    pass_id: str
    issued_by: str
    visitor_name: str
    credential_id: str
    building_id: str | None
    floor: int | None
    valid_from: float
    valid_until: float
    max_uses: int
    uses: int
    created_at: float
    revoked_at: float | None
    gate_ids: list[str]


class IssuedPassOut(VisitorPassOut):
    secret_hex: str = Field(description="for the visitor's QR; never shown again")


class ProfileOut(BaseModel):
    resident: ResidentOut
    unit: UnitOut
    cards: list[CardOut]
    credentials: list[CredentialOut]
    groups: list[str] = Field(description="ids of the access groups the resident is in")
    enrolments: list[EnrolmentOut] = Field(
        default_factory=list, description="card enrolments by staff, from the audit log")


class GroupOut(BaseModel):
    group_id: str
    name: str
    gate_ids: list[str]
    floors: list[FloorRef]
    windows: list[WindowIn]
    member_ids: list[str]


class VisitorQrOut(BaseModel):
    qr: str
    expires_at: float


def group_out(group: d.AccessGroup) -> GroupOut:
    return GroupOut(group_id=group.group_id, name=group.name, gate_ids=list(group.gate_ids),
                    floors=[FloorRef(building_id=b, floor=n) for b, n in group.floors],
                    windows=[WindowIn.model_validate(w, from_attributes=True)
                             for w in group.windows],
                    member_ids=list(group.member_ids))


def enrolled_out(enrolled: d.EnrolledCredential) -> EnrolledOut:
    return EnrolledOut.model_validate(
        {**CredentialOut.model_validate(enrolled.credential).model_dump(),
         "secret_hex": enrolled.secret.hex()})


def issued_out(issued: d.IssuedVisitorPass) -> IssuedPassOut:
    return IssuedPassOut.model_validate(
        {**VisitorPassOut.model_validate(issued.visitor_pass).model_dump(),
         "secret_hex": issued.secret.hex()})
