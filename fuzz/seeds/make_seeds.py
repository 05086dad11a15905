#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets (valid batches and a valid
partition directory, so the fuzzer starts from bytes that parse)."""
import os, struct, zlib

HERE = os.path.dirname(os.path.abspath(__file__))

def uvarint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])

def varint(n):
    return uvarint((n << 1) ^ (n >> 63) if n < 0 else n << 1)

def batch(base, values, ts=1_700_000_000_000):
    recs = b""
    for i, v in enumerate(values):
        body = uvarint(i) + varint(i) + varint(1) + b"k" + uvarint(len(v)) + v + uvarint(1) \
            + uvarint(1) + b"h" + uvarint(1) + b"x"
        recs += uvarint(len(body)) + body
    after_crc = struct.pack("<HHIqqQi", 0, 0xFFFF, len(values), ts, ts + len(values) - 1,
                            2**64 - 1, -1) + recs
    crc = zlib.crc32(after_crc)
    length = 8 + 4 + len(after_crc)
    return b"SLB1" + struct.pack("<IQI", length, base, crc) + after_crc

def entry(kind, base, content):
    return bytes([kind, base]) + struct.pack("<H", len(content)) + content

seg0 = batch(0, [b"a", b"bb"]) + batch(2, [b"ccc"])
seg3 = batch(3, [b"dddd"]) + batch(4, [b"e", b"f", b"g"])
with open(os.path.join(HERE, "batch_decoder", "two_batches"), "wb") as f:
    f.write(seg0)
with open(os.path.join(HERE, "open_partition", "two_segments"), "wb") as f:
    f.write(entry(0, 0, seg0) + entry(1, 0, b"") + entry(0, 3, seg3) + entry(2, 0, b"stray"))
with open(os.path.join(HERE, "open_partition", "gap"), "wb") as f:
    f.write(entry(0, 0, seg0) + entry(0, 9, batch(9, [b"z"])) + entry(0, 20, b""))
