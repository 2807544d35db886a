"""A minimal protocol-buffers wire-format decoder (no protobuf dependency).

:class:`Message` decodes one level of a serialized message into
``field number -> [(wire type, raw value), ...]`` (in order of appearance); nested
messages stay undecoded bytes until asked for, so decoding is lazy and cheap. Typed
accessors check the wire type against what the schema expects (the schema itself is the
caller's field-number table) and follow protobuf semantics: the last occurrence of a
scalar wins, repeated numbers may be packed or not.

Malformed data (truncated varints or fields, lengths past the end, group or unknown wire
types, field number 0) and schema mismatches raise :class:`WireError`, an
:class:`haltdet.InputError` whose message names the path of the offending field (e.g.
``Frame.laser_labels[3].box.heading``); callers prefix the file name.
"""

from __future__ import annotations

import struct
from typing import Iterator

import numpy as np

from haltdet import InputError

VARINT, I64, LEN, I32 = 0, 1, 2, 5
_WIRE_NAMES = {VARINT: "varint", I64: "64-bit", LEN: "length-delimited", I32: "32-bit"}

Value = int | memoryview


class WireError(InputError):
    """Malformed protobuf data, or data that does not fit the expected schema."""


def read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """Decode the varint at ``buf[pos]``; returns (value, next position)."""
    result = shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def iter_fields(data: bytes | memoryview) -> Iterator[tuple[int, int, Value]]:
    """Yield ``(field number, wire type, raw value)`` for one message level.

    The raw value is an int for varints and a memoryview (zero-copy) of the 8, 4 or
    ``length`` bytes for the other wire types.
    """
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
        if wire == VARINT:
            value, pos = read_varint(buf, pos)
            yield field, wire, value
            continue
        if wire == LEN:
            size, pos = read_varint(buf, pos)
        elif wire in (I64, I32):
            size = 8 if wire == I64 else 4
        else:
            raise WireError(f"field {field}: unsupported wire type {wire}")
        if pos + size > end:
            raise WireError(f"field {field}: {size} bytes announced, {end - pos} left (truncated)")
        yield field, wire, buf[pos : pos + size]
        pos += size


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


class Message:
    """One decoded message level; ``name`` is its path, used in error messages."""

    def __init__(self, data: bytes | memoryview, name: str = "message") -> None:
        self.name = name
        self.fields: dict[int, list[tuple[int, Value]]] = {}
        try:
            for field, wire, value in iter_fields(data):
                self.fields.setdefault(field, []).append((wire, value))
        except WireError as exc:
            raise WireError(f"{name}: {exc}") from None

    def __contains__(self, field: int) -> bool:
        return field in self.fields

    def _error(self, field: int, problem: str, name: str = "") -> WireError:
        return WireError(f"{self.name}.{name or field}: {problem}")

    def _values(self, field: int, wire: int, what: str, name: str = "") -> list[Value]:
        out = []
        for got, value in self.fields.get(field, ()):
            if got != wire:
                raise self._error(field, f"expected {what} ({_WIRE_NAMES[wire]}), got {_WIRE_NAMES[got]}", name)
            out.append(value)
        return out

    # ---------------------------------------------------------------- scalars (last wins)

    def integer(self, field: int, default: int | None = None) -> int | None:
        """int32/int64/enum/uint/bool scalar (two's complement for negatives)."""
        values = self._values(field, VARINT, "an integer")
        return _signed64(values[-1]) if values else default  # type: ignore[arg-type]

    def double(self, field: int, default: float | None = None) -> float | None:
        values = self._values(field, I64, "a double")
        return struct.unpack("<d", values[-1])[0] if values else default

    def raw(self, field: int, default: bytes | None = None) -> bytes | None:
        values = self._values(field, LEN, "bytes")
        return bytes(values[-1]) if values else default

    def string(self, field: int, default: str | None = None) -> str | None:
        data = self.raw(field)
        if data is None:
            return default
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self._error(field, "expected a UTF-8 string") from None

    def message(self, field: int, name: str = "") -> Message | None:
        """The sub-message ``field`` (None when absent; repeated copies are not merged)."""
        values = self._values(field, LEN, "a message", name)
        return Message(values[-1], f"{self.name}.{name or field}") if values else None

    def messages(self, field: int, name: str = "") -> list[Message]:
        """The repeated sub-message ``field``, in order."""
        values = self._values(field, LEN, "a message", name)
        return [Message(v, f"{self.name}.{name or field}[{i}]") for i, v in enumerate(values)]

    # ---------------------------------------------------------------- repeated numbers

    def _packed(self, field: int, wire: int, dtype: str, what: str) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        parts = []
        for got, value in self.fields.get(field, ()):
            if got == LEN:
                if len(value) % size:  # type: ignore[arg-type]
                    raise self._error(field, f"packed {what} of {len(value)} bytes is not a multiple of {size}")
            elif got != wire:
                raise self._error(field, f"expected repeated {what}, got wire type {_WIRE_NAMES[got]}")
            parts.append(np.frombuffer(value, dtype=dtype))  # type: ignore[arg-type]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    def floats(self, field: int) -> np.ndarray:
        """repeated float (packed or not) as float32."""
        return self._packed(field, I32, "<f4", "floats").astype(np.float32, copy=False)

    def doubles(self, field: int) -> np.ndarray:
        """repeated double (packed or not) as float64."""
        return self._packed(field, I64, "<f8", "doubles").astype(np.float64, copy=False)

    def integers(self, field: int) -> np.ndarray:
        """repeated int32/int64/enum (packed or not) as int64."""
        out: list[int] = []
        for got, value in self.fields.get(field, ()):
            if got == VARINT:
                out.append(_signed64(value))  # type: ignore[arg-type]
            elif got == LEN:
                buf, pos = value, 0  # type: ignore[assignment]
                try:
                    while pos < len(buf):  # type: ignore[arg-type]
                        v, pos = read_varint(buf, pos)  # type: ignore[arg-type]
                        out.append(_signed64(v))
                except WireError as exc:
                    raise self._error(field, f"packed integers: {exc}") from None
            else:
                raise self._error(field, f"expected repeated integers, got wire type {_WIRE_NAMES[got]}")
        return np.asarray(out, dtype=np.int64)
