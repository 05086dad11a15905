#!/usr/bin/env python3
"""A standalone reader of Sluice record batches, written from docs/FORMAT.md.

No Rust, no bindings: the batch layout, the checksum (zlib.crc32, the
same crc32 IEEE as Rust's crc32fast), the varints, and the lz4 and zstd
records sections (the `lz4` and `zstandard` packages) are decoded here,
checked the way the Rust reader checks them.

As a library:

    headers, records = decode_batches(data, first_offset)

takes the bytes of a RECORD_FORMAT_BATCHES answer (`batches`, one batch
after the other) and the answer's `first_offset`, and returns the header of
every batch and the records from `first_offset` on.

As a program:

    sluice_batches.py <host:port> <proto root> <topic> <partition> <offset>
        Fetches the partition from <offset> with RECORD_FORMAT_BATCHES until
        caught up and prints what it decoded as JSON.
    sluice_batches.py decode <first_offset>
        Reads batches as hex (whitespace ignored) on standard input and
        prints what it decoded as JSON.

The JSON: {"first_offsets": [...], "batches": [{header fields}...],
"records": [{"offset", "key" (base64 or null), "value" (base64),
"headers": [{"key", "value" (base64)}], "timestamp_ms"}...]}. Exits
non-zero with a message on anything wrong.
"""

import base64
import json
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

MAGIC = b"SLB1"
HEADER_LEN = 56
# magic and length: the part of the header the length field does not count
LENGTH_PREFIX_LEN = 8
# the checksum covers bytes 20 to the end of the batch (not the base offset)
CRC_FROM = 20
# magic, length, base_offset, crc, attributes, producer_epoch,
# record_count, first_timestamp, max_timestamp, producer_id, base_sequence
HEADER = struct.Struct("<4sIQIHHIqqQi")
assert HEADER.size == HEADER_LEN

ATTR_COMPRESSION_MASK = 0b111
ATTR_CONTROL = 1 << 4
CODECS = {0: "none", 3: "lz4", 4: "zstd"}
# the most bytes a compressed records section may expand to
MAX_RECORDS_SECTION = 64 * 1024 * 1024
MAX_VARINT_LEN = 10

NO_PRODUCER_ID = 2**64 - 1
NO_PRODUCER_EPOCH = 2**16 - 1
NO_SEQUENCE = -1


class BatchError(Exception):
    """The bytes are not a valid batch (or not a whole one)."""


@dataclass
class BatchHeader:
    base_offset: int
    length: int
    crc: int
    attributes: int
    producer_epoch: int
    record_count: int
    first_timestamp: int
    max_timestamp: int
    producer_id: int
    base_sequence: int

    @property
    def total_len(self) -> int:
        return LENGTH_PREFIX_LEN + self.length

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.record_count - 1

    @property
    def compression(self) -> str:
        code = self.attributes & ATTR_COMPRESSION_MASK
        if code not in CODECS:
            raise BatchError(f"compression code {code} is not supported (0 none, 3 lz4, 4 zstd)")
        return CODECS[code]

    @property
    def is_control(self) -> bool:
        return bool(self.attributes & ATTR_CONTROL)

    def to_json(self) -> dict:
        return {
            "base_offset": self.base_offset,
            "length": self.length,
            "crc": self.crc,
            "attributes": self.attributes,
            "compression": self.compression,
            "control": self.is_control,
            "producer_epoch": self.producer_epoch,
            "record_count": self.record_count,
            "first_timestamp": self.first_timestamp,
            "max_timestamp": self.max_timestamp,
            "producer_id": self.producer_id,
            "base_sequence": self.base_sequence,
        }


@dataclass
class Record:
    offset: int
    key: Optional[bytes]
    value: bytes
    headers: List[Tuple[str, bytes]]
    timestamp_ms: int

    def to_json(self) -> dict:
        return {
            "offset": self.offset,
            "key": None if self.key is None else base64.b64encode(self.key).decode(),
            "value": base64.b64encode(self.value).decode(),
            "headers": [{"key": k, "value": base64.b64encode(v).decode()} for k, v in self.headers],
            "timestamp_ms": self.timestamp_ms,
        }


def parse_header(buf: bytes, pos: int = 0) -> BatchHeader:
    """The fixed header of the batch at buf[pos:], sanity-checked, without
    the checksum."""
    available = len(buf) - pos
    if available < HEADER_LEN:
        raise BatchError(f"batch truncated: need {HEADER_LEN} bytes, have {available}")
    fields = HEADER.unpack_from(buf, pos)
    magic, length = fields[0], fields[1]
    if magic != MAGIC:
        raise BatchError(f"bad batch magic {magic!r}")
    if length < HEADER_LEN - LENGTH_PREFIX_LEN:
        raise BatchError(f"bad batch length {length}")
    if LENGTH_PREFIX_LEN + length > available:
        raise BatchError(f"batch truncated: need {LENGTH_PREFIX_LEN + length} bytes, have {available}")
    _, _, base_offset, crc, attributes, epoch, count, first_ts, max_ts, producer_id, base_sequence = fields
    header = BatchHeader(
        base_offset=base_offset,
        length=length,
        crc=crc,
        attributes=attributes,
        producer_epoch=epoch,
        record_count=count,
        first_timestamp=first_ts,
        max_timestamp=max_ts,
        producer_id=producer_id,
        base_sequence=base_sequence,
    )
    if header.record_count == 0:
        raise BatchError("batch holds no records")
    return header


def parse_checked(buf: bytes, pos: int = 0) -> BatchHeader:
    """The header, with the batch's checksum verified."""
    header = parse_header(buf, pos)
    computed = zlib.crc32(buf[pos + CRC_FROM : pos + header.total_len]) & 0xFFFFFFFF
    if computed != header.crc:
        raise BatchError(f"batch checksum mismatch: stored {header.crc:#010x}, computed {computed:#010x}")
    return header


def _lz4(section: bytes, limit: int) -> bytes:
    import lz4.frame

    # Exactly one LZ4 frame: bytes after it are refused, as the Rust reader
    # refuses them.
    decoder = lz4.frame.LZ4FrameDecompressor()
    out = bytearray()
    data = section
    while True:
        try:
            out += decoder.decompress(data, max_length=limit + 1 - len(out))
        except RuntimeError as error:
            raise BatchError(f"the lz4 records section does not decompress: {error}") from error
        data = b""
        if len(out) > limit:
            raise BatchError(f"the lz4 records section expands past {limit} bytes")
        if decoder.eof:
            break
        if decoder.needs_input:
            raise BatchError("the lz4 records section does not decompress: truncated frame")
    if decoder.unused_data:
        raise BatchError(f"the lz4 records section has {len(decoder.unused_data)} bytes after the end of the frame")
    return bytes(out)


def _zstd(section: bytes, limit: int) -> bytes:
    import zstandard

    # Exactly one zstd frame: bytes after it are refused, as the Rust reader
    # refuses them.
    decoder = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    step = 1024  # input fed in small steps, to stop soon past the limit
    for at in range(0, len(section), step):
        try:
            out += decoder.decompress(section[at : at + step])
        except zstandard.ZstdError as error:
            raise BatchError(f"the zstd records section does not decompress: {error}") from error
        if len(out) > limit:
            raise BatchError(f"the zstd records section expands past {limit} bytes")
        if decoder.eof:
            unused = len(decoder.unused_data) + max(0, len(section) - (at + step))
            if unused:
                raise BatchError(f"the zstd records section has {unused} bytes after the end of the frame")
            break
    if not decoder.eof:
        raise BatchError("the zstd records section does not decompress: truncated frame")
    return bytes(out)


def records_section(buf: bytes, pos: int, header: BatchHeader, limit: int = MAX_RECORDS_SECTION) -> bytes:
    """The records section of the batch at buf[pos:], decompressed."""
    stored = bytes(buf[pos + HEADER_LEN : pos + header.total_len])
    codec = header.compression
    if codec == "none":
        return stored
    if codec == "lz4":
        return _lz4(stored, limit)
    return _zstd(stored, limit)


def uvarint(buf: bytes, pos: int) -> Optional[Tuple[int, int]]:
    """Unsigned LEB128 at buf[pos:]: (value, position after it), or None if
    truncated or longer than a u64."""
    value = 0
    for i in range(MAX_VARINT_LEN):
        if pos + i >= len(buf):
            return None
        byte = buf[pos + i]
        chunk = byte & 0x7F
        if i == MAX_VARINT_LEN - 1 and chunk > 1:
            return None  # the tenth byte may only carry bit 63
        value |= chunk << (7 * i)
        if byte & 0x80 == 0:
            return value, pos + i + 1
    return None


def varint(buf: bytes, pos: int) -> Optional[Tuple[int, int]]:
    """A zigzag varint: (value >> 1) ^ -(value & 1)."""
    got = uvarint(buf, pos)
    if got is None:
        return None
    value, pos = got
    return (value >> 1) ^ -(value & 1), pos


def _wrap_i64(value: int) -> int:
    return (value + 2**63) % 2**64 - 2**63


def decode_records(section: bytes, header: BatchHeader) -> List[Record]:
    """Every record of a (decompressed) records section."""
    records = []
    pos = 0
    for index in range(header.record_count):

        def malformed(reason: str) -> BatchError:
            return BatchError(f"record {index} of the batch is malformed: {reason}")

        got = uvarint(section, pos)
        if got is None:
            raise malformed("bad length")
        body_len, pos = got
        if body_len > len(section) - pos:
            raise malformed("length past the end of the batch")
        body = section[pos : pos + body_len]
        pos += body_len

        def field(read, cursor: int, reason: str):
            got = read(body, cursor)
            if got is None:
                raise malformed(reason)
            return got

        def take(cursor: int, n: int, reason: str) -> Tuple[bytes, int]:
            if n > len(body) - cursor:
                raise malformed(reason)
            return body[cursor : cursor + n], cursor + n

        offset_delta, c = field(uvarint, 0, "bad offset delta")
        if offset_delta != index:
            raise malformed("offset delta out of order")
        timestamp_delta, c = field(varint, c, "bad timestamp")
        key_len, c = field(varint, c, "bad key length")
        if key_len == -1:
            key = None
        elif key_len >= 0:
            key, c = take(c, key_len, "key past the end")
        else:
            raise malformed("negative key length")
        value_len, c = field(uvarint, c, "bad value length")
        value, c = take(c, value_len, "value past the end")
        header_count, c = field(uvarint, c, "bad header count")
        # Each header takes at least two bytes: a count beyond that is corrupt.
        if header_count > (len(body) - c) // 2:
            raise malformed("header count past the end")
        headers = []
        for _ in range(header_count):
            n, c = field(uvarint, c, "header past the end")
            hkey, c = take(c, n, "header past the end")
            n, c = field(uvarint, c, "header past the end")
            hvalue, c = take(c, n, "header past the end")
            try:
                headers.append((hkey.decode("utf-8"), hvalue))
            except UnicodeDecodeError:
                raise malformed("header key is not UTF-8") from None
        if c != len(body):
            raise malformed("bytes left after the record's fields")
        records.append(
            Record(
                offset=header.base_offset + offset_delta,
                key=key,
                value=value,
                headers=headers,
                timestamp_ms=_wrap_i64(header.first_timestamp + timestamp_delta),
            )
        )
    if pos != len(section):
        raise BatchError(f"batch has {len(section) - pos} bytes after its last record")
    return records


def decode_batches(data: bytes, first_offset: int = 0) -> Tuple[List[BatchHeader], List[Record]]:
    """The headers of the batches in `data` (one after the other, as a
    BATCHES answer holds them) and their records at or after
    `first_offset`; every batch's checksum is verified."""
    data = bytes(data)
    headers, records = [], []
    pos = 0
    while pos < len(data):
        header = parse_checked(data, pos)
        headers.append(header)
        if header.last_offset >= first_offset:
            section = records_section(data, pos, header)
            records.extend(r for r in decode_records(section, header) if r.offset >= first_offset)
        pos += header.total_len
    return headers, records


def fetch(address: str, proto_root: str, topic: str, partition: int, offset: int) -> dict:
    """Reads a partition from `offset` with RECORD_FORMAT_BATCHES until
    caught up."""
    from sluice_smoke import fetch_pages

    result = {"first_offsets": [], "batches": [], "records": []}
    for page in fetch_pages(address, proto_root, topic, partition, offset, batches=True):
        headers, records = decode_batches(page.batches, page.first_offset)
        result["first_offsets"].append(page.first_offset)
        result["batches"].extend(h.to_json() for h in headers)
        result["records"].extend(r.to_json() for r in records)
    return result


def main() -> None:
    try:
        if len(sys.argv) == 3 and sys.argv[1] == "decode":
            data = bytes.fromhex("".join(sys.stdin.read().split()))
            first_offset = int(sys.argv[2])
            headers, records = decode_batches(data, first_offset)
            result = {
                "first_offsets": [first_offset],
                "batches": [h.to_json() for h in headers],
                "records": [r.to_json() for r in records],
            }
        elif len(sys.argv) == 6:
            address, proto_root, topic, partition, offset = sys.argv[1:6]
            result = fetch(address, proto_root, topic, int(partition), int(offset))
        else:
            raise SystemExit(__doc__)
    except BatchError as error:
        raise SystemExit(f"sluice_batches: {error}") from None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
