"""TFRecord container files (the framing of Waymo Open Dataset v1 files), checksummed.

A TFRecord file is a sequence of records, each::

    uint64 length            little-endian
    uint32 masked_crc(length bytes)
    bytes  payload[length]
    uint32 masked_crc(payload)

with ``masked_crc(x) = ((c >> 15) | (c << 17)) + 0xA282EAD8 (mod 2**32)``, ``c`` the
CRC-32C (Castagnoli) of ``x``. Every checksum is verified; a mismatch or a truncated file
raises :class:`haltdet.InputError` naming the file and the byte offset of the record.

CRC-32C is computed here in numpy (no compiled dependency): the data is cut into K
equal chunks whose CRCs advance together, one 32-bit word per step (slicing-by-4
tables), and the K partial CRCs are then merged pairwise with precomputed "append n zero
bytes" operators (CRC is linear over GF(2)). Short inputs use a plain table loop.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from haltdet import InputError

_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reflected
_MASK_DELTA = 0xA282EAD8
_HEADER = 12  # uint64 length + uint32 crc
_FOOTER = 4
_SHORT = 4096  # below this many bytes the pure-Python loop is faster


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1).astype(np.uint32)
    return table


_T0 = _byte_table()
_T0_LIST = _T0.tolist()
# Slicing-by-4: _SLICE[k][v] = CRC register after byte v followed by k zero bytes.
_SLICE = [_T0]
for _ in range(3):
    _SLICE.append((_SLICE[-1] >> 8) ^ _T0[_SLICE[-1] & 0xFF])
_S0, _S1, _S2, _S3 = _SLICE


def _apply(op: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Apply a GF(2)-linear map on 32-bit values given as 4 byte tables (4, 256)."""
    return op[0][x & 0xFF] ^ op[1][(x >> 8) & 0xFF] ^ op[2][(x >> 16) & 0xFF] ^ op[3][x >> 24]


def _op_from_columns(cols: np.ndarray) -> np.ndarray:
    """Byte tables (4, 256) of the linear map whose image of bit i is cols[i]."""
    bits = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)  # (256, 8)
    return np.stack(
        [np.bitwise_xor.reduce(np.where(bits, cols[8 * b : 8 * b + 8], np.uint32(0)), axis=1) for b in range(4)]
    ).astype(np.uint32)


_BASIS = np.uint32(1) << np.arange(32, dtype=np.uint32)
# _ZERO_OPS[k]: the register map "append 2**k zero bytes" (raw CRC, register init 0).
_ZERO_OPS: list[np.ndarray] = [_op_from_columns(_T0[_BASIS & 0xFF] ^ (_BASIS >> 8))]


def _zero_op(k: int) -> np.ndarray:
    while len(_ZERO_OPS) <= k:
        prev = _ZERO_OPS[-1]
        _ZERO_OPS.append(_op_from_columns(_apply(prev, _apply(prev, _BASIS))))
    return _ZERO_OPS[k]


def _crc_short(data: bytes | memoryview, crc: int = 0xFFFFFFFF) -> int:
    table = _T0_LIST
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli; init and final XOR 0xFFFFFFFF) of ``data``."""
    n = len(data)
    if n < _SHORT:
        return _crc_short(data) ^ 0xFFFFFFFF
    # Chunk length: a power of two (>= 4 words) near sqrt(n), so the per-step numpy
    # overhead (chunk_len / 4 steps) and the per-element work stay balanced.
    log_chunk = int(np.clip(round(np.log2(np.sqrt(n))), 4, 14))
    chunk = 1 << log_chunk
    k = -(-n // chunk)
    buf = np.zeros(k * chunk, dtype=np.uint8)
    pad = k * chunk - n
    buf[pad:] = np.frombuffer(data, dtype=np.uint8)
    # The initial register 0xFFFFFFFF equals complementing the first 4 message bytes
    # with register 0, and with register 0 leading zero bytes (the padding) are no-ops.
    buf[pad : pad + 4] ^= 0xFF
    words = buf.view("<u4").reshape(k, chunk // 4).T  # strided: no transposed copy
    reg, x, tmp = np.zeros(k, np.uint32), np.empty(k, "<u4"), np.empty(k, np.uint32)
    x0, x1, x2, x3 = x.view(np.uint8).reshape(k, 4).T  # the bytes of x, little-endian
    for w in words:  # reg = table lookup of the 4 bytes of (reg ^ w), in place
        np.bitwise_xor(reg, w, out=x)
        np.take(_S3, x0, out=reg)
        for table, xb in ((_S2, x1), (_S1, x2), (_S0, x3)):
            np.take(table, xb, out=tmp)
            reg ^= tmp
    # Merge neighbours: crc(A || B) = zeros_op(len B)(crc(A)) ^ crc(B).
    level = log_chunk
    while reg.shape[0] > 1:
        if reg.shape[0] % 2:
            reg = np.concatenate([np.zeros(1, np.uint32), reg])
        reg = _apply(_zero_op(level), reg[0::2]) ^ reg[1::2]
        level += 1
    return int(reg[0]) ^ 0xFFFFFFFF


try:  # the maintained C implementation where installed (`pip install haltdet[real]`):
    import google_crc32c  # ~60x `crc32c` here: python scripts/crc32c_speed.py

    _crc32c_fast = google_crc32c.value
except ImportError:  # pragma: no cover - depends on the environment
    _crc32c_fast = crc32c


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """The masked CRC-32C stored in TFRecord files."""
    crc = _crc32c_fast(bytes(data) if isinstance(data, memoryview) else data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- records


def _fail(path, offset: int, problem: str) -> InputError:
    return InputError(f"{path}: record at byte {offset}: {problem}")


def _read_header(fh: BinaryIO, path, offset: int, size: int) -> int:
    """Read and check the 12-byte header at ``offset``; returns the payload length."""
    head = fh.read(_HEADER)
    if len(head) < _HEADER:
        raise _fail(path, offset, f"truncated header ({len(head)} of {_HEADER} bytes)")
    length, crc = struct.unpack("<QI", head)
    if masked_crc32c(head[:8]) != crc:
        raise _fail(path, offset, "length checksum mismatch (corrupt file)")
    if offset + _HEADER + length + _FOOTER > size:
        raise _fail(path, offset, f"truncated record: needs {length} payload bytes + 4, "
                    f"file ends {size - offset - _HEADER} bytes after the header")
    return length


def _open(path: Path) -> tuple[BinaryIO, int]:
    try:
        return open(path, "rb"), path.stat().st_size
    except OSError as exc:
        raise InputError(f"{path}: cannot open ({exc.strerror or exc})") from exc


def scan_records(path) -> list[tuple[int, int]]:
    """(offset, payload length) of every record, checking headers but not payloads.

    Cheap: only the 12-byte headers are read (payloads are skipped with seeks).
    """
    path = Path(path)
    fh, size = _open(path)
    out = []
    with fh:
        offset = 0
        while offset < size:
            fh.seek(offset)
            length = _read_header(fh, path, offset, size)
            out.append((offset, length))
            offset += _HEADER + length + _FOOTER
    return out


def _read_payload(fh: BinaryIO, path, offset: int, length: int) -> bytes:
    payload = fh.read(length)
    (crc,) = struct.unpack("<I", fh.read(_FOOTER))
    if masked_crc32c(payload) != crc:
        raise _fail(path, offset, "payload checksum mismatch (corrupt file)")
    return payload


def read_record(path, offset: int, prefix: int | None = None) -> bytes:
    """The payload of the record at ``offset``, checksum verified.

    With ``prefix``, only the first ``prefix`` payload bytes are read and returned,
    unverified (the payload checksum needs the whole payload).
    """
    path = Path(path)
    fh, size = _open(path)
    with fh:
        fh.seek(offset)
        length = _read_header(fh, path, offset, size)
        if prefix is not None and prefix < length:
            return fh.read(prefix)
        return _read_payload(fh, path, offset, length)


def iter_records(path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, payload)`` for every record of the file, all checksums verified."""
    path = Path(path)
    fh, size = _open(path)
    with fh:
        offset = 0
        while offset < size:
            length = _read_header(fh, path, offset, size)
            yield offset, _read_payload(fh, path, offset, length)
            offset += _HEADER + length + _FOOTER


def write_records(path, payloads) -> None:
    """Write payloads as a TFRecord file (used by tests and tools)."""
    with open(path, "wb") as fh:
        for payload in payloads:
            head = struct.pack("<Q", len(payload))
            fh.write(head + struct.pack("<I", masked_crc32c(head)))
            fh.write(payload)
            fh.write(struct.pack("<I", masked_crc32c(payload)))
