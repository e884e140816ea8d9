"""Register codec: hand-computed word orders, round trips for every data_type x swap."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.modbus.codec import (
    CodecError,
    compile_decoder,
    decode,
    decode_block,
    encode,
    plausible,
    raw_to_words,
    to_raw,
    words_to_raw,
    write_problems,
)
from device_drivers.modbus.errors import WriteRefused
from device_drivers.modbus.profile import Profile, Register, plan_reads, plan_write

# (data_type, raw, swap) -> words as a unit with that byte order puts them on the wire.
KNOWN = [
    ("float32", 230.0, "none", (0x4366, 0x0000)),
    ("float32", 230.0, "word", (0x0000, 0x4366)),
    ("float32", 230.0, "byte", (0x6643, 0x0000)),
    ("float32", 230.0, "word_byte", (0x0000, 0x6643)),
    ("uint32", 0x12345678, "none", (0x1234, 0x5678)),
    ("uint32", 0x12345678, "word", (0x5678, 0x1234)),
    ("uint32", 0x12345678, "byte", (0x3412, 0x7856)),
    ("uint32", 0x12345678, "word_byte", (0x7856, 0x3412)),
    ("int32", -2, "none", (0xFFFF, 0xFFFE)),
    ("int32", -2, "word", (0xFFFE, 0xFFFF)),
    ("int32", -100000, "none", (0xFFFE, 0x7960)),
    ("int16", -300, "none", (0xFED4,)),
    ("int16", -300, "byte", (0xD4FE,)),
    ("uint16", 0x1234, "none", (0x1234,)),
    ("uint16", 0x1234, "byte", (0x3412,)),
    ("bool", 1, "none", (0x0001,)),
    ("bool", 0, "none", (0x0000,)),
]


@pytest.mark.parametrize(("data_type", "raw", "swap", "words"), KNOWN)
def test_known_word_orders(data_type: str, raw: float, swap: str, words: tuple[int, ...]) -> None:
    assert raw_to_words(raw, data_type, swap) == words
    assert words_to_raw(words, data_type, swap) == raw


SWAPS_32 = ("none", "byte", "word", "word_byte")
INT_RANGES = {"int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1),
              "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1)}


@given(data=st.data())
def test_integer_round_trip_every_type_and_swap(data: st.DataObject) -> None:
    data_type = data.draw(st.sampled_from(sorted(INT_RANGES)))
    swaps = SWAPS_32 if data_type.endswith("32") else ("none", "byte")
    swap = data.draw(st.sampled_from(swaps))
    raw = data.draw(st.integers(*INT_RANGES[data_type]))
    words = raw_to_words(raw, data_type, swap)
    assert all(0 <= w <= 0xFFFF for w in words)
    assert words_to_raw(words, data_type, swap) == raw


@given(value=st.floats(width=32, allow_nan=False), swap=st.sampled_from(SWAPS_32))
def test_float32_round_trip_every_swap(value: float, swap: str) -> None:
    assert words_to_raw(raw_to_words(value, "float32", swap), "float32", swap) == value


@given(data=st.data())
def test_compiled_decoders_agree_with_the_reference_codec(data: st.DataObject) -> None:
    data_type = data.draw(st.sampled_from(["int16", "uint16", "int32", "uint32", "float32",
                                           "bool"]))
    swaps = {"int16": ("none", "byte"), "uint16": ("none", "byte"), "bool": ("none",)}
    swap = data.draw(st.sampled_from(swaps.get(data_type, SWAPS_32)))
    scale = data.draw(st.sampled_from([1.0, 0.1, 10.0, -0.5]))
    offset = data.draw(st.sampled_from([0.0, -40.0, 273.15]))
    register = reg(data_type=data_type, swap=swap, scale=scale, offset=offset)
    words = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4))
    at = data.draw(st.integers(0, 2))
    expected = decode(register, words[at : at + register.width])
    got = compile_decoder(register)(words, at)
    assert got == expected or (math.isnan(got) and math.isnan(expected))
    (block,) = plan_reads(Profile(profile="p", registers=(register,)))  # the poller's path
    metrics, rejected = decode_block(block, words[at : at + register.width])
    assert metrics.get("x", expected) == expected or rejected == ("x",)


def test_float32_nan_decodes_as_nan() -> None:
    words = struct.unpack(">HH", struct.pack(">f", math.nan))
    assert math.isnan(words_to_raw(words, "float32"))


def reg(**fields: object) -> Register:
    base: dict[str, object] = {"name": "x", "input_type": "holding", "address": 0}
    return Register.model_validate(base | fields)


def test_scale_and_offset() -> None:
    temperature = reg(data_type="int16", scale=0.1, offset=-40.0)
    assert decode(temperature, [650]) == 25.0
    assert encode(temperature, 25.0) == (650,)
    assert encode(temperature, -45.5) == (raw_to_words(-55, "int16")[0],)
    energy = reg(data_type="float32", scale=1000.0)
    assert decode(energy, list(raw_to_words(12.5, "float32"))) == 12500.0


def test_decoded_values_carry_no_binary_noise() -> None:
    power = reg(data_type="uint16", scale=0.1)
    assert decode(power, [323]) == 32.3
    volts = reg(data_type="float32")
    assert decode(volts, list(raw_to_words(229.8, "float32"))) == 229.8


def test_values_the_type_cannot_carry_are_refused() -> None:
    with pytest.raises(CodecError):
        to_raw(reg(data_type="uint16"), -1)
    with pytest.raises(CodecError):
        to_raw(reg(data_type="int16", scale=0.1), 4000.0)  # raw 40000 > 32767
    with pytest.raises(CodecError):
        to_raw(reg(data_type="bool"), 0.5)
    with pytest.raises(CodecError):
        to_raw(reg(data_type="float32"), math.inf)
    assert to_raw(reg(data_type="uint16", scale=0.5), 10.2) == 20  # rounds to the nearest step


def test_write_problems_name_the_rule() -> None:
    setpoint = reg(name="setpoint_c", data_type="int16", scale=0.1, writable=True, min=16, max=30)
    assert write_problems(setpoint, 22.5) == []
    assert write_problems(setpoint, 31) == ["setpoint_c: 31 is above the maximum 30"]
    assert write_problems(setpoint, 15.9) == ["setpoint_c: 15.9 is below the minimum 16"]
    assert "finite" in write_problems(setpoint, math.nan)[0]
    assert write_problems(reg(name="t", input_type="input"), 1) == ["t is read-only"]


def test_plausibility_drops_garbage() -> None:
    temperature = reg(data_type="int16", scale=0.1, min=-40, max=80)
    assert plausible(temperature, 25.0)
    assert not plausible(temperature, 3276.7)
    assert not plausible(reg(data_type="float32"), math.nan)


def profile(*registers: dict[str, object], max_gap: int = 0) -> Profile:
    return Profile.model_validate({"profile": "t", "registers": list(registers),
                                   "max_gap": max_gap})


def test_reads_are_batched_within_max_gap_and_limits() -> None:
    p = profile(
        {"name": "a", "input_type": "input", "address": 0},
        {"name": "b", "input_type": "input", "address": 1, "data_type": "float32"},
        {"name": "c", "input_type": "input", "address": 5},  # 2 spare registers: same read
        {"name": "f", "input_type": "input", "address": 9},  # 3 spare: a new read
        {"name": "d", "input_type": "holding", "address": 0},
        {"name": "e", "input_type": "coil", "address": 3, "data_type": "bool"},
        max_gap=2,
    )
    blocks = [(b.input_type, b.start, b.count, [r.name for r in b.registers])
              for b in plan_reads(p)]
    assert blocks == [("holding", 0, 1, ["d"]), ("input", 0, 6, ["a", "b", "c"]),
                      ("input", 9, 1, ["f"]), ("coil", 3, 1, ["e"])]


def test_decode_block_slices_and_rejects() -> None:
    p = profile(
        {"name": "t", "input_type": "input", "address": 0, "data_type": "int16", "scale": 0.1,
         "min": -40, "max": 80},
        {"name": "p", "input_type": "input", "address": 2, "data_type": "float32", "swap": "word"},
        max_gap=1,
    )
    (block,) = plan_reads(p)
    words = [215, 0xBEEF, *raw_to_words(1234.5, "float32", "word")]
    assert decode_block(block, words) == ({"t": 21.5, "p": 1234.5}, ())
    assert decode_block(block, [30000, 0, *raw_to_words(1.0, "float32", "word")]) == (
        {"p": 1.0}, ("t",))


def test_plan_write_reports_every_problem_before_sending() -> None:
    p = profile(
        {"name": "sp", "input_type": "holding", "address": 0, "data_type": "int16",
         "scale": 0.1, "writable": True, "min": 16, "max": 30},
        {"name": "on", "input_type": "coil", "address": 0, "data_type": "bool", "writable": True},
        {"name": "t", "input_type": "input", "address": 0},
    )
    ops = plan_write(p, {"sp": 22.5, "on": 1}, "u1")
    assert [(op.register.name, op.words) for op in ops] == [("sp", (225,)), ("on", (1,))]
    with pytest.raises(WriteRefused) as refused:
        plan_write(p, {"sp": 45, "t": 1, "fan": 3}, "u1")
    assert len(refused.value.problems) == 3
    assert "no register 'fan' (writable: sp, on)" in str(refused.value)
    with pytest.raises(WriteRefused):
        plan_write(p, {}, "u1")
