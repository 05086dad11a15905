#!/usr/bin/env python3
"""The protobuf records path from Python, for the cross-language tests.

Usage:

    sluice_interop.py produce <host:port> <proto root> <topic> <partition>
        Reads records as JSON lines on standard input and produces them,
        as protobuf `Record`s in one Produce call, to <partition>. Prints
        {"base_offset": N, "count": N}.
    sluice_interop.py fetch <host:port> <proto root> <topic> <partition> <offset>
        Fetches the partition from <offset> with RECORD_FORMAT_RECORDS until
        caught up and prints {"records": [...]}.

A record in JSON, both ways: {"offset" (fetch only), "key" (base64 or
null), "value" (base64), "headers": [{"key", "value" (base64)}],
"timestamp_ms"}, the shape sluice_batches.py prints, so what the records
path and the batch path read can be compared as they are. Exits non-zero
with a message on anything wrong.
"""

import base64
import json
import sys

import grpc

from sluice_batches import Record
from sluice_smoke import fetch_pages, generate_stubs


def connect(address: str, proto_root: str):
    sys.path.insert(0, generate_stubs(proto_root))
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=10)
    return channel


def produce(address: str, proto_root: str, topic: str, partition: int) -> dict:
    channel = connect(address, proto_root)
    from sluice.v1 import produce_pb2, produce_pb2_grpc, records_pb2  # noqa: E402  (generated above)

    records = []
    for line in sys.stdin:
        if not line.strip():
            continue
        r = json.loads(line)
        record = records_pb2.Record(
            value=base64.b64decode(r["value"]),
            headers=[
                records_pb2.Header(key=h["key"], value=base64.b64decode(h["value"])) for h in r["headers"]
            ],
            timestamp_ms=r["timestamp_ms"],
        )
        if r["key"] is not None:
            record.key = base64.b64decode(r["key"])
        records.append(record)
    answer = produce_pb2_grpc.ProduceServiceStub(channel).Produce(
        produce_pb2.ProduceRequest(topic=topic, partition=partition, records=records), timeout=30
    )
    if answer.partition != partition:
        raise SystemExit(f"sluice_interop: produced to partition {answer.partition}, asked for {partition}")
    return {"base_offset": answer.base_offset, "count": len(records)}


def fetch(address: str, proto_root: str, topic: str, partition: int, offset: int) -> dict:
    records = []
    for page in fetch_pages(address, proto_root, topic, partition, offset, batches=False):
        for r in page.records:
            if r.partition != partition:
                raise SystemExit(f"sluice_interop: a record of partition {r.partition} in a fetch of {partition}")
            headers = [(h.key, h.value) for h in r.headers]
            key = r.key if r.HasField("key") else None
            records.append(Record(r.offset, key, r.value, headers, r.timestamp_ms).to_json())
    return {"records": records}


def main() -> None:
    args = sys.argv[1:]
    if len(args) == 5 and args[0] == "produce":
        result = produce(args[1], args[2], args[3], int(args[4]))
    elif len(args) == 6 and args[0] == "fetch":
        result = fetch(args[1], args[2], args[3], int(args[4]), int(args[5]))
    else:
        raise SystemExit(__doc__)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
