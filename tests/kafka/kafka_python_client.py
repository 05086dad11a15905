"""kafka-python against the broker's Kafka listener
(client/tests/kafka_clients.rs runs it). Every command prints JSON on
stdout and exits non-zero with a message on stderr when something is off.

    create-topic BOOTSTRAP TOPIC PARTITIONS
        CreateTopics through KafkaAdminClient; {"created"}.
    list-topics BOOTSTRAP
        Metadata (v8, authorized operations asked for) through
        KafkaAdminClient: {"topics": {name: partitions}}.
    delete-topic BOOTSTRAP TOPIC
        DeleteTopics through KafkaAdminClient; {"deleted"}.
    produce-json BOOTSTRAP TOPIC COUNT KEYS FIRST
        Records FIRST..FIRST+COUNT, key "key-<seq % KEYS>", value
        {"key", "seq"} as JSON, each send waited on; {"sent": [...]}.
    consume-group BOOTSTRAP TOPIC GROUP COUNT
        A group member (auto commit on) reads COUNT records from the
        earliest, then closes (commits); {"records": [...]}.
    produce-raw BOOTSTRAP TOPIC
        Records as JSON lines on stdin (kafka_records.py), sent one by
        one; {"sent": [{"partition", "offset"}]}.
    read-raw BOOTSTRAP TOPIC PARTITION OFFSET COUNT
        No group: reads COUNT records of one partition from OFFSET;
        {"records": [...]} byte for byte (kafka_records.py).
    group-member BOOTSTRAP TOPIC GROUP NAME DELAY_MS COMMIT_EVERY
        A group member (auto commit off) that takes one record per poll,
        "processes" it (sleeps DELAY_MS) and commits what it processed
        after every COMMIT_EVERY records; one JSON line per event
        (assigned, revoked, processed, committed, commit_failed) until
        stdin closes, then closes and prints {"event": "closed"}.
    join-refused BOOTSTRAP TOPIC GROUP SECONDS
        Joins GROUP and polls for SECONDS: {"error", "message"} for the
        error the join met, or {"assigned": [...]} if it met none.
"""

import json
import sys
import threading
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from kafka_records import emit, fail, read_records, record_json, unb64, usage

TIMEOUT_S = 30


def admin_client(bootstrap):
    return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="kafka-python-admin")


def create_topic(bootstrap, topic, partitions):
    admin = admin_client(bootstrap)
    try:
        response = admin.create_topics([NewTopic(topic, int(partitions), 1)])
    finally:
        admin.close()
    # kafka-python 2 answers the response object, 3 a dict.
    if isinstance(response, dict):
        errors = [t for t in response["topics"] if t["error_code"] != 0]
    else:
        errors = [t for t in response.topic_errors if t[1] != 0]
    if errors:
        fail(f"CreateTopics answered errors: {errors}")
    emit({"created": topic})


def list_topics(bootstrap):
    admin = admin_client(bootstrap)
    try:
        names = admin.list_topics()
        described = admin.describe_topics(names)
    finally:
        admin.close()
    # kafka-python 2 names a described topic "topic", 3 "name".
    emit({"topics": {t.get("topic", t.get("name")): len(t["partitions"]) for t in described}})


def delete_topic(bootstrap, topic):
    admin = admin_client(bootstrap)
    try:
        response = admin.delete_topics([topic])
    finally:
        admin.close()
    if isinstance(response, dict):
        errors = [t for t in response["topics"] if t["error_code"] != 0]
    else:
        errors = [t for t in response.topic_error_codes if t[1] != 0]
    if errors:
        fail(f"DeleteTopics answered errors: {errors}")
    emit({"deleted": topic})


def produce_json(bootstrap, topic, count, keys, first):
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        key_serializer=str.encode,
        value_serializer=lambda v: json.dumps(v).encode(),
    )
    sent = []
    for seq in range(int(first), int(first) + int(count)):
        key = f"key-{seq % int(keys)}"
        try:
            meta = producer.send(topic, key=key, value={"key": key, "seq": seq}).get(timeout=10)
        except KafkaError as e:
            fail(f"send of record {seq} failed: {e!r}")
        sent.append({"key": key, "seq": seq, "partition": meta.partition, "offset": meta.offset})
    producer.close(timeout=10)
    emit({"sent": sent})


def consume_group(bootstrap, topic, group, count):
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=True,
        auto_commit_interval_ms=500,
        key_deserializer=lambda k: k.decode(),
        value_deserializer=lambda v: json.loads(v),
    )
    records = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(records) < int(count):
        if time.monotonic() > deadline:
            fail(f"only {len(records)} of {count} records arrived within {TIMEOUT_S} s: {records}")
        for batch in consumer.poll(timeout_ms=500).values():
            for r in batch:
                records.append({"key": r.key, "value": r.value, "partition": r.partition, "offset": r.offset})
    # Anything beyond what was produced (a duplicate) shows up here.
    for batch in consumer.poll(timeout_ms=1000).values():
        for r in batch:
            records.append({"key": r.key, "value": r.value, "partition": r.partition, "offset": r.offset})
    consumer.close(autocommit=True)
    emit({"records": records})


def produce_raw(bootstrap, topic):
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    sent = []
    for i, r in enumerate(read_records()):
        try:
            meta = producer.send(
                topic,
                key=unb64(r["key"]),
                value=unb64(r["value"]),
                headers=[(name, unb64(v)) for name, v in r["headers"]],
                partition=r.get("partition"),
                timestamp_ms=r.get("timestamp_ms"),
            ).get(timeout=10)
        except KafkaError as e:
            fail(f"send of record {i} failed: {e!r}")
        sent.append({"partition": meta.partition, "offset": meta.offset})
    producer.close(timeout=10)
    emit({"sent": sent})


def consumer_record_json(r):
    if r.timestamp_type != 0:
        fail(f"record {r.partition}/{r.offset}: timestamp type {r.timestamp_type}, not CreateTime (0)")
    return record_json(r.partition, r.offset, r.key, r.value, r.headers, r.timestamp)


def read_raw(bootstrap, topic, partition, offset, count):
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    tp = TopicPartition(topic, int(partition))
    consumer.assign([tp])
    consumer.seek(tp, int(offset))
    records = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(records) < int(count):
        if time.monotonic() > deadline:
            fail(f"only {len(records)} of {count} records arrived within {TIMEOUT_S} s")
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(consumer_record_json(r) for r in batch)
    for batch in consumer.poll(timeout_ms=500).values():
        records.extend(consumer_record_json(r) for r in batch)
    consumer.close()
    emit({"records": records})


def group_member(bootstrap, topic, group, name, delay_ms, commit_every):
    stop = threading.Event()
    pending = {}

    def watch_stdin():
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()

    class Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked):
            # What was processed of a partition that goes is not committed
            # (it will be processed again): at least once, the plain way.
            for tp in revoked:
                pending.pop(tp, None)
            emit({"event": "revoked", "member": name, "partitions": sorted(tp.partition for tp in revoked)})

        def on_partitions_assigned(self, assigned):
            emit({"event": "assigned", "member": name, "partitions": sorted(tp.partition for tp in assigned)})

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        client_id=name,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_poll_interval_ms=10000,
        max_poll_records=1,
    )
    consumer.subscribe([topic], listener=Listener())
    processed = 0
    while not stop.is_set():
        for tp, batch in consumer.poll(timeout_ms=200).items():
            for r in batch:
                time.sleep(int(delay_ms) / 1000)
                emit({"event": "processed", "member": name, "partition": r.partition,
                      "offset": r.offset, "value": r.value.decode()})
                pending[tp] = r.offset + 1
                processed += 1
                if processed % int(commit_every):
                    continue
                offsets = dict(pending)
                pending.clear()
                try:
                    consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
                except KafkaError as e:
                    for tp, o in offsets.items():
                        emit({"event": "commit_failed", "member": name, "partition": tp.partition,
                              "offset": o, "error": repr(e)})
                    continue
                for tp, o in offsets.items():
                    emit({"event": "committed", "member": name, "partition": tp.partition, "offset": o})
    consumer.close(autocommit=False)
    emit({"event": "closed", "member": name})


def join_refused(bootstrap, topic, group, seconds):
    """Joins `group` and polls for `seconds`: the error the join met, or
    the partitions it was given if it met none."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    consumer.subscribe([topic])
    deadline = time.time() + float(seconds)
    try:
        while time.time() < deadline:
            consumer.poll(timeout_ms=200)
            if consumer.assignment():
                emit({"assigned": sorted(tp.partition for tp in consumer.assignment())})
                return
    except KafkaError as e:
        emit({"error": type(e).__name__, "message": str(e)})
        return
    finally:
        consumer.close(autocommit=False)
    emit({"error": None, "assigned": []})


COMMANDS = {
    "create-topic": (create_topic, 3),
    "list-topics": (list_topics, 1),
    "delete-topic": (delete_topic, 2),
    "produce-json": (produce_json, 5),
    "consume-group": (consume_group, 4),
    "produce-raw": (produce_raw, 2),
    "read-raw": (read_raw, 5),
    "group-member": (group_member, 6),
    "join-refused": (join_refused, 4),
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS or len(sys.argv) - 2 != COMMANDS[sys.argv[1]][1]:
        usage(__doc__)
    COMMANDS[sys.argv[1]][0](*sys.argv[2:])
