#!/usr/bin/env python3
"""Talks to a running Sluice broker from Python, as any gRPC user would.

Usage: sluice_smoke.py <host:port> <proto root>

Generates stubs from Sluice's .proto files with grpcio-tools into a
temporary directory, then creates a topic, subscribes, produces keyed
records, fetches them back, and checks a few error codes. Exits non-zero
with a message on the first thing that is wrong.
"""

import queue
import sys
import tempfile
import threading

import grpc
from grpc_tools import protoc

PROTOS = ["records", "admin", "produce", "consume", "groups", "dlq", "auth"]


def generate_stubs(proto_root: str) -> str:
    out = tempfile.mkdtemp(prefix="sluice-py-")
    files = [f"sluice/v1/{name}.proto" for name in PROTOS]
    args = ["protoc", f"-I{proto_root}", f"--python_out={out}", f"--grpc_python_out={out}", *files]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {files}")
    return out


def fetch_pages(address: str, proto_root: str, topic: str, partition: int, offset: int, batches: bool):
    """Fetch answers for `partition` of `topic` from `offset` on, in the
    batch format or the records format, until caught up: the reading loop
    of sluice_batches.py and sluice_interop.py. Exits with a message on an
    answer in the other format, an empty answer below the high watermark,
    or one whose next_offset does not move on."""
    sys.path.insert(0, generate_stubs(proto_root))
    from sluice.v1 import consume_pb2, consume_pb2_grpc  # noqa: E402  (generated above)

    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=10)
    consumer = consume_pb2_grpc.ConsumeServiceStub(channel)
    wanted = consume_pb2.RECORD_FORMAT_BATCHES if batches else consume_pb2.RECORD_FORMAT_RECORDS
    while True:
        page = consumer.Fetch(
            consume_pb2.FetchRequest(topic=topic, partition=partition, offset=offset, format=wanted), timeout=30
        )
        if batches and page.records:
            raise SystemExit(f"a BATCHES answer carried {len(page.records)} records")
        if not batches and page.batches:
            raise SystemExit(f"a RECORDS answer carried {len(page.batches)} batch bytes")
        if not (page.batches or page.records):
            if page.next_offset != page.high_watermark:
                raise SystemExit(f"nothing at {offset}, but the high watermark is {page.high_watermark}")
            return
        yield page
        if page.next_offset <= offset:
            raise SystemExit(f"next_offset {page.next_offset} does not move past {offset}")
        offset = page.next_offset


def main() -> None:
    address, proto_root = sys.argv[1], sys.argv[2]
    sys.path.insert(0, generate_stubs(proto_root))
    from sluice.v1 import (  # noqa: E402  (generated above)
        admin_pb2,
        admin_pb2_grpc,
        consume_pb2,
        consume_pb2_grpc,
        dlq_pb2,
        dlq_pb2_grpc,
        groups_pb2,
        groups_pb2_grpc,
        produce_pb2,
        produce_pb2_grpc,
        records_pb2,
    )

    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=10)
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    producer = produce_pb2_grpc.ProduceServiceStub(channel)
    consumer = consume_pb2_grpc.ConsumeServiceStub(channel)

    created = admin.CreateTopic(
        admin_pb2.CreateTopicRequest(name="py-events", config=admin_pb2.TopicConfig(partitions=3))
    )
    assert created.config.partitions == 3, created

    # Subscribe before producing: the stream must push what comes after.
    subscription = consumer.Subscribe(
        consume_pb2.SubscribeRequest(topic="py-events", position=consume_pb2.START_POSITION_LATEST)
    )
    pushed: "queue.Queue[records_pb2.ConsumedRecord]" = queue.Queue()

    def drain() -> None:
        try:
            for message in subscription:
                for record in message.records:
                    pushed.put(record)
        except grpc.RpcError:
            pass  # cancelled at the end

    threading.Thread(target=drain, daemon=True).start()

    records = [
        records_pb2.Record(
            key=f"user-{i % 4}".encode(),
            value=f"event-{i}".encode(),
            headers=[records_pb2.Header(key="lang", value=b"python")],
        )
        for i in range(12)
    ]
    response = producer.Produce(produce_pb2.ProduceRequest(topic="py-events", records=records))
    assert len(response.positions) == 12, response

    fetched = []
    for partition in range(3):
        reply = consumer.Fetch(consume_pb2.FetchRequest(topic="py-events", partition=partition, offset=0))
        fetched.extend(reply.records)
    assert sorted(r.value for r in fetched) == sorted(r.value for r in records), fetched
    for key in {r.key for r in records}:
        mine = [r.value for r in fetched if r.key == key]
        sent = [r.value for r in records if r.key == key]
        assert mine == sent, f"order of {key!r}: {mine} != {sent}"
    assert all(r.headers[0].key == "lang" for r in fetched)

    got = [pushed.get(timeout=10) for _ in range(12)]
    assert sorted(r.value for r in got) == sorted(r.value for r in records), got

    # Pipelined produce on a bidirectional stream: acks in request order.
    requests = [
        produce_pb2.ProduceRequest(
            topic="py-events",
            partition=1,
            request_id=100 + i,
            records=[records_pb2.Record(value=f"streamed-{i}".encode())],
        )
        for i in range(5)
    ]
    acks = list(producer.ProduceStream(iter(requests)))
    assert [a.request_id for a in acks] == [100 + i for i in range(5)], acks
    offsets = [a.response.positions[0].offset for a in acks]
    assert offsets == list(range(offsets[0], offsets[0] + 5)), offsets
    streamed = [pushed.get(timeout=10).value for _ in range(5)]
    assert streamed == [f"streamed-{i}".encode() for i in range(5)], streamed
    subscription.cancel()

    latest = consumer.ListOffsets(
        consume_pb2.ListOffsetsRequest(topic="py-events", position=consume_pb2.OFFSET_SPEC_LATEST)
    )
    total = sum(o.offset for o in latest.offsets)
    assert total == 17, latest

    for call, expected in [
        (lambda: admin.CreateTopic(admin_pb2.CreateTopicRequest(name="py-events")), grpc.StatusCode.ALREADY_EXISTS),
        (lambda: consumer.Fetch(consume_pb2.FetchRequest(topic="nope")), grpc.StatusCode.NOT_FOUND),
        (
            lambda: consumer.Fetch(consume_pb2.FetchRequest(topic="py-events", partition=0, offset=999)),
            grpc.StatusCode.OUT_OF_RANGE,
        ),
        (lambda: producer.Produce(produce_pb2.ProduceRequest(topic="py-events")), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        try:
            call()
        except grpc.RpcError as error:
            assert error.code() == expected, (error.code(), error.details())
        else:
            raise AssertionError(f"expected {expected}")

    # A group member from Python: join, get partitions, commit, nack.
    groups = groups_pb2_grpc.GroupServiceStub(channel)
    dead_letters = dlq_pb2_grpc.DeadLetterServiceStub(channel)
    joined = groups.JoinGroup(groups_pb2.JoinGroupRequest(group_id="py-group", topics=["py-events"]))
    beat = groups.Heartbeat(groups_pb2.HeartbeatRequest(group_id="py-group", member_id=joined.member_id))
    assert [sorted(s.partitions) for s in beat.assigned] == [[0, 1, 2]], beat
    groups.CommitOffsets(
        groups_pb2.CommitOffsetsRequest(
            group_id="py-group",
            member_id=joined.member_id,
            member_epoch=beat.member_epoch,
            offsets=[groups_pb2.OffsetCommit(topic="py-events", partition=1, offset=3)],
        )
    )
    nacked = dead_letters.Nack(
        dlq_pb2.NackRequest(
            group_id="py-group",
            member_id=joined.member_id,
            record=dlq_pb2.RecordRef(topic="py-events", partition=1, offset=0),
            reason="cannot parse",
        )
    )
    assert nacked.deliveries == 1 and not nacked.dead_lettered, nacked
    described = groups.DescribeGroup(groups_pb2.DescribeGroupRequest(group_id="py-group"))
    p1 = [p for p in described.partitions if p.partition == 1][0]
    assert p1.committed_offset == 3 and p1.lag == p1.end_offset - 3, p1
    assert described.dead_letters[0].retry_set_size == 1, described
    try:
        groups.CommitOffsets(
            groups_pb2.CommitOffsetsRequest(
                group_id="py-group",
                member_id="stranger",
                offsets=[groups_pb2.OffsetCommit(topic="py-events", partition=1, offset=1)],
            )
        )
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
        assert ("sluice-error", "unknown-member") in error.trailing_metadata(), error.trailing_metadata()
    else:
        raise AssertionError("a stranger's commit was accepted")
    groups.LeaveGroup(groups_pb2.LeaveGroupRequest(group_id="py-group", member_id=joined.member_id))

    print("python client: ok")


if __name__ == "__main__":
    main()
