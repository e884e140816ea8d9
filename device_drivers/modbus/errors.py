"""Typed Modbus errors, so callers decide on a class rather than on a message string.

Two questions matter to whoever catches these: was anything sent (ProfileError, WriteRefused:
no), and is another attempt worth it (`RequestError.retryable`). Field units answer "busy"
(06) or "acknowledge, ask later" (05) under load, so those are retried; "illegal address" (02)
and "illegal value" (03) will be wrong the next time too, so they are not.
"""

from __future__ import annotations

from collections.abc import Sequence


class ModbusError(Exception):
    """Base of every error this package raises."""


class ProfileError(ModbusError, ValueError):
    """A register map that cannot be used; names the file, the register and the key."""

    def __init__(
        self,
        message: str,
        *,
        file: str,
        register: str | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.register = register
        self.key = key
        self.line = line
        where = file if line is None else f"{file}:{line}"
        parts = [where]
        if register is not None:
            parts.append(f"register {register}")
        if key is not None:
            parts.append(f"key {key!r}")
        super().__init__(f"{', '.join(parts)}: {message}")


class UnknownDevice(ModbusError, KeyError):
    """A device id that no configured Modbus device has."""

    def __str__(self) -> str:
        return f"no Modbus device {self.args[0]!r}"


class WriteRefused(ModbusError, ValueError):
    """A write the profile forbids; raised before anything is sent to the unit."""

    def __init__(self, device_id: str, problems: Sequence[str]) -> None:
        self.device_id = device_id
        self.problems = tuple(problems)
        super().__init__(f"write to {device_id} refused: " + "; ".join(self.problems))


class RequestError(ModbusError):
    """One request to one unit that did not produce a usable answer."""

    retryable = False

    def __init__(self, message: str, *, unit_id: int | None = None) -> None:
        self.unit_id = unit_id
        super().__init__(message)


class ModbusTimeout(RequestError):
    """No (complete) answer within the request timeout."""

    retryable = True


class LinkDown(RequestError):
    """The TCP connection or serial port could not be opened or was lost."""

    retryable = True


class BadResponse(RequestError):
    """An answer that does not fit the request (wrong function, length or address)."""

    retryable = True


class ExceptionResponse(RequestError):
    """The unit answered with a Modbus exception code."""

    code = 0
    label = "unknown exception"

    def __init__(self, message: str = "", *, unit_id: int | None = None) -> None:
        text = f"exception {self.code:02X} ({self.label})"
        super().__init__(f"{text}: {message}" if message else text, unit_id=unit_id)


class IllegalFunction(ExceptionResponse):
    code, label = 0x01, "illegal function"


class IllegalAddress(ExceptionResponse):
    code, label = 0x02, "illegal data address"


class IllegalValue(ExceptionResponse):
    code, label = 0x03, "illegal data value"


class DeviceFailure(ExceptionResponse):
    code, label = 0x04, "server device failure"


class Acknowledge(ExceptionResponse):
    code, label, retryable = 0x05, "acknowledge, processing", True


class DeviceBusy(ExceptionResponse):
    code, label, retryable = 0x06, "server device busy", True


class GatewayPathUnavailable(ExceptionResponse):
    code, label = 0x0A, "gateway path unavailable"


class GatewayTargetNoResponse(ExceptionResponse):
    code, label, retryable = 0x0B, "gateway target failed to respond", True


_BY_CODE: dict[int, type[ExceptionResponse]] = {
    cls.code: cls
    for cls in (
        IllegalFunction,
        IllegalAddress,
        IllegalValue,
        DeviceFailure,
        Acknowledge,
        DeviceBusy,
        GatewayPathUnavailable,
        GatewayTargetNoResponse,
    )
}


def exception_for_code(code: int, message: str = "", *, unit_id: int | None = None) -> RequestError:
    """The typed error for a Modbus exception code; unknown codes keep their number."""
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(message, unit_id=unit_id)
    error = ExceptionResponse(message, unit_id=unit_id)
    error.code = code
    error.args = (f"exception {code:02X} (non-standard): {message}",)
    return error
