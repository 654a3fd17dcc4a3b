"""Image files built in the tests: PNGs that declare any size in a few bytes."""

from __future__ import annotations

import struct
import zlib


def png_declaring(width: int, height: int, pixels: bytes | None = None) -> bytes:
    """A PNG whose header declares `width` x `height` RGB pixels, with a few bytes of data
    (a zlib stream of 8 zero bytes unless `pixels` is given): 68 bytes by default."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * 8) if pixels is None else pixels
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
