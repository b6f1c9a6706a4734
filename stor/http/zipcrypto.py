"""Zip archives encrypted with a password, written as they stream (memory bounded, no temp file).

The encryption is PKWARE's traditional one ("ZipCrypto"), the malware community's convention for
samples (`infected`): the point is that no scanner or mail filter on the way opens the file, not
secrecy, and ZipCrypto is what every analyst's tool opens — 7-Zip, Info-ZIP `unzip`, Python's
`zipfile` and Windows Explorer; WinZip's AES opens only in the first. No maintained Python
library streams ZipCrypto (stream-zip writes AES only; zipfile and pyzipper write to seekable
files), so the format is written here: entries stored (samples are mostly compressed already),
each with a data descriptor (its CRC is known only at its end), no Zip64 (`MAX_ARCHIVE_BYTES`:
callers refuse larger archives before they start). ZipCrypto runs in Python, a byte at a time:
a few MB/s per core, fine for samples, not for bulk transfer.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

MAX_ARCHIVE_BYTES = 0xFFFFFFFF - 1024 * 1024
"""Without Zip64 every size and offset must fit in 32 bits."""
_FLAGS = 0x0001 | 0x0008  # encrypted; sizes and CRC in a data descriptor after the data
_VERSION = 20


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC = _crc_table()


class ZipCrypto:
    """PKWARE's stream cipher, keyed by a password (APPNOTE.TXT §6.1)."""

    def __init__(self, password: bytes) -> None:
        self.k0, self.k1, self.k2 = 0x12345678, 0x23456789, 0x34567890
        for byte in password:
            self._update(byte)

    def _update(self, byte: int) -> None:
        self.k0 = (self.k0 >> 8) ^ _CRC[(self.k0 ^ byte) & 0xFF]
        self.k1 = ((self.k1 + (self.k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        self.k2 = (self.k2 >> 8) ^ _CRC[(self.k2 ^ (self.k1 >> 24)) & 0xFF]

    def encrypt(self, data: bytes) -> bytes:
        k0, k1, k2, crc = self.k0, self.k1, self.k2, _CRC
        out = bytearray(len(data))
        for index, byte in enumerate(data):
            temp = (k2 | 2) & 0xFFFF
            out[index] = byte ^ (((temp * (temp ^ 1)) >> 8) & 0xFF)
            k0 = (k0 >> 8) ^ crc[(k0 ^ byte) & 0xFF]
            k1 = ((k1 + (k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
            k2 = (k2 >> 8) ^ crc[(k2 ^ (k1 >> 24)) & 0xFF]
        self.k0, self.k1, self.k2 = k0, k1, k2
        return bytes(out)


@dataclass
class _Written:
    name: bytes
    crc: int
    size: int
    offset: int
    dos_time: int
    dos_date: int


def _dos_stamp(when: float) -> tuple[int, int]:
    t = time.gmtime(max(when, 315532800))  # the DOS epoch is 1980
    return (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2), ((t.tm_year - 1980) << 9) | (
        t.tm_mon << 5
    ) | t.tm_mday


class ZipWriter:
    """Feed entries in turn (`start`, `data`…, `end`), then `finish`; each returns the bytes to
    send. Sizes must be known when an entry starts (they are: a blob's stat)."""

    def __init__(self, password: bytes) -> None:
        self.password = password
        self.offset = 0
        self._entries: list[_Written] = []
        self._cipher: ZipCrypto | None = None
        self._crc = 0
        self._current: _Written | None = None

    def _out(self, data: bytes) -> bytes:
        self.offset += len(data)
        return data

    def start(self, name: str, size: int, mtime: float) -> bytes:
        dos_time, dos_date = _dos_stamp(mtime)
        encoded = name.encode()
        self._current = _Written(encoded, 0, size, self.offset, dos_time, dos_date)
        header = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, _VERSION, _FLAGS | 0x0800, 0, dos_time, dos_date, 0, 0, 0, len(encoded), 0
        )
        self._cipher = ZipCrypto(self.password)
        self._crc = 0
        # the 12-byte encryption header: random, its last byte checks the password (with a data
        # descriptor, against the high byte of the DOS time)
        check = os.urandom(11) + bytes([(dos_time >> 8) & 0xFF])
        return self._out(header + encoded + self._cipher.encrypt(check))

    def data(self, chunk: bytes) -> bytes:
        assert self._cipher is not None, "data before start"
        self._crc = zlib.crc32(chunk, self._crc)
        return self._out(self._cipher.encrypt(chunk))

    def end(self) -> bytes:
        entry = self._current
        assert entry is not None, "end before start"
        entry.crc = self._crc
        self._entries.append(entry)
        self._current, self._cipher = None, None
        return self._out(struct.pack("<IIII", 0x08074B50, entry.crc, entry.size + 12, entry.size))

    def finish(self) -> bytes:
        start = self.offset
        parts = []
        for entry in self._entries:
            parts.append(
                struct.pack(
                    "<IHHHHHHIIIHHHHHII",
                    0x02014B50,
                    _VERSION,
                    _VERSION,
                    _FLAGS | 0x0800,
                    0,
                    entry.dos_time,
                    entry.dos_date,
                    entry.crc,
                    entry.size + 12,
                    entry.size,
                    len(entry.name),
                    0,
                    0,
                    0,
                    0,
                    0o100644 << 16,
                    entry.offset,
                )
                + entry.name
            )
        directory = b"".join(parts)
        count = len(self._entries)
        end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(directory), start, 0)
        return self._out(directory + end)


def archive_bytes(sizes: list[tuple[str, int]]) -> int:
    """How long an archive of these (name, size) entries will be."""
    return sum(30 + 12 + 16 + 46 + 2 * len(name.encode()) + size for name, size in sizes) + 22


Entry = tuple[str, int, float, AsyncIterator[bytes]]
"""(name, size, mtime, chunks) of one archive entry."""
Blocking = Callable[[Callable[[bytes], bytes], bytes], Awaitable[bytes]]
"""Run a blocking call off the event loop (the encryption: a few MB/s)."""


async def zip_entries(entries: AsyncIterator[Entry], password: bytes, blocking: Blocking) -> AsyncIterator[bytes]:
    """The archive of `entries`, a piece at a time; each piece encrypted by `blocking`."""
    writer = ZipWriter(password)
    async for name, size, mtime, chunks in entries:
        yield writer.start(name, size, mtime)
        async for chunk in chunks:
            yield await blocking(writer.data, chunk)
        yield writer.end()
    yield writer.finish()
