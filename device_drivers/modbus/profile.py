"""The register-map model (CONTRACT.md section 5): one YAML profile per unit type.

The same Profile object drives the poller, the simulator and the generated docs, so a typo
in a map fails loudly once, at load time, naming the file, line, register and key, instead
of producing a plausible but wrong number at 3 am.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from device_drivers.modbus.codec import (
    BIT_TABLES,
    INPUT_TYPES,
    WIDTH,
    WRITABLE_TABLES,
    DataType,
    DecodeStep,
    InputType,
    Swap,
    decode_step,
    encode,
    write_problems,
)
from device_drivers.modbus.errors import ProfileError, WriteRefused
from device_drivers.vocabulary import DEVICE_KINDS

log = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).with_name("profiles")
MAX_READ_REGISTERS = 125  # Modbus limit for function codes 03/04
MAX_READ_BITS = 2000  # Modbus limit for function codes 01/02


def _problem(key: str, message: str) -> PydanticCustomError:
    """A validation error that remembers which key it is about (pydantic's loc cannot)."""
    return PydanticCustomError("profile", "{message}", {"message": message, "key": key})


class Register(BaseModel):
    """One value in a unit's register map; `name` becomes the telemetry metric name."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    input_type: InputType
    address: int = Field(ge=0, le=65535)
    data_type: DataType = "uint16"
    swap: Swap = "none"
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    writable: bool = False
    min: float | None = None
    max: float | None = None
    description: str = ""

    @property
    def width(self) -> int:
        """Registers (or bits) this value occupies."""
        return WIDTH[self.data_type]

    @property
    def end(self) -> int:
        """First address after this value."""
        return self.address + self.width

    @model_validator(mode="after")
    def _consistent(self) -> Register:
        if self.input_type in BIT_TABLES and self.data_type != "bool":
            raise _problem("data_type", f"a {self.input_type} holds a bool, not {self.data_type}")
        if self.swap != "none":
            if self.input_type in BIT_TABLES or self.data_type == "bool":
                raise _problem("swap", "a bool has no byte order; use swap: none")
            if self.width == 1 and self.swap != "byte":
                raise _problem("swap", f"{self.swap!r} needs a 32-bit data_type; 16-bit: byte")
        if self.writable and self.input_type not in WRITABLE_TABLES:
            raise _problem("writable", f"{self.input_type} registers are read-only in Modbus")
        if self.scale == 0:
            raise _problem("scale", "scale 0 would turn every value into the offset")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise _problem("min", f"min {self.min:g} is above max {self.max:g}")
        if self.end > 65536:
            raise _problem("address", f"{self.data_type} at {self.address} runs past 65535")
        return self


class Profile(BaseModel):
    """A unit type's register map plus how the driver may batch reads for it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    kind: str | None = None
    description: str = ""
    source: str = ""
    max_gap: int = Field(default=0, ge=0, le=124)
    max_block: int = Field(default=MAX_READ_REGISTERS, ge=1, le=MAX_READ_REGISTERS)
    registers: tuple[Register, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if self.kind is not None and self.kind not in DEVICE_KINDS:
            raise _problem("kind", f"unknown kind {self.kind!r}; one of {', '.join(DEVICE_KINDS)}")
        seen: dict[str, int] = {}
        for index, register in enumerate(self.registers):
            if register.name in seen:
                raise PydanticCustomError(
                    "profile",
                    "{message}",
                    {
                        "message": f"name {register.name!r} already used by #{seen[register.name]}",
                        "key": "name",
                        "index": index,
                    },
                )
            seen[register.name] = index
        for index, register, other in _overlaps(self.registers):
            raise PydanticCustomError(
                "profile",
                "{message}",
                {
                    "message": f"{register.input_type} {register.address} overlaps {other.name!r}"
                    f" ({other.address}..{other.end - 1})",
                    "key": "address",
                    "index": index,
                },
            )
        return self

    def register(self, name: str) -> Register:
        for register in self.registers:
            if register.name == name:
                return register
        raise KeyError(name)

    @property
    def writable(self) -> tuple[Register, ...]:
        return tuple(r for r in self.registers if r.writable)


def _overlaps(registers: Sequence[Register]) -> Iterator[tuple[int, Register, Register]]:
    for table in INPUT_TYPES:
        indexed = sorted(
            ((i, r) for i, r in enumerate(registers) if r.input_type == table),
            key=lambda pair: pair[1].address,
        )
        for (_, before), (index, register) in itertools.pairwise(indexed):
            if register.address < before.end:
                yield index, register, before


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: a contiguous range of one table covering some registers."""

    input_type: str
    start: int
    count: int
    registers: tuple[Register, ...]
    steps: tuple[DecodeStep, ...] = ()  # how to decode each register, prepared once


def plan_reads(profile: Profile) -> tuple[ReadBlock, ...]:
    """Fewest requests that cover every register without reading more than max_gap spare."""
    blocks: list[ReadBlock] = []
    for table in INPUT_TYPES:
        limit = MAX_READ_BITS if table in BIT_TABLES else profile.max_block
        members = sorted((r for r in profile.registers if r.input_type == table),
                         key=lambda r: r.address)
        current: list[Register] = []
        for register in members:
            if current:
                start, end = current[0].address, max(r.end for r in current)
                if register.address - end <= profile.max_gap and register.end - start <= limit:
                    current.append(register)
                    continue
                blocks.append(_block(table, current))
            current = [register]
        if current:
            blocks.append(_block(table, current))
    return tuple(blocks)


def _block(table: str, registers: list[Register]) -> ReadBlock:
    start = registers[0].address
    steps = tuple(decode_step(r, r.address - start) for r in registers)
    return ReadBlock(table, start, max(r.end for r in registers) - start, tuple(registers),
                     steps)


@dataclass(frozen=True, slots=True)
class WriteOp:
    """One validated write: the register and the words (or single 0/1 bit) to send."""

    register: Register
    value: float
    words: tuple[int, ...]


def plan_write(
    profile: Profile, values: Mapping[str, float], device_id: str
) -> tuple[WriteOp, ...]:
    """Validate every value before anything is sent; all problems are reported at once."""
    problems: list[str] = []
    ops: list[WriteOp] = []
    if not values:
        problems.append("nothing to write")
    for name, value in values.items():
        try:
            register = profile.register(name)
        except KeyError:
            writable = ", ".join(r.name for r in profile.writable) or "none"
            problems.append(f"{profile.profile} has no register {name!r} (writable: {writable})")
            continue
        found = write_problems(register, value)
        if found:
            problems.extend(found)
        else:
            ops.append(WriteOp(register, float(value), encode(register, value)))
    if problems:
        raise WriteRefused(device_id, problems)
    return tuple(ops)


def bundled_profiles() -> dict[str, Path]:
    """Profile id -> file for the profiles shipped with scgw."""
    return {path.stem: path for path in sorted(PROFILE_DIR.glob("*.yaml"))}


def load_profile(name_or_path: str | Path) -> Profile:
    """A bundled profile by id, or a YAML file by path."""
    bundled = bundled_profiles()
    path = bundled.get(str(name_or_path)) or Path(name_or_path)
    if not path.is_file():
        known = ", ".join(bundled) or "none"
        raise ProfileError(f"no such file, and not a bundled profile ({known})", file=str(path))
    return parse_profile(path.read_text(encoding="utf-8"), file=str(path))


def parse_profile(text: str, *, file: str = "<profile>") -> Profile:
    """YAML text -> Profile, or a ProfileError pointing at the offending line and key."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise ProfileError(f"not valid YAML: {exc.problem}", file=file, line=line) from exc
    if not isinstance(data, dict):
        raise ProfileError("expected a mapping with 'profile' and 'registers'", file=file, line=1)
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise _profile_error(exc, data, root, file) from exc


def _profile_error(
    exc: ValidationError, data: dict[str, Any], root: Any, file: str
) -> ProfileError:
    error = exc.errors()[0]
    loc = list(error["loc"])
    ctx = error.get("ctx") or {}
    message = str(ctx.get("message") or error["msg"])
    if error["type"] == "extra_forbidden":
        message = "unknown key (misspelt?)"
    if "index" in ctx:
        loc = ["registers", ctx["index"]]
    if "key" in ctx:
        loc.append(ctx["key"])
    register: str | None = None
    if len(loc) >= 2 and loc[0] == "registers" and isinstance(loc[1], int):
        raw = data.get("registers")
        entry = raw[loc[1]] if isinstance(raw, list) and loc[1] < len(raw) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        register = f"#{loc[1]}" + (f" {name!r}" if name else "")
        key = ".".join(str(part) for part in loc[2:]) or None
    else:
        key = ".".join(str(part) for part in loc) or None
    return ProfileError(message, file=file, register=register, key=key, line=_line_of(root, loc))


def _line_of(node: Any, loc: Sequence[Any]) -> int | None:
    """1-based line of the YAML node at `loc`, or of the deepest ancestor that exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((value for key, value in node.value if key.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            child = node.value[part] if part < len(node.value) else None
        if child is None:
            break
        node, line = child, child.start_mark.line + 1
    return line
