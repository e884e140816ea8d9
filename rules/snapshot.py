"""The engine's snapshot container: versioned, checksummed, deterministic bytes.

Layout: `MAGIC`, format version (u16), CRC-32 of the rest (u32), then zlib of
[header length (u32), JSON header, raw little-endian array bytes]. The header lists the
arrays (name, dtype, shape) and carries the JSON-able state. Deterministic (no zip
timestamps), so the same state gives the same bytes and a restore can be checked by
re-snapshotting. Only plain numeric dtypes are accepted on load: a snapshot is data,
never code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

MAGIC = b"SCGWRULES"
VERSION = 1
_PREFIX = struct.Struct("<HI")
_ALLOWED = {"b", "i", "u", "f"}


def encode(meta: Mapping[str, Any], arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    listing = []
    chunks = []
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        listing.append([name, little.dtype.str, list(array.shape)])
        chunks.append(little.tobytes())
    header = json.dumps({"meta": meta, "arrays": listing}, sort_keys=True,
                        separators=(",", ":")).encode()
    body = zlib.compress(struct.pack("<I", len(header)) + header + b"".join(chunks), 1)
    return MAGIC + _PREFIX.pack(VERSION, zlib.crc32(body)) + body


def decode(data: bytes) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """(meta, arrays) of a snapshot; ValueError for anything that is not a valid one."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError("a snapshot is bytes")
    data = bytes(data)
    start = len(MAGIC) + _PREFIX.size
    if len(data) < start or not data.startswith(MAGIC):
        raise ValueError("not an rules-engine snapshot")
    version, crc = _PREFIX.unpack_from(data, len(MAGIC))
    if version != VERSION:
        raise ValueError(f"snapshot format {version} is not supported (expected {VERSION})")
    body = data[start:]
    if zlib.crc32(body) != crc:
        raise ValueError("snapshot checksum mismatch (corrupt)")
    try:
        raw = zlib.decompress(body)
        (size,) = struct.unpack_from("<I", raw)
        header = json.loads(raw[4: 4 + size])
        offset = 4 + size
        arrays: dict[str, npt.NDArray[Any]] = {}
        for name, dtype_str, shape in header["arrays"]:
            dtype = np.dtype(dtype_str)
            if dtype.kind not in _ALLOWED:
                raise ValueError(f"array {name} has a disallowed dtype {dtype_str}")
            count = int(np.prod(shape, dtype=np.int64))
            nbytes = count * dtype.itemsize
            if offset + nbytes > len(raw):
                raise ValueError("snapshot truncated")
            array = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
            arrays[str(name)] = array.reshape(shape).astype(dtype.newbyteorder("="))
            offset += nbytes
        if offset != len(raw):
            raise ValueError("snapshot has trailing bytes")
        meta = header["meta"]
        if not isinstance(meta, dict):
            raise ValueError("snapshot header is malformed")
    except (zlib.error, struct.error, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"snapshot is malformed: {exc}") from exc
    return meta, arrays


def fingerprint(rule: object) -> str:
    """Identity of a rule's definition: every field but `source` (where it was written
    down is provenance, not meaning; moving a rule in its file keeps its state)."""
    text = json.dumps(_canonical(rule), sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _canonical(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__type__": type(value).__name__,
                **{f.name: _canonical(getattr(value, f.name))
                   for f in dataclasses.fields(value) if f.init and f.name != "source"}}
    if isinstance(value, (set, frozenset)):
        return ["__set__", *sorted((_canonical(v) for v in value), key=repr)]
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, float):
        return repr(value)
    return value if value is None or isinstance(value, (str, int, bool)) else repr(value)
