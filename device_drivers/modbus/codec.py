"""Register words <-> engineering values, for every data_type x swap (CONTRACT.md section 5).

Pure functions only: the driver, the simulator and the tests all go through these, so a word
order that is wrong in one is wrong in all three and shows up in the round-trip tests.

Swap names say what the unit does to the big-endian byte string ABCD of a 32-bit value
(AB for 16-bit): `none` sends ABCD, `word` sends CDAB (low word first), `byte` sends BADC
(bytes swapped inside each word), `word_byte` sends DCBA (little-endian).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Protocol, get_args

InputType = Literal["holding", "input", "coil", "discrete"]
DataType = Literal["int16", "uint16", "int32", "uint32", "float32", "bool"]
Swap = Literal["none", "byte", "word", "word_byte"]

INPUT_TYPES: tuple[str, ...] = get_args(InputType)
DATA_TYPES: tuple[str, ...] = get_args(DataType)
SWAPS: tuple[str, ...] = get_args(Swap)
BIT_TABLES = frozenset({"coil", "discrete"})


class Register(Protocol):
    """What the codec needs of a register; `profile.Register` is the one implementation.

    Declared here so the codec sits below the profile model instead of importing it back.
    """

    @property
    def name(self) -> str: ...
    @property
    def input_type(self) -> str: ...
    @property
    def data_type(self) -> str: ...
    @property
    def swap(self) -> str: ...
    @property
    def scale(self) -> float: ...
    @property
    def offset(self) -> float: ...
    @property
    def writable(self) -> bool: ...
    @property
    def min(self) -> float | None: ...
    @property
    def max(self) -> float | None: ...
    @property
    def width(self) -> int: ...


class ReadBlock(Protocol):
    """A planned read (`profile.ReadBlock`): the decode steps prepared for its registers."""

    @property
    def steps(self) -> Sequence[DecodeStep]: ...
WRITABLE_TABLES = frozenset({"holding", "coil"})

WIDTH: Mapping[str, int] = {
    "int16": 1,
    "uint16": 1,
    "bool": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
}
_STRUCT: Mapping[str, str] = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "float32": ">f",
}
_INT_RANGE: Mapping[str, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "bool": (0, 1),
}


class CodecError(ValueError):
    """A value that the register's data type cannot carry."""


def _reorder(data: bytes, swap: str) -> bytes:
    """Apply (or undo: every swap is its own inverse) a unit's byte/word order."""
    if swap in ("byte", "word_byte"):
        data = b"".join(data[i + 1 : i + 2] + data[i : i + 1] for i in range(0, len(data), 2))
    if swap in ("word", "word_byte"):
        data = b"".join(data[i : i + 2] for i in range(len(data) - 2, -1, -2))
    return data


def words_to_raw(words: Sequence[int], data_type: str, swap: str = "none") -> int | float:
    """Registers as received -> the raw number the unit meant (before scale/offset)."""
    width = WIDTH[data_type]
    if len(words) != width:
        raise CodecError(f"{data_type} needs {width} register(s), got {len(words)}")
    data = _reorder(b"".join(int(w).to_bytes(2, "big") for w in words), swap)
    if data_type == "bool":
        return 1 if data != b"\x00\x00" else 0
    value: int | float = struct.unpack(_STRUCT[data_type], data)[0]
    return value


def raw_to_words(raw: int | float, data_type: str, swap: str = "none") -> tuple[int, ...]:
    """The raw number -> registers in the order the unit expects them."""
    if data_type == "bool":
        data = (1 if raw else 0).to_bytes(2, "big")
    else:
        try:
            data = struct.pack(_STRUCT[data_type], raw)
        except (struct.error, OverflowError) as exc:
            raise CodecError(f"{raw!r} does not fit {data_type}") from exc
    data = _reorder(data, swap)
    return tuple(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))


def to_engineering(register: Register, raw: int | float) -> float:
    """value = raw * scale + offset, without binary noise (23.5, not 23.500000000000004).

    A float32 carries about 7 significant digits; more would be noise of the conversion.
    """
    if isinstance(raw, float) and math.isfinite(raw):
        raw = float(f"{raw:.7g}")
    value = float(raw) * register.scale + register.offset
    return round(value, 9) if math.isfinite(value) else value


def to_raw(register: Register, value: float) -> int | float:
    """Inverse of to_engineering, rounded and range-checked for integer types."""
    if not math.isfinite(value):
        raise CodecError(f"{value!r} is not a finite number")
    exact = (value - register.offset) / register.scale
    if register.data_type == "float32":
        if abs(exact) > 3.4028234663852886e38:
            raise CodecError(f"{value!r} does not fit float32")
        return exact
    raw = round(exact)
    low, high = _INT_RANGE[register.data_type]
    if not low <= raw <= high:
        raise CodecError(
            f"{value!r} is raw {raw}, outside {register.data_type} range [{low}, {high}]"
        )
    if register.data_type == "bool" and not math.isclose(raw, exact, abs_tol=1e-9):
        raise CodecError(f"{value!r} is not a boolean (0 or 1)")
    return raw


def off_step(register: Register, value: float) -> bool:
    """Whether an integer register would store another value than `value` (mode 1.5 as 2)."""
    if register.data_type in ("float32", "bool"):
        return False
    exact = (value - register.offset) / register.scale
    return abs(round(exact) - exact) > 1e-6 * max(1.0, abs(exact))


def decode(register: Register, payload: Sequence[int] | Sequence[bool]) -> float:
    """One register's slice of a read -> its engineering value."""
    if register.input_type in BIT_TABLES:
        return to_engineering(register, 1 if payload[0] else 0)
    words = [int(w) for w in payload]
    return to_engineering(register, words_to_raw(words, register.data_type, register.swap))


def encode(register: Register, value: float) -> tuple[int, ...]:
    """An engineering value -> the register words (or one 0/1 for a coil) to write."""
    raw = to_raw(register, value)
    if register.input_type in BIT_TABLES:
        return (1 if raw else 0,)
    return raw_to_words(raw, register.data_type, register.swap)


def plausible(register: Register, value: float) -> bool:
    """Whether a value read from the unit can be believed (finite and inside min/max)."""
    if not math.isfinite(value):
        return False
    if register.min is not None and value < register.min:
        return False
    return register.max is None or value <= register.max


def write_problems(register: Register, value: float) -> list[str]:
    """Everything wrong with writing `value` to `register`; empty when the write may go."""
    name = register.name
    if not register.writable:
        return [f"{name} is read-only"]
    if not isinstance(value, int | float):
        return [f"{name}: {value!r} is not a number"]
    if not math.isfinite(value):
        return [f"{name}: {value!r} is not a finite number"]
    if register.min is not None and value < register.min:
        return [f"{name}: {value:g} is below the minimum {register.min:g}"]
    if register.max is not None and value > register.max:
        return [f"{name}: {value:g} is above the maximum {register.max:g}"]
    if off_step(register, value):  # refused, not rounded: a write stores what was asked
        return [f"{name}: {value:g} is not a whole number of steps of {register.scale:g} "
                f"({register.data_type})"]
    try:
        encode(register, value)
    except CodecError as exc:
        return [f"{name}: {exc}"]
    return []


Decoder = Callable[[Sequence[int], int], float]
_HH = struct.Struct(">HH")
_F32 = struct.Struct(">f")


def _swap_bytes(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


def compile_decoder(register: Register) -> Decoder:
    """A decoder specialised for one register: `decoder(payload, offset) -> value`.

    Same results as `decode` (a test holds them together), several times faster: the poll
    loop decodes every register of every unit every cycle.
    """
    scale, offset, data_type, swap = (register.scale, register.offset, register.data_type,
                                      register.swap)
    exact = scale == 1.0 and offset == 0.0

    def finish(raw: float) -> float:
        return float(raw) if exact else round(raw * scale + offset, 9)

    if register.input_type in BIT_TABLES or data_type == "bool":
        return lambda p, i: finish(1 if p[i] else 0)
    if register.width == 1:
        signed = data_type == "int16"

        def one(p: Sequence[int], i: int) -> float:
            w = int(p[i])
            if swap == "byte":
                w = _swap_bytes(w)
            return finish(w - 0x10000 if signed and w & 0x8000 else w)
        return one

    def words(p: Sequence[int], i: int) -> tuple[int, int]:
        hi, lo = int(p[i]), int(p[i + 1])
        if swap in ("word", "word_byte"):
            hi, lo = lo, hi
        if swap in ("byte", "word_byte"):
            hi, lo = _swap_bytes(hi), _swap_bytes(lo)
        return hi, lo

    if data_type == "float32":
        def f32(p: Sequence[int], i: int) -> float:
            raw = _F32.unpack(_HH.pack(*words(p, i)))[0]
            return to_engineering(register, raw)
        return f32
    signed = data_type == "int32"

    def i32(p: Sequence[int], i: int) -> float:
        hi, lo = words(p, i)
        raw = (hi << 16) | lo
        return finish(raw - 0x1_0000_0000 if signed and raw & 0x8000_0000 else raw)
    return i32


# Fast paths in decode_block for the common 16-bit registers; everything else calls its
# compiled decoder.
_U16, _I16, _OTHER = 0, 1, 2
DecodeStep = tuple[str, int, int, float, float, bool, float | None, float | None, Decoder]


def decode_step(register: Register, offset_in_block: int) -> DecodeStep:
    """What decode_block needs for one register, prepared once per profile."""
    kind = _OTHER
    if register.input_type not in BIT_TABLES and register.swap == "none":
        kind = {"uint16": _U16, "int16": _I16}.get(register.data_type, _OTHER)
    exact = register.scale == 1.0 and register.offset == 0.0
    return (register.name, offset_in_block, kind, register.scale, register.offset, exact,
            register.min, register.max, compile_decoder(register))


def decode_block(
    block: ReadBlock, payload: Sequence[int] | Sequence[bool]
) -> tuple[dict[str, float], tuple[str, ...]]:
    """A block read -> (plausible metrics, names of registers whose values were rejected)."""
    metrics: dict[str, float] = {}
    rejected: list[str] = []
    for name, at, kind, scale, add, exact, low, high, decoder in block.steps:
        try:
            if kind == _OTHER:
                value = decoder(payload, at)
            else:
                raw = int(payload[at])
                if kind == _I16 and raw > 0x7FFF:
                    raw -= 0x10000
                value = float(raw) if exact else round(raw * scale + add, 9)
        except (CodecError, IndexError, struct.error):
            rejected.append(name)
            continue
        if value == value and (low is None or value >= low) and (high is None or value <= high):
            metrics[name] = value  # (value == value is False only for NaN)
        else:
            rejected.append(name)
    return metrics, tuple(rejected)
